"""Shared by the experiment test modules: the shipped toy pair and a small experiment config."""

from fastcd.pretrain import shipped_checkpoint

TEACHER = shipped_checkpoint("et-teacher")
STUDENT = shipped_checkpoint("et-student")


def _cfg(**kw) -> dict:
    base = dict(teacher=TEACHER, student=STUDENT, n_boxes=5, methods=["circuit-ce", "ce+cka"], seeds=[0, 1],
                n_train=32, steps=2, batch_size=8, lr=3e-3, matching="cka", n_test=24, n_discovery=16,
                discovery="roles", log_every=1, diagnostics_m=16)
    base.update(kw)
    return base
