"""The training loop that :func:`fastcd.distill` and ``fastcd experiment`` share.

AdamW on the trainable slices, a transformers learning-rate schedule with warmup, optional gradient clipping,
autocast (bf16/fp16), a non-finite guard, log rows streamed to ``OUT/log.jsonl`` (and TensorBoard when asked),
validation accuracy every ``eval_every`` steps (never the test set) and early stopping on it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass

import torch

from fastcd.config import DistillConfig, resolve_mixed_precision
from fastcd.distillation import CircuitDistiller, make_batch
from fastcd.errors import UsageError
from fastcd.hooks import mean_z
from fastcd.metrics import accuracy_and_ce, accuracy_per_example, circuit_correct
from fastcd.models import get_adapter
from fastcd.tasks.base import EncodedBatch
from fastcd.trainable import FrozenCast, merge

BATCH_ORDER = "epochs"  # recorded in checkpoints: how batches are drawn (older fastcd drew with replacement)


def batch_rows(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The rows of the global training batch at ``step`` (0-based): no batch holds a prompt twice.

    Epochs over the ``n`` prompts, each a fresh permutation seeded by ``(seed, epoch)``, cut into
    ``n // batch_size`` batches (``DataLoader(shuffle=True, drop_last=True)``): within an epoch every prompt is
    drawn at most once, and the ``n % batch_size`` left out of an epoch differ from epoch to epoch. The rows depend
    only on ``(n, batch_size, step, seed)``, so a resumed run draws exactly the batches of an uninterrupted one."""
    if batch_size > n:
        raise UsageError(f"batch_size must be <= the number of training prompts ({n}) for duplicate-free batches, "
                         f"got {batch_size}")
    epoch, j = divmod(step, n // batch_size)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)[j * batch_size:(j + 1) * batch_size]


def nonfinite(parts: dict, params) -> str | None:
    """The first non-finite loss part, or "gradient" when a trainable gradient is NaN/inf; None when all finite."""
    for k, v in parts.items():
        if not math.isfinite(v):
            return f"loss term {k!r} ({v})"
    grads = [p.grad for p in params if p.grad is not None]
    if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):  # one device sync
        return "gradient"
    return None


