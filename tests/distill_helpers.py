"""Shared by the distillation test modules (the tokenizer: conftest's `tok`): a task, a matching, a config."""

from fastcd.artifacts import Matching, Pair
from fastcd.config import DistillConfig
from fastcd.models import Head
from fastcd.tasks import EntityTracking

TASK = EntityTracking(n_boxes=3)


DEFAULT_PAIRS = ((Head(1, 2), Head(1, 1), "last"), (Head(0, 3), Head(0, 2), "query_label"))


def given_matching(pairs=DEFAULT_PAIRS):
    return Matching([Pair(t, s, r, "g", {}) for t, s, r in pairs], "given")


def small_config(**kw):
    base = dict(steps=6, batch_size=8, n_train=64, n_eval=16, lr=1e-2, progress=False, log_every=1)
    base.update(kw)
    return DistillConfig(**base)
