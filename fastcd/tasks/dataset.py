"""Your own prompts as a task: a JSONL file (the schema of :mod:`fastcd.tasks.base`) or a list of examples or
clean/corrupt pairs, usable wherever a task is (``distill``, ``discover``, ``match``, ``experiment``, the CLI's
``--task file.jsonl``).

Splits follow the library's rule: a prompt's split (train 80% / val 10% / test 10%) is a hash of its text, so no
prompt is in two splits; ``generate(n, seed, split)`` draws ``n`` of the split's examples in a seeded order, and
asking for more than the split holds is one error naming the counts. Corrupt prompts for patching come from the
file when it holds pairs, or from the examples' built-in task (entity tracking, theory of mind: the ``task`` field
of every line) when it holds examples; roles come from that task, or from each example's ``meta["spans"]``.
"""

from __future__ import annotations

import os
import random

from fastcd.errors import UsageError
from fastcd.tasks.base import ContrastPair, Example, check_split, load_jsonl, split_of
from fastcd.tasks.protocol import TaskBase
from fastcd.tasks.registry import TASKS


class DatasetTask(TaskBase):
    """A task whose prompts are given: ``DatasetTask("prompts.jsonl")`` or ``DatasetTask([Example, ...])``."""

    def __init__(self, data, *, base=None, source: str | None = None):
        if isinstance(data, (str, os.PathLike)):
            source, items = os.fspath(data), load_jsonl(data)
        else:
            items = list(data)
            if not items or not all(isinstance(x, (Example, ContrastPair)) for x in items):
                raise UsageError("dataset: expected a JSONL path or a non-empty list of Examples (or ContrastPairs)")
            if len({type(x) for x in items}) > 1:
                raise UsageError("dataset: mixes examples and pairs; give one kind")
        self.source = source or f"{len(items)} examples"
        self._pairs = items if isinstance(items[0], ContrastPair) else None
        self.examples = [p.clean for p in items] if self._pairs else items
        names = sorted({e.task for e in self.examples})
        if len(names) != 1:
            raise UsageError(f"dataset {self.source}: its examples name several tasks {names}; a dataset is one task")
        self.name = names[0]
        if base is None:
            base = TASKS[self.name]() if self.name in TASKS else None
        self.base = base
        if base is not None:
            self.roles, self.discovery_defaults = tuple(base.roles), base.discovery_defaults
        else:
            self.roles = tuple(sorted({r for e in self.examples for r in e.meta.get("spans", {})} - {"last"}))
        self.fixed_words = tuple(sorted({e.answer for e in self.examples if e.answer is not None}))

    def __repr__(self) -> str:
        return f"DatasetTask({self.source!r}, {self.name}, {len(self.examples)} examples)"

    def _split(self, split: str, n: int) -> list[int]:
        check_split(split)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise UsageError(f"n must be a positive integer, got {n!r}")
        idx = [i for i, e in enumerate(self.examples) if split_of(e.prompt) == split]
        if len(idx) < n:
            raise UsageError(f"dataset {self.source}: {n} {split} examples asked for, it holds {len(idx)} (of "
                             f"{len(self.examples)}; a prompt's split is a hash of its text, about 80/10/10)")
        return idx

    def generate(self, n: int, seed: int = 0, split: str = "train") -> list[Example]:
        idx = self._split(split, n)
        random.Random(f"{self.source}/{seed}/{split}").shuffle(idx)
        return [self.examples[i] for i in idx[:n]]

    def pairs(self, n: int, seed: int = 0, split: str = "train") -> list[ContrastPair]:
        if self._pairs is None:
            if self.base is None:
                raise UsageError(f"dataset {self.source}: patching needs corrupt prompts: give clean/corrupt pairs "
                                 "({'clean': {...}, 'corrupt': {...}} per line), or examples of a built-in task")
            return super().pairs(n, seed, split)
        idx = self._split(split, n)
        random.Random(f"{self.source}/pairs/{seed}/{split}").shuffle(idx)
        return [self._pairs[i] for i in idx[:n]]

    def corrupt(self, clean: Example, rng: random.Random) -> Example:
        if self.name == "entity-tracking" and "objects" not in clean.meta:  # a prompt given without its metadata
            clean = Example(clean.task, clean.prompt, clean.answer, self.base.parse(clean.prompt).meta)
        return self.base.corrupt(clean, rng)

    def spans(self, ex: Example) -> dict[str, list[int]]:
        return self.base.spans(ex) if self.base is not None else super().spans(ex)

    def candidates(self, ex: Example):
        return self.base.candidates(ex) if self.base is not None else None

    def word_pools(self) -> dict[str, tuple]:
        return self.base.word_pools() if self.base is not None else {}

    def with_pools(self, **pools) -> DatasetTask:
        if self.base is None or not pools:
            return self
        out = DatasetTask.__new__(DatasetTask)
        out.__dict__.update(self.__dict__, base=self.base.with_pools(**pools))
        return out


def is_dataset_path(x) -> bool:
    return isinstance(x, (str, os.PathLike)) and os.fspath(x).endswith((".jsonl", ".json")) and os.path.isfile(x)


__all__ = ["DatasetTask", "is_dataset_path"]
