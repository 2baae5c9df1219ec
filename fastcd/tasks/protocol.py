"""The :class:`Task` protocol (what fastcd needs of a task) and :class:`TaskBase`, the defaults a task class
inherits: ``pairs()`` written once, ``encode``, pools, vocabulary and training text."""

from __future__ import annotations

import random
from typing import Protocol, runtime_checkable

from fastcd.errors import UsageTypeError
from fastcd.tasks.base import ContrastPair, EncodedBatch, Example, check_pools, encode


@runtime_checkable
class Task(Protocol):
    """What fastcd needs of a task (``distill``, discovery, matching, the CLI, experiments accept any object that
    follows it). Subclass :class:`TaskBase` to get everything but ``name``, ``roles``, ``generate``, ``corrupt``
    and ``spans`` for free.

    - ``name``: a short name; ``roles``: the position roles its prompts mark besides ``last`` (e.g. where the
      queried box label sits), each a key of ``spans(example)``.
    - ``generate(n, seed, split) -> list[Example]``: ``n`` distinct examples of ``split`` (``train``/``val``/
      ``test``, disjoint: see :func:`split_of`), deterministic in ``seed``.
    - ``pairs(n, seed, split) -> list[ContrastPair]``: clean/corrupt pairs of one token length, for patching.
    - ``encode(examples, tokenizer) -> EncodedBatch``; ``check_tokenizer(tokenizer)``: one-line errors when a
      word is not a single token; ``vocabulary()``: the words its prompts use.
    - ``word_pools()`` / ``with_pools(**pools)``: the sampled word pools, and a copy with other pools
      (:func:`adapt_task` cuts them to words that are single tokens for teacher and student).
    - ``discovery_defaults``: the default circuit-discovery policy (``{"method": "roles"}`` or ``{"method":
      "patching", "position": "last"}``, see :func:`fastcd.discover_policy.default_circuit`).
    - ``training_text(example)``: the text a language model is pretrained on (prompt and answer).
    """

    name: str
    roles: tuple

    def generate(self, n: int, seed: int = 0, split: str = "train") -> list[Example]: ...

    def pairs(self, n: int, seed: int = 0, split: str = "train") -> list[ContrastPair]: ...

    def encode(self, examples, tokenizer) -> EncodedBatch: ...


class TaskBase:
    """Defaults for a :class:`Task`. A subclass defines ``name``, ``roles``, ``generate``, ``corrupt(clean, rng)``
    (a corrupted example of the same token length) and ``spans(example)`` (role -> ``[start, end)`` characters);
    optionally ``candidates(example)`` (the answers a prompt allows), ``word_pools``/``with_pools`` and
    ``fixed_words`` (answer words that must be single tokens)."""

    name = "task"
    roles: tuple = ()
    discovery_defaults = {"method": "patching", "position": "last"}
    fixed_words: tuple = ()

    def corrupt(self, clean: Example, rng: random.Random) -> Example:
        raise NotImplementedError(f"{type(self).__name__} must define corrupt(clean, rng) to make patching pairs")

    def spans(self, ex: Example) -> dict[str, list[int]]:
        return {k: v for k, v in ex.meta.get("spans", {}).items() if k in self.roles}

    def candidates(self, ex: Example) -> list[str] | None:
        return None

    def pairs(self, n: int, seed: int = 0, split: str = "train") -> list[ContrastPair]:
        """Clean/corrupt pairs for patching, deterministic in ``seed``."""
        clean = self.generate(n, seed, split)
        rng = random.Random(f"{self.name}/corrupt/{seed}/{split}")
        return [ContrastPair(c, self.corrupt(c, rng)) for c in clean]

    def encode(self, examples, tokenizer) -> EncodedBatch:
        cands = self.candidates if type(self).candidates is not TaskBase.candidates else None
        return encode(examples, tokenizer, self.spans, cands)

    def word_pools(self) -> dict[str, tuple]:
        return {}

    def with_pools(self, **pools):
        return self

    def check_tokenizer(self, tokenizer) -> None:
        check_pools(tokenizer, {**self.word_pools(), **({"answer words": self.fixed_words} if self.fixed_words
                                                        else {})})

    def vocabulary(self) -> set[str]:
        words = {w for pool in self.word_pools().values() for w in pool} | set(self.fixed_words)
        return words

    def training_text(self, ex: Example) -> str:
        return f"{ex.prompt} {ex.answer}"


REQUIRED = ("name", "roles", "generate", "pairs", "encode")


def check_task(task, what: str = "task"):
    """``task`` when it follows :class:`Task`; a one-line error naming what it lacks otherwise."""
    if isinstance(task, type):
        raise UsageTypeError(f"{what}: pass a task object, not the class {task.__name__} (e.g. {task.__name__}())")
    missing = [m for m in REQUIRED if not hasattr(task, m)]
    if missing:
        raise UsageTypeError(f"{what} must be a task name ('entity-tracking', 'tom', 'tom-causaltom') or an object "
                             f"that follows fastcd.tasks.Task; {type(task).__name__} lacks {missing} (subclass "
                             "fastcd.tasks.TaskBase)")
    roles = task.roles
    if not isinstance(roles, (tuple, list)) or not all(isinstance(r, str) for r in roles):
        raise UsageTypeError(f"{what}.roles must be a tuple of position-role names, got {roles!r}")
    return task
