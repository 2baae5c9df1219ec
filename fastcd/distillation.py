"""The loss of circuit distillation (PAPER.md §4-5): :class:`CircuitDistiller` and its batches.

Loss = CE(student last-token logits, teacher label) + lambda * sum over matched pairs (1 - CKA(student z,
teacher z)), each pair at its own position role, linear CKA over the minibatch (eps-guarded), plus an optional
Hinton logit-KD term. Only the matched student heads' q rows and o columns train (see :mod:`fastcd.trainable`;
the GQA key/value policy is ``DistillConfig.kv``). The teacher is frozen in inference mode, or replaced by an
offline cache (:mod:`fastcd.teacher_cache`). The end-to-end driver is :func:`fastcd.pipeline.distill`, the
training loop :func:`fastcd.training.train_loop`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastcd.artifacts import Matching
from fastcd.cka import choose_impl, cka_loss, cka_loss_gathered
from fastcd.config import METHOD_SPECS, METHODS, DistillConfig  # noqa: F401  (METHODS: re-exported)
from fastcd.errors import UsageError
from fastcd.hooks import capture_z, gather_roles, teacher_forward
from fastcd.models import get_adapter, logits_at, shared_prefix
from fastcd.tasks.base import EncodedBatch
from fastcd.trainable import make_trainable


@dataclass
class DistillBatch:
    """One minibatch. Student and teacher encodings of the same prompts (their tokenizers may differ)."""

    student_ids: torch.Tensor  # [B, T_s]
    student_pos: dict  # role -> [B]
    gold: torch.Tensor  # [B]
    teacher_ids: torch.Tensor | None = None  # [B, T_t]
    teacher_pos: dict | None = None
    teacher_z: torch.Tensor | None = None  # [P, B, d_t] from an offline cache
    teacher_labels: torch.Tensor | None = None  # [B]
    teacher_logits: torch.Tensor | None = None  # [B, V]


def all_gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``[P, B_local, d]`` across ranks along the batch, keeping the autograd graph
    (``torch.distributed.nn.functional.all_gather``).

    Every rank then computes the same global CKA loss L; the gather's backward sums the ranks' identical
    gradients (world_size * dL/dx_local) and DDP's average divides by world_size again, so the update equals
    one process at the global batch.
    """
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=1)


def _rows(batch: DistillBatch, idx: torch.Tensor) -> DistillBatch:
    """The sub-batch of rows ``idx`` (every per-row field)."""
    def pick(t, dim=0):
        return None if t is None else t.index_select(dim, idx.to(t.device))

    return DistillBatch(batch.student_ids[idx], {k: v[idx] for k, v in batch.student_pos.items()}, batch.gold[idx],
                        pick(batch.teacher_ids),
                        None if batch.teacher_pos is None else {k: v[idx] for k, v in batch.teacher_pos.items()},
                        pick(batch.teacher_z, 1), pick(batch.teacher_labels), pick(batch.teacher_logits))


