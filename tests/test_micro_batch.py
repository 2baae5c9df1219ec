"""``micro_batch_size``: the CKA term over the whole batch m, computed from micro-batches (gradient caching), gives
the one-shot batch's gradient exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from fastcd.artifacts import Matching, Pair
from fastcd.config import DistillConfig
from fastcd.distillation import CircuitDistiller, make_batch
from fastcd.loading import load_model, load_tokenizer
from fastcd.models import Head
from fastcd.pipeline import distill
from fastcd.pretrain import shipped_checkpoint
from fastcd.tasks import EntityTracking
from fastcd.tokenizer import build_word_tokenizer
from fastcd.trainable import merge
from fastcd.training import gradient_checkpointing

PAIRS = ((Head(1, 2), Head(1, 1), "last"), (Head(0, 3), Head(0, 2), "query_label"), (Head(1, 0), Head(0, 1), "last"))


def _models(kind: str):
    if kind == "toy":  # the shipped checkpoints: no GQA, the teacher wider than the student
        t, s = shipped_checkpoint("et-teacher"), shipped_checkpoint("et-student")
        return load_model(t), load_model(s), load_tokenizer(s), EntityTracking(n_boxes=5)
    tok = build_word_tokenizer()
    return (make_tiny("llama", vocab_size=len(tok), seed=1), make_tiny(kind, vocab_size=len(tok), seed=2), tok,
            EntityTracking(n_boxes=3))


def _grads(kind, micro, recompute=False, **cfg):
    teacher, student, tok, task = _models(kind)
    cfg = DistillConfig(**{"batch_size": 12, "n_train": 12, "progress": False, **cfg}).validate()
    m = Matching([Pair(t, s, r, "g", {}) for t, s, r in PAIRS], "given")
    enc = task.encode(task.generate(12, seed=4), tok)
    cd = CircuitDistiller(student, m, teacher=teacher, config=cfg)
    batch = make_batch(torch.arange(12), enc, enc)
    student.train(recompute)  # Hugging Face recomputes layers in training mode only
    try:
        with gradient_checkpointing(student, recompute):
            return _step(cd, batch, micro)
    finally:
        if cd.slices is not None:
            merge(cd.slices)


def _step(cd, batch, micro):
    if micro:
        loss, parts = cd.backward_micro(batch, micro)
    else:
        loss_t, parts = cd(batch)
        loss_t.backward()
        loss = float(loss_t.detach())
    # align-only leaves some slices without a gradient (o columns do not reach the CKA term): zeros both ways
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in cd.trainable_parameters()]
    return loss, parts, grads


@pytest.mark.parametrize("kind,method,estimator,kd", [
    ("toy", "ce+cka", "biased", 0.0),
    ("toy", "ce+cka", "unbiased", 0.0),
    ("llama", "ce+cka", "biased", 0.5),  # GQA, with a KD term
    ("qwen2", "ce+cka", "unbiased", 0.0),
    ("llama", "cka", "biased", 0.0),
    ("llama", "circuit-ce", "biased", 0.0),
])
@pytest.mark.parametrize("micro", [3, 4, 5])  # 5 does not divide 12: the last micro-batch is smaller
def test_micro_batches_give_the_one_shot_gradient(kind, method, estimator, kd, micro):
    kw = dict(method=method, cka_estimator=estimator, kd_weight=kd)
    loss_a, parts_a, g_a = _grads(kind, 0, **kw)
    loss_b, parts_b, g_b = _grads(kind, micro, **kw)
    assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-6)
    assert set(parts_b) == set(parts_a)
    for k in parts_a:
        assert parts_b[k] == pytest.approx(parts_a[k], rel=1e-5, abs=1e-6), k
    assert any(float(g.abs().max()) > 1e-4 for g in g_a)  # a real gradient, not zeros on both sides
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_training_with_micro_batches_reaches_the_same_student():
    tok = build_word_tokenizer()
    m = Matching([Pair(t, s, r, "g", {}) for t, s, r in PAIRS], "given")
    out = []
    for micro in (0, 2):
        teacher, student = make_tiny("llama", vocab_size=len(tok), seed=1), make_tiny("llama", vocab_size=len(tok),
                                                                                       seed=2)
        res = distill(teacher, student, EntityTracking(n_boxes=3), matching=m, student_tokenizer=tok,
                      teacher_tokenizer=tok, config=DistillConfig(steps=4, batch_size=8, n_train=32, n_eval=8, lr=1e-2,
                                                                  progress=False, micro_batch_size=micro, log_every=1))
        out.append(res)
    a, b = (r.student.state_dict() for r in out)
    assert any(not torch.equal(a[k], make_tiny("llama", vocab_size=len(tok), seed=2).state_dict()[k]) for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    assert [r["loss"] for r in out[1].log] == pytest.approx([r["loss"] for r in out[0].log], rel=1e-4)


@pytest.mark.parametrize("kw,message", [
    (dict(batch_size=8, micro_batch_size=3), "micro_batch_size must be 0 or an integer >= 1 that divides batch_size 8"),
    (dict(micro_batch_size=-1), "micro_batch_size must be 0 or an integer"),
    (dict(micro_batch_size=4, mixed_precision="fp16"), "micro_batch_size with mixed_precision='fp16'"),
])
def test_bad_micro_batch_sizes_are_one_line_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**{"n_train": 32, **kw}).validate()


@pytest.mark.parametrize("kind,micro", [("llama", 0), ("qwen2", 4)])
def test_gradient_checkpointing_gives_the_same_gradient(kind, micro):
    """Recomputing the student's layers in the backward pass (non-reentrant) changes no gradient of the matched
    slices, one-shot and micro-batched; and the layers really are recomputed (more module forwards run)."""
    from torch.nn.modules.module import register_module_forward_hook

    def module_forwards(fn):
        n = [0]

        def hook(module, args, out):
            n[0] += 1

        handle = register_module_forward_hook(hook)
        try:
            return fn(), n[0]
        finally:
            handle.remove()

    ref, n_plain = module_forwards(lambda: _grads(kind, micro, method="ce+cka"))
    got, n_recomputed = module_forwards(lambda: _grads(kind, micro, recompute=True, method="ce+cka"))
    assert n_recomputed > n_plain
    assert got[0] == pytest.approx(ref[0], rel=1e-6)
    for a, b in zip(ref[2], got[2], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_needs_a_model_that_supports_it():
    from fastcd.errors import UsageError

    with pytest.raises(UsageError, match="gradient_checkpointing: the student .* does not support it"):
        with gradient_checkpointing(torch.nn.Linear(2, 2), True):
            pass