def warmup_steps(cfg: DistillConfig) -> int:
    """``warmup_steps`` when set, else ``ceil(warmup_ratio * steps)`` (as in TrainingArguments)."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * cfg.steps)


def make_optimizer(cd: CircuitDistiller, cfg: DistillConfig):
    """AdamW on the trainable parameters and its schedule (transformers' ``get_scheduler``)."""
    from transformers import get_scheduler

    opt = torch.optim.AdamW(cd.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    name = cfg.lr_scheduler
    if name == "constant" and warmup_steps(cfg) > 0:
        name = "constant_with_warmup"
    sched = get_scheduler(name, opt, num_warmup_steps=warmup_steps(cfg), num_training_steps=cfg.steps)
    return opt, sched


class _Sinks:
    """Where log rows go besides the returned list: ``OUT/log.jsonl`` (appended, flushed per row) and TensorBoard."""

    def __init__(self, cfg: DistillConfig, rank: int, start_step: int):
        self.f = self.tb = None
        if cfg.out and rank == 0:
            os.makedirs(cfg.out, exist_ok=True)
            path = os.path.join(cfg.out, "log.jsonl")
            if start_step == 0 and os.path.exists(path):
                os.remove(path)  # a fresh run: rows of an earlier one must not mix in
            self.f = open(path, "a", encoding="utf-8")
            if cfg.report_to == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(cfg.out, "tensorboard"), purge_step=start_step + 1)

    def write(self, row: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def check_gradient_checkpointing(model, on: bool) -> None:
    """One line, before any work, for ``gradient_checkpointing`` on a model that cannot recompute its layers."""
    if on and not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(f"gradient_checkpointing: the student ({type(model).__name__}) does not support it (a "
                         "Hugging Face PreTrainedModel with supports_gradient_checkpointing does); set it to False")


@contextlib.contextmanager
def gradient_checkpointing(model, on: bool):
    """The student's layers recompute their activations in the backward pass inside the block (``on``). Non-
    reentrant checkpointing keeps the autograd graph of every tensor made in a layer, so the head outputs that the
    capture hooks hand to the CKA term get their gradients as without it."""
    if not on:
        yield
        return
    check_gradient_checkpointing(model, on)
    had_hook = bool(getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None))
    if hasattr(model, "activation_checkpointing_enable"):  # transformers' name since 5.2x (the old one is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        if not had_hook and hasattr(model, "disable_input_require_grads"):
            model.disable_input_require_grads()  # the embedding hook enabling left behind: the model as it was


def train_loop(cd: CircuitDistiller, opt, seed: int, cfg: DistillConfig, s_train: EncodedBatch,
               t_train: EncodedBatch | None = None, cache=None, *, step: int = 0, log: list | None = None,
               world: int = 1, rank: int = 0, eval_batch: EncodedBatch | None = None, on_step=None,
               desc: str | None = None, scheduler=None, state: dict | None = None,
               frozen_cast: bool = True) -> list[dict]:
    """``cfg.steps`` optimizer steps on duplicate-free batches of ``s_train`` (:func:`batch_rows` with ``seed``)
    (teacher side from ``t_train`` and the live teacher, or from ``cache``: anything with
    ``get(idx) -> (z, labels, logits)``).

    Every step: forward under autocast (``cfg.mixed_precision``), backward (scaled for fp16), the non-finite
    guard, clipping to ``cfg.max_grad_norm``, the optimizer and ``scheduler`` steps. A log row (loss parts, lr,
    elapsed) every ``cfg.log_every`` steps; ``val_accuracy`` and ``val_ce`` (mean answer CE) on ``eval_batch`` every
    ``cfg.eval_every`` steps, with early stopping after ``cfg.early_stopping_patience`` evaluations without
    improvement. Under autocast a slice-training run holds its frozen linear weights in the autocast dtype for the
    steps (:class:`fastcd.trainable.FrozenCast`: the same numbers, without re-casting 0.5B weights every step; the
    validation forward gets the float32 weights back; ``frozen_cast=False``: autocast casts them).
    ``on_step(step, log)`` runs after every step (checkpointing). ``state`` (a dict) carries the early-stopping
    counters across a resume and gets ``stopped_early`` set. Returns the log."""
    from tqdm import tqdm

    log = [] if log is None else log
    state = {} if state is None else state
    student = cd.student
    student.train()
    spec = cfg.spec
    if cfg.lam == "auto" and cd.calibrated_lam is None and spec.uses_cka:
        # calibrated on 3 batches from their own generator, so the training batches are those of a fixed lambda
        batches = [make_batch(batch_rows(len(s_train), cfg.batch_size, i, seed + 7919).view(world, -1)[rank],
                              s_train, t_train, cache) for i in range(3)]
        cd.calibrate_lambda(batches)
    dev = next(student.parameters()).device
    mp = resolve_mixed_precision(cfg.mixed_precision, get_adapter(student).spec.d_model, dev.type)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
    scaler = torch.amp.GradScaler("cuda") if mp == "fp16" else None
    params = cd.trainable_parameters()
    n_skipped = 0
    t0 = time.time()
    sinks = _Sinks(cfg, rank, step)
    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress or rank != 0,
               desc=desc or f"distill {cfg.method}")

    def row(parts: dict) -> dict:
        r = {"step": step, **parts, "lr": opt.param_groups[0]["lr"], "elapsed_s": round(time.time() - t0, 2)}
        log.append(r)
        return r

    frozen = FrozenCast(student, amp_dtype) if frozen_cast and amp_dtype is not None and cd.slices is not None \
        else None
    try:
        if frozen is not None:
            frozen.__enter__()
        while step < cfg.steps:
            idx = batch_rows(len(s_train), cfg.batch_size, step, seed)  # the global batch, same on all ranks
            idx = idx.view(world, -1)[rank]  # this rank's shard
            ctx = (torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext())
            opt.zero_grad(set_to_none=True)
            if cfg.micro_batch_size and cfg.micro_batch_size < len(idx):  # exact CKA over the batch, in pieces
                with ctx:
                    _, parts = cd.backward_micro(make_batch(idx, s_train, t_train, cache), cfg.micro_batch_size)
            else:
                with ctx:
                    loss, parts = cd(make_batch(idx, s_train, t_train, cache))
                (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is not None:
                scaler.unscale_(opt)
            # under fp16 the gradient scaler skips steps whose gradients overflow (and lowers its scale): only
            # a non-finite loss term stops or skips the run there
            bad = nonfinite(parts, params if scaler is None else [])
            if bad:
                msg = f"non-finite {bad} at step {step + 1} (method {cfg.method}, lr {cfg.lr})"
                if cfg.on_nonfinite == "stop":
                    raise FloatingPointError(f"distill: {msg}; stopped without saving a model (lower lr, check the "
                                             "inputs, or on_nonfinite='skip' to skip such steps)")
                n_skipped += 1
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.update()
                step += 1
                bar.update(1)
                if n_skipped > max(3, cfg.steps // 10):
                    raise FloatingPointError(f"distill: {msg}; {n_skipped} steps skipped, more than 10% of the run")
                continue
            if cfg.max_grad_norm > 0:
                parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items() if k in ("ce", "cka_loss", "kd")})
            r = row(parts) if (step % cfg.log_every == 0 or step == cfg.steps) else None
            if eval_batch is not None and cfg.eval_every and step % cfg.eval_every == 0:
                student.eval()
                r = r or row(parts)  # an eval step that is not a log step gets its own row
                with frozen.originals() if frozen is not None else contextlib.nullcontext():
                    val_correct, r["val_ce"] = accuracy_and_ce(student, eval_batch)
                r["val_accuracy"] = sum(val_correct) / len(val_correct)
                student.train()
                if r["val_accuracy"] > state.get("best_val", -1.0):
                    state["best_val"], state["bad_evals"] = r["val_accuracy"], 0
                else:
                    state["bad_evals"] = state.get("bad_evals", 0) + 1
            if r is not None:
                sinks.write(r)
            if on_step is not None:
                on_step(step, log)
            if cfg.early_stopping_patience and state.get("bad_evals", 0) >= cfg.early_stopping_patience:
                state["stopped_early"] = step
                break
    finally:
        if frozen is not None:
            frozen.__exit__(None, None, None)
        bar.close()
        sinks.close()
    return log