def _gather_plain(x: torch.Tensor, world: int) -> torch.Tensor:
    """``[P, B_local, d]`` from every rank, concatenated along the batch (no autograd: pass 1 of backward_micro)."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 1)


def _rng_state():
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def make_batch(idx, s_enc: EncodedBatch, t_enc: EncodedBatch | None, cache=None) -> DistillBatch:
    """The :class:`DistillBatch` of rows ``idx``: student side from ``s_enc``; teacher side from ``cache`` (anything
    with ``get(idx) -> (z, labels, logits)``) or, for a live teacher, from ``t_enc``."""
    b = DistillBatch(s_enc.input_ids[idx], {k: v[idx] for k, v in s_enc.positions.items()}, s_enc.answer_ids[idx])
    if cache is not None:
        b.teacher_z, b.teacher_labels, b.teacher_logits = cache.get(idx)
    elif t_enc is not None:
        b.teacher_ids = t_enc.input_ids[idx]
        b.teacher_pos = {k: v[idx] for k, v in t_enc.positions.items()}
    return b


def check_vocabularies(teacher, student, teacher_tok=None, student_tok=None) -> None:
    """Teacher labels are token ids: the two models must share one vocabulary."""
    tv = getattr(getattr(teacher, "config", None), "vocab_size", None)
    sv = getattr(getattr(student, "config", None), "vocab_size", None)
    if teacher_tok is not None and student_tok is not None:
        if teacher_tok.get_vocab() != student_tok.get_vocab():
            raise UsageError("teacher and student vocabularies differ (their tokenizers map tokens to different "
                             "ids); circuit distillation on teacher labels needs one shared vocabulary")
    elif tv is not None and sv is not None and tv != sv:
        raise UsageError(f"teacher and student vocabularies differ: vocab_size {tv} vs {sv}")


class CircuitDistiller(nn.Module):
    """The loss of circuit distillation as a module a user drives in their own loop.

    ``loss, parts = cd(batch)``; ``cd.trainable_parameters()`` gives the slices (or, for full-model methods,
    all student parameters) for the optimizer.
    """

    def __init__(self, student: nn.Module, matching: Matching | None, *, teacher: nn.Module | None = None,
                 config: DistillConfig | None = None):
        super().__init__()
        self.config = (config or DistillConfig()).checked()
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never trained, never in state_dict
        method = self.config.method
        if not METHOD_SPECS[method].full_model and (matching is None or len(matching) == 0):
            raise UsageError(f"method {method!r} needs a non-empty matching")
        self.matching = matching
        if matching is not None:
            matching.check_models(teacher, student)
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        if METHOD_SPECS[method].full_model:
            for p in student.parameters():
                p.requires_grad_(True)
            self.slices = None
            self._params = [p for p in student.parameters()]
        else:
            self.slices = make_trainable(student, [p.student for p in matching.pairs], kv=self.config.kv)
            self._params = list(self.slices.params)
        if METHOD_SPECS[method].uses_cka and self.config.cka_estimator == "biased":
            d = get_adapter(student).spec.d_head
            m = self.config.batch_size
            if m < 2 * d:
                import warnings

                warnings.warn(f"CKA batch m={m} with d_head={d}: two unrelated heads already score up to about "
                              f"{d / (m + d):.2f} with the biased estimator (d/(m+d) for isotropic activations; real "
                              "heads of low effective rank less), so the alignment signal is the distance above that "
                              "null; use batch_size >= 4 * d_head (micro_batch_size keeps a forward's memory small, "
                              "the CKA term exact) or cka_estimator='unbiased'", stacklevel=2)

        self._forward_module = student  # the DDP wrapper under torchrun (see enable_ddp)
        self._ddp = False
        self._lam = None  # set by calibrate_lambda when config.lam == "auto"

    def enable_ddp(self, **ddp_kwargs) -> None:
        """Wrap the student in DistributedDataParallel (only the trainable slices are reduced) and compute the
        CKA term on the *global* batch: student and teacher z are all-gathered (with autograd) across ranks,
        so the result equals one process at the same global batch."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        # without CE, some slices get no gradient (o columns of the last matched head): DDP must look for them
        ddp_kwargs.setdefault("find_unused_parameters", not self.config.spec.uses_ce)
        self._forward_module = DDP(self.student, **ddp_kwargs)
        self._ddp = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self._params

    @property
    def n_trainable(self) -> int:
        return sum(p.numel() for p in self._params)

    def _fused_alignment(self, cache, pairs, pos: dict, t_z: torch.Tensor, b: int):
        """One fused kernel launch per student layer, reading z ``[B, T, H*D]`` in place (``pos``: the roles'
        positions in the captured sequences)."""
        spec = get_adapter(self.student).spec
        dev = t_z.device
        total, ckas = t_z.new_zeros(()), torch.zeros(len(pairs), device=dev)
        for layer in sorted({p.student.layer for p in pairs}):
            idx = [i for i, p in enumerate(pairs) if p.student.layer == layer]
            z = cache.layer(layer)  # [B, T, H, D], on the forward path
            xs = z.reshape(b, z.shape[1], spec.n_heads * spec.d_head)
            pos_s = torch.stack([pos[pairs[i].position].to(dev) for i in idx])  # [P_l, B]
            head_s = torch.tensor([pairs[i].student.head for i in idx], device=dev)
            loss, cka = cka_loss_gathered(xs, pos_s, head_s, t_z[idx].contiguous(), None,
                                          torch.zeros(len(idx), dtype=torch.long, device=dev), ds=spec.d_head,
                                          dt=t_z.shape[-1], eps=self.config.eps, impl="triton")
            total = total + loss
            ckas[idx] = cka.float()
        return total, ckas

    def _teacher_signals(self, batch: DistillBatch, need_z: bool, need_logits: bool):
        if batch.teacher_labels is not None or batch.teacher_z is not None:
            if need_z and batch.teacher_z is None:
                raise UsageError("the offline teacher cache holds no z; rebuild it with the matching")
            if need_logits and batch.teacher_logits is None:
                raise UsageError("KD needs teacher logits; rebuild the offline cache with logits=True")
            return batch.teacher_z, batch.teacher_labels, batch.teacher_logits
        if self.teacher is None:
            raise UsageError("no teacher: pass teacher= or batches from an offline teacher cache")
        pairs = self.matching.pairs if self.matching is not None else []
        last, z = teacher_forward(self.teacher, batch.teacher_ids, batch.teacher_pos, pairs if need_z else [])
        return (None if z is None else z.clone()), last.argmax(-1).clone(), last.clone()

    @property
    def lam(self) -> float:
        """The CKA weight in use: ``config.lam``, or the value :meth:`calibrate_lambda` set for ``lam="auto"``."""
        if self.config.method == "cka":
            return 1.0
        if self._lam is None:
            if self.config.lam == "auto":
                raise UsageError('lam="auto": call calibrate_lambda(batches) first (train_loop does)')
            return float(self.config.lam)
        return self._lam

    @property
    def calibrated_lam(self) -> float | None:
        """What :meth:`calibrate_lambda` set for lam="auto" (else None); a checkpoint keeps it for the resume."""
        return self._lam

    @calibrated_lam.setter
    def calibrated_lam(self, value: float | None) -> None:
        self._lam = None if value is None else float(value)

    def terms(self, batch: DistillBatch, *, with_align: bool = True, keep_cache: bool = False) -> dict:
        """The loss terms as tensors on the graph: ``ce``, ``align`` (sum over pairs of 1 - CKA), ``cka`` (per
        pair), ``kd``, each present when the method uses it. ``with_align=False`` leaves the alignment out;
        ``keep_cache`` adds the student's captured z (``_cache``), the roles' positions in it (``_pos``: after a
        shared prefix that ran once, the suffixes') and the last-token logits (``_last``)."""
        cfg = self.config
        want_cka = cfg.spec.uses_cka and (cfg.method == "cka" or cfg.lam == "auto" or cfg.lam > 0)
        need_cka = want_cka and with_align
        kd_w = cfg.effective_kd_weight
        t_z, t_labels, t_logits = self._teacher_signals(batch, need_cka, kd_w > 0)
        dev = next(self.student.parameters()).device
        b = batch.student_ids.shape[0]
        pairs = self.matching.pairs if self.matching is not None else []
        s_heads = list(dict.fromkeys(p.student for p in pairs)) if (need_cka or keep_cache) else []
        fused = (need_cka and not self._ddp and cfg.cka_estimator == "biased"
                 and choose_impl(dev, cfg.impl) == "triton")
        if fused:  # capture whole layers: their z views lie on the forward path, read in place by the kernel
            spec = get_adapter(self.student).spec
            s_heads = [h for h in spec.all_heads() if h.layer in {p.student.layer for p in pairs}]
        ids = batch.student_ids.to(dev)
        reads = [batch.student_pos[r] for r in ("last", *(p.position for p in pairs if s_heads))]
        # few-shot prompts: the shared prefix runs once (batch 1) on the graph, only the suffixes over the batch
        prefix = None if self._ddp else shared_prefix(self.student, ids, reads, train=True)
        pos = prefix.shift(batch.student_pos) if prefix is not None else batch.student_pos  # what the capture holds
        with capture_z(self.student, s_heads or [], detach=False) as cache:
            last, _ = logits_at(self._forward_module, batch.student_pos["last"], input_ids=ids,
                                prefix=prefix)  # [B, V]: lm_head on the last position only
        out: dict[str, torch.Tensor] = {}
        if keep_cache:
            out["_cache"], out["_last"], out["_pos"] = cache, last, pos
        if cfg.spec.uses_ce:
            target = batch.gold if cfg.labels == "gold" else t_labels
            out["ce"] = F.cross_entropy(last.float(), target.to(dev))
        if need_cka:
            t_z = t_z.to(dev)
            if fused:
                out["align"], out["cka"] = self._fused_alignment(cache, pairs, pos, t_z, b)
            else:
                xs = gather_roles(cache, [p.student for p in pairs], [p.position for p in pairs], pos,
                                  b)  # [P, B, d_s]
                if self._ddp:
                    xs, t_z = all_gather_batch(xs), all_gather_batch(t_z.detach())  # [P, B_global, d]
                out["align"], out["cka"] = cka_loss(xs, t_z, eps=cfg.eps, impl=cfg.impl, estimator=cfg.cka_estimator)
        if kd_w > 0:
            t = cfg.kd_temperature
            out["kd"] = F.kl_div(F.log_softmax(last.float() / t, -1), F.log_softmax(t_logits.to(dev) / t, -1),
                                 reduction="batchmean", log_target=True) * t * t
        return out

    def backward_micro(self, batch: DistillBatch, micro: int, backward=None) -> tuple[float, dict[str, float]]:
        """The gradients of one step on ``batch`` in micro-batches of ``micro`` prompts, equal to those of
        ``cd(batch)[0].backward()`` (gradient caching): the CKA term depends on the activations only through sums
        over the batch, so a no-grad pass collects every pair's student z for all m prompts (the teacher's signals
        kept), the loss and its gradient with respect to those z are computed once on the stacked z (all-gathered
        across ranks under DDP), and each micro-batch's forward and backward then injects that gradient beside its
        share of CE and KD. The RNG state of each micro-batch is replayed, so dropout draws the same masks in both
        passes. ``backward(loss)`` runs each micro-batch's backward (default ``loss.backward()``); DDP reduces
        the gradients once, after the last. Returns ``(loss value, parts)`` as ``forward`` does."""
        import contextlib

        cfg = self.config
        b = batch.student_ids.shape[0]
        if micro >= b:
            loss, parts = self(batch)
            (backward or torch.Tensor.backward)(loss)
            return parts["loss"], parts
        chunks = [torch.arange(i, min(i + micro, b)) for i in range(0, b, micro)]
        pairs = self.matching.pairs if self.matching is not None else []
        need_cka = cfg.spec.uses_cka and (cfg.method == "cka" or cfg.lam == "auto" or cfg.lam > 0)
        subs, states, xs, tzs = [], [], [], []
        with torch.no_grad():  # pass 1: the teacher's signals and the student's z at the pairs' roles
            for idx in chunks:
                sub = _rows(batch, idx)
                t_z, t_labels, t_logits = self._teacher_signals(sub, need_cka, cfg.effective_kd_weight > 0)
                sub.teacher_z, sub.teacher_labels, sub.teacher_logits = t_z, t_labels, t_logits
                sub.teacher_ids = sub.teacher_pos = None
                subs.append(sub)
                states.append(_rng_state())
                if need_cka:
                    dev = next(self.student.parameters()).device
                    ids = sub.student_ids.to(dev)
                    pre = shared_prefix(self.student, ids, [sub.student_pos[r] for r in
                                                            ("last", *(p.position for p in pairs))])  # before hooks
                    with capture_z(self.student, list(dict.fromkeys(p.student for p in pairs)), detach=True) as c:
                        logits_at(self.student, sub.student_pos["last"], input_ids=ids, prefix=pre)
                    xs.append(gather_roles(c, [p.student for p in pairs], [p.position for p in pairs],
                                           pre.shift(sub.student_pos) if pre else sub.student_pos, len(idx)).float())
                    tzs.append(t_z.to(dev).float())
        parts: dict[str, float] = {}
        align_value = 0.0
        if need_cka:
            x_all, t_all = torch.cat(xs, 1), torch.cat(tzs, 1)  # [P, m_local, d]
            world, rank = 1, 0
            if self._ddp:
                import torch.distributed as dist

                world, rank = dist.get_world_size(), dist.get_rank()
                x_all, t_all = _gather_plain(x_all, world), _gather_plain(t_all, world)
            x_all.requires_grad_(True)
            align, cka = cka_loss(x_all, t_all, eps=cfg.eps, impl=cfg.impl, estimator=cfg.cka_estimator)
            (grad,) = torch.autograd.grad(self.lam * align, x_all)
            grad = grad[:, rank * b:(rank + 1) * b] * world  # this rank's rows; DDP averages the ranks' gradients
            align_value = float(align.detach())
            parts["cka_loss"], parts["mean_cka"] = align_value, float(cka.detach().mean())
        ce = kd = 0.0
        for k, (idx, sub) in enumerate(zip(chunks, subs)):  # pass 2: forward and backward per micro-batch
            _set_rng_state(states[k])
            last_chunk = k == len(chunks) - 1
            sync = contextlib.nullcontext() if (last_chunk or not self._ddp) else self._forward_module.no_sync()
            with sync:
                t = self.terms(sub, with_align=False, keep_cache=need_cka)
                share = len(idx) / b
                loss = t["ce"] * share if "ce" in t else t["_last"].sum() * 0.0
                if "kd" in t:
                    loss = loss + cfg.effective_kd_weight * t["kd"] * share
                    kd += float(t["kd"].detach()) * share
                if "ce" in t:
                    ce += float(t["ce"].detach()) * share
                if need_cka:
                    x = gather_roles(t["_cache"], [p.student for p in pairs], [p.position for p in pairs],
                                     t["_pos"], len(idx))
                    loss = loss + (x.float() * grad[:, idx].to(x.device)).sum()
                (backward or torch.Tensor.backward)(loss)
        total = ce + (self.lam * align_value if need_cka else 0.0) + cfg.effective_kd_weight * kd
        if cfg.spec.uses_ce:
            parts["ce"] = ce
        if cfg.effective_kd_weight > 0:
            parts["kd"] = kd
        parts["loss"] = total
        return total, parts

    def gradient_ratio(self, batch: DistillBatch) -> dict[str, float]:
        """Gradient norms of the CE and alignment terms on the trainable parameters for one batch:
        ``{"grad_ce", "grad_align", "ratio": grad_align / grad_ce, "cosine"}`` (lambda not applied). Leaves no
        gradient behind."""
        t = self.terms(batch)
        if "ce" not in t or "align" not in t:
            raise UsageError(f"gradient_ratio needs a method with both CE and alignment terms, not "
                             f"{self.config.method!r}")
        params = self.trainable_parameters()
        g_ce = torch.autograd.grad(t["ce"], params, retain_graph=True, allow_unused=True)
        g_al = torch.autograd.grad(t["align"], params, allow_unused=True)
        flat = [torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                           for g, p in zip(gs, params)]) for gs in (g_ce, g_al)]
        n_ce, n_al = flat[0].norm().item(), flat[1].norm().item()
        cos = float(flat[0] @ flat[1]) / max(n_ce * n_al, 1e-30)
        return {"grad_ce": n_ce, "grad_align": n_al, "ratio": n_al / max(n_ce, 1e-30), "cosine": cos}

    def calibrate_lambda(self, batches) -> float:
        """For ``lam="auto"``: lambda = ``config.lam_ratio`` / mean(grad_align / grad_ce) over ``batches``, so the
        alignment gradient is ``lam_ratio`` times the CE gradient at the start of training. Sets and returns it."""
        ratios = [self.gradient_ratio(b)["ratio"] for b in batches]
        r = sum(ratios) / len(ratios)
        if not math.isfinite(r) or r <= 0:
            raise FloatingPointError(f'lam="auto": the alignment/CE gradient ratio is {r} (a dead head or a '
                                     "non-finite input); set lam to a number")
        self._lam = self.config.lam_ratio / r
        return self._lam

    def forward(self, batch: DistillBatch):
        t = self.terms(batch)
        any_t = next(iter(t.values()))
        loss = any_t.new_zeros(())
        parts: dict[str, float] = {}
        if "ce" in t:
            loss = loss + t["ce"]
            parts["ce"] = float(t["ce"].detach())
        if "align" in t:
            loss = loss + self.lam * t["align"]
            parts["cka_loss"] = float(t["align"].detach())
            parts["mean_cka"] = float(t["cka"].detach().mean())
        if "kd" in t:
            loss = loss + self.config.effective_kd_weight * t["kd"]
            parts["kd"] = float(t["kd"].detach())
        parts["loss"] = float(loss.detach())
        return loss, parts



__all__ = ["CircuitDistiller", "DistillBatch", "DistillConfig", "METHODS", "all_gather_batch", "check_vocabularies",
           "gather_roles", "make_batch"]
