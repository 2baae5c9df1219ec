"""Tasks: entity tracking and theory of mind, with clean/corrupt pairs, splits and JSONL I/O."""

from fastcd.errors import UsageError
from fastcd.tasks.base import (
    SPLITS,
    ContrastPair,
    EncodedBatch,
    Example,
    adapt_task,
    load_jsonl,
    save_jsonl,
    split_of,
    word_token_id,
)
from fastcd.tasks.dataset import DatasetTask, is_dataset_path
from fastcd.tasks.entity_tracking import EntityTracking
from fastcd.tasks.protocol import Task, TaskBase, check_task
from fastcd.tasks.registry import TASKS
from fastcd.tasks.tom import CausalToM, TheoryOfMind


def get_task(name: str, **kwargs):
    """``get_task("entity-tracking", n_boxes=7)``, ``get_task("tom")``, or a task of your own by import path:
    ``get_task("mypackage.tasks:Pets")`` (a class is instantiated with ``kwargs``; an object is used as it is);
    it must follow :class:`fastcd.tasks.Task`."""
    if is_dataset_path(name):  # your own prompts, one JSON object per line
        return DatasetTask(name)
    if ":" in name:
        import importlib

        mod, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise UsageError(f"task {name!r}: cannot import {attr!r} from {mod!r} ({type(e).__name__}: {e})") from None
        return check_task(obj(**kwargs) if isinstance(obj, type) else obj, f"task {name!r}")
    if name not in TASKS:
        raise UsageError(f"task must be one of {sorted(TASKS)}, an import path 'module:TaskClass' or a JSONL file of "
                         f"examples, got {name!r}")
    return TASKS[name](**kwargs)


__all__ = [
    "SPLITS", "TASKS", "CausalToM", "ContrastPair", "DatasetTask", "EncodedBatch", "EntityTracking", "Example",
    "Task", "TaskBase", "TheoryOfMind",
    "adapt_task", "check_task", "get_task",
    "load_jsonl", "save_jsonl", "split_of", "word_token_id",
]