@dataclass
class RunResult:
    """One trained and evaluated run (what :func:`train_and_evaluate` returns)."""

    log: list
    correct: list  # per test prompt (for McNemar)
    circuit_correct: list | None  # with only the matched heads live at their roles (None: not measured)
    n_trainable: int
    trainable_fraction: float
    lam_effective: float | None
    train_seconds: float
    trained_heads: int | None  # the matched student heads (None: the full model trains)
    trained_heads_fraction: float

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def circuit_accuracy(self) -> float | None:
        return None if self.circuit_correct is None else sum(self.circuit_correct) / len(self.circuit_correct)


def train_run(student, matching, cfg: DistillConfig, seed: int, s_train: EncodedBatch, *, cache=None,
              t_train: EncodedBatch | None = None, teacher=None, prepare=None, **loop_kw):
    """Train one run: a :class:`CircuitDistiller` on ``matching``'s student heads (every parameter for a full-model
    method), AdamW and its schedule (:func:`make_optimizer`), :func:`train_loop`, the slices merged back (also on
    an error), the student left in eval mode and frozen. ``prepare(cd, opt, scheduler)`` runs before the loop (a
    resume's state, DDP, diagnostics); ``loop_kw`` goes to :func:`train_loop`. Returns ``(cd, log, seconds)``."""
    cd = CircuitDistiller(student, None if cfg.spec.full_model else matching, teacher=teacher, config=cfg)
    opt, sched = make_optimizer(cd, cfg)
    if prepare is not None:
        prepare(cd, opt, sched)
    t0 = time.time()
    try:
        with gradient_checkpointing(student, cfg.gradient_checkpointing):
            log = train_loop(cd, opt, seed, cfg, s_train, t_train, cache, scheduler=sched, **loop_kw)
    finally:
        if cd.slices is not None:  # leave the student a plain model (no parametrisations)
            merge(cd.slices)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return cd, log, round(time.time() - t0, 1)


def evaluate_run(student, matching, s_test: EncodedBatch, *, s_ref=None, means=None, amp=contextlib.nullcontext):
    """The trained student's per-prompt correctness on ``s_test`` and, with a matching, its circuit correctness:
    the matched heads live at their roles, every other head mean-ablated with ``means`` or, given ``s_ref``, the
    trained student's own means on those prompts (None when neither is given)."""
    circ = None
    with amp():
        correct = accuracy_per_example(student, s_test)
        if matching is not None and (means is not None or s_ref is not None):
            if means is None:
                means = mean_z(student, s_ref.input_ids.to(next(student.parameters()).device))
            circ = circuit_correct(student, s_test, means, matching.circuit_units())
    return correct, circ


def run_result(cd, matching, log, correct, circ, train_s: float) -> RunResult:
    spec, student = cd.config.spec, cd.student
    n_heads = get_adapter(student).spec.n_total_heads
    trained = None if spec.full_model or matching is None else len(matching.student_heads())
    return RunResult(log, correct, circ, cd.n_trainable, cd.n_trainable / sum(p.numel() for p in student.parameters()),
                     cd.lam if spec.uses_cka else None, train_s, trained, 1.0 if trained is None else trained / n_heads)


def train_and_evaluate(student, matching, cfg: DistillConfig, seed: int, s_train: EncodedBatch, s_test: EncodedBatch,
                       *, s_ref=None, means=None, amp=contextlib.nullcontext, **kw) -> RunResult:
    """One run, the same in ``distill``, ``fastcd experiment`` and the demo: :func:`train_run`, then
    :func:`evaluate_run`."""
    cd, log, train_s = train_run(student, matching, cfg, seed, s_train, **kw)
    correct, circ = evaluate_run(student, matching, s_test, s_ref=s_ref, means=means, amp=amp)
    return run_result(cd, matching, log, correct, circ, train_s)


__all__ = ["BATCH_ORDER", "RunResult", "batch_rows", "check_gradient_checkpointing", "evaluate_run",
           "gradient_checkpointing", "make_optimizer", "nonfinite", "run_result",
           "train_and_evaluate", "train_loop", "train_run", "warmup_steps"]
