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
from fastcd.tasks.entity_tracking import EntityTracking
from fastcd.tasks.protocol import Task, TaskBase, check_task
from fastcd.tasks.tom import TheoryOfMind

TASKS = {"entity-tracking": EntityTracking, "tom": TheoryOfMind}


def get_task(name: str, **kwargs):
    """``get_task("entity-tracking", n_boxes=7)`` or ``get_task("tom")``."""
    if name not in TASKS:
        raise UsageError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](**kwargs)


__all__ = [
    "SPLITS", "TASKS", "ContrastPair", "EncodedBatch", "EntityTracking", "Example", "Task", "TaskBase", "TheoryOfMind",
    "adapt_task", "check_task", "get_task",
    "load_jsonl", "save_jsonl", "split_of", "word_token_id",
]
