"""Masked circuit-distillation training (PAPER.md §4-5): ``fastcd.distill()`` and ``CircuitDistiller``.

Loss = CE(student last-token logits, teacher label) + lambda * sum over matched pairs (1 - CKA(student z,
teacher z)), each pair at its own position role, biased linear CKA over the minibatch (eps-guarded), plus an
optional Hinton logit-KD term. Only the matched student heads' q rows and o columns train (see
:mod:`fastcd.trainable`; the GQA key/value policy is ``DistillConfig.kv``). The teacher is frozen in
inference mode, or replaced by an offline cache of its circuit heads' z and labels (safetensors shards).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fastcd.discover import ALL, Circuit, accuracy_per_example, circuit_correct
from fastcd.functional import choose_impl, cka_loss, cka_loss_gathered
from fastcd.hooks import capture_z, mean_z
from fastcd.io import write_json_atomic
from fastcd.match import Matching, MatchInputs, match, match_random
from fastcd.models import (
    check_device,
    check_model_path,
    get_adapter,
    load_model,
    load_tokenizer,
    logits_at,
    spec_of,
)
from fastcd.tasks.base import EncodedBatch, adapt_task
from fastcd.trainable import make_trainable, merge

METHODS = ("full-ce", "circuit-ce", "cka", "ce+rand-cka", "ce+cka", "kd")
FULL_MODEL = ("full-ce", "kd")
TEST_SEED = 0  # the seed of the test prompts, the same for every run whatever its training seed
USES_CKA = ("cka", "ce+rand-cka", "ce+cka")
USES_CE = ("full-ce", "circuit-ce", "ce+rand-cka", "ce+cka", "kd")


@dataclass
class DistillConfig:
    """Everything a distillation run needs; defaults are the CPU demo's."""

    method: str = "ce+cka"
    lam: float | str = 1.0  # weight of the summed (1 - CKA) term, or "auto" (see lam_ratio)
    lam_ratio: float = 1.0  # lam="auto": lambda such that |grad align| = lam_ratio * |grad CE| at the start
    steps: int = 300
    batch_size: int = 32  # also the CKA batch m
    lr: float = 1e-3
    weight_decay: float = 0.0
    labels: str = "teacher"  # "teacher" (teacher's argmax answer) or "gold"
    kd_weight: float = 0.0  # Hinton KD term weight (the "kd" method uses 1.0 when this is 0)
    kd_temperature: float = 2.0
    kv: str = "auto"  # key/value slices: "auto" (own k/v train, shared GQA groups frozen), "frozen", "trainable"
    eps: float = 1e-8
    cka_estimator: str = "biased"  # "biased" (the paper's linear CKA) or "unbiased" (debiased; torch path)
    seed: int = 0
    n_train: int = 4096
    n_eval: int = 500  # test prompts (a fixed, seed-independent set: every run is evaluated on the same prompts)
    n_val: int = 200  # validation prompts for accuracy during training (eval_every)
    eval_every: int = 0  # 0: evaluate at the end only
    log_every: int = 10
    save_every: int = 0  # checkpoint period in steps (0: none); a run resumes from OUT/ckpt
    out: str | None = None
    matching_method: str = "ablation"
    discovery: str = "roles"  # "roles" (position-aware mean-ablation patching), "path" (entity tracking only)
    discovery_k: tuple = (4, 2, 2, 2)  # path-patching top-k per group (entity tracking)
    discovery_top_n: int | None = None  # ToM: top-n heads by mean ablation at the last token (default: half)
    n_discovery: int = 256
    teacher_dtype: str | None = None
    device: str | None = None  # where teacher and student run ("cuda", "cpu"); None keeps them where they are
    impl: str | None = None  # alignment-loss implementation (None: dispatch)
    on_nonfinite: str = "stop"  # a NaN/inf loss part or gradient: "stop" (one-line error, nothing saved) or "skip"
    overwrite: bool = False  # a checkpoint in out: False resumes it (it must belong to this run), True discards it
    resume: bool = False  # True: a checkpoint in out must exist (an error otherwise, instead of a fresh start)
    progress: bool = True

    def validate(self) -> DistillConfig:
        """One-line errors naming the field and what was expected, before any work starts."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name, lo in (("steps", 1), ("batch_size", 2), ("n_train", 1), ("n_eval", 1), ("n_val", 1),
                         ("log_every", 1), ("eval_every", 0), ("save_every", 0), ("n_discovery", 2), ("seed", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.lam == "auto" and self.method not in ("ce+cka", "ce+rand-cka"):
            raise ValueError(f'lam="auto" balances the CKA gradient against the CE gradient: it needs method '
                             f"'ce+cka' or 'ce+rand-cka', got {self.method!r}")
        for name in ("lam", "lam_ratio", "lr", "weight_decay", "kd_weight", "kd_temperature", "eps"):
            v = getattr(self, name)
            if name == "lam" and v == "auto":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.lam != "auto" and self.lam < 0:
            raise ValueError(f"lam must be >= 0 or 'auto', got {self.lam}")
        if self.lam_ratio <= 0:
            raise ValueError(f"lam_ratio must be > 0, got {self.lam_ratio}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0 (it guards the CKA denominator of a dead head), got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.method in USES_CKA and self.batch_size < 3:
            raise ValueError(f"batch_size must be >= 3 for {self.method!r}: it is the CKA batch m, and with m=2 the "
                             f"centred Gram matrices are rank 1, so CKA is identically 1 (no alignment signal)")
        check_device(self.device, "device")
        if self.impl is not None:  # one line when Triton is missing or cannot run on that device
            choose_impl(torch.device(self.device) if self.device else torch.device("cpu"), self.impl)
        if self.cka_estimator not in ("biased", "unbiased"):
            raise ValueError(f"cka_estimator must be 'biased' or 'unbiased', got {self.cka_estimator!r}")
        if self.cka_estimator == "unbiased" and self.method in USES_CKA and self.batch_size < 4:
            raise ValueError(f"batch_size must be >= 4 with cka_estimator='unbiased' (the unbiased HSIC estimator "
                             f"needs m >= 4), got {self.batch_size}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if self.labels not in ("teacher", "gold"):
            raise ValueError(f"labels must be 'teacher' or 'gold', got {self.labels!r}")
        if self.kv not in ("auto", "frozen", "trainable"):
            raise ValueError(f"kv must be 'auto', 'frozen' or 'trainable', got {self.kv!r}")
        if self.kd_weight < 0 or self.kd_temperature <= 0:
            raise ValueError("kd_weight must be >= 0 and kd_temperature > 0")
        return self

    @property
    def effective_kd_weight(self) -> float:
        return self.kd_weight if (self.kd_weight > 0 or self.method != "kd") else 1.0


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


def _gather_roles(cache, heads, roles, pos: dict, batch: int) -> torch.Tensor:
    """``[P, B, d]``: pair p's head z at its role's per-example position (keeps the graph)."""
    rows = torch.arange(batch)
    out = []
    for h, role in zip(heads, roles):
        z = cache[h]  # [B, T, d]
        if role == ALL:
            raise ValueError("CKA pairs need a single position role per head, not 'all'")
        out.append(z[rows, pos[role].to(z.device)])
    return torch.stack(out)


class _GatherBatch(torch.autograd.Function):
    """All-gather ``[P, b, d]`` along the batch; backward: the sum over ranks of the gradient's local slice."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        ctx.rank, ctx.b = dist.get_rank(), x.shape[1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.contiguous().clone()
        dist.all_reduce(g)  # every rank computed the same global loss: sum their gradients
        return g[:, ctx.rank * ctx.b : (ctx.rank + 1) * ctx.b]


def _all_gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``[P, B_local, d]`` across ranks along the batch, keeping the autograd graph.

    Every rank then computes the same global CKA loss L; the gather's backward sums the ranks' identical
    gradients (world_size * dL/dx_local) and DDP's average divides by world_size again, so the update equals
    one process at the global batch.
    """
    return _GatherBatch.apply(x)


def _check_matching(matching: Matching, student: nn.Module, teacher: nn.Module | None) -> None:
    """A clear error when a pair names a head that the student (or the teacher, when given) lacks."""
    s_spec = get_adapter(student).spec
    t_spec = get_adapter(teacher).spec if teacher is not None else None
    for p in matching.pairs:
        s_spec.check_head(p.student, "matching student head")
        if t_spec is not None:
            t_spec.check_head(p.teacher, "matching teacher head")


def randomize_students(matching: Matching, student: nn.Module, *, seed: int = 0) -> Matching:
    """The random-pairing control for a given matching: the same pairs (teacher heads, positions) and the same
    number of trained student heads, but each distinct student head replaced by a random distinct one."""
    import random

    from fastcd.match import Pair

    s_all = get_adapter(student).spec.all_heads()
    mine = list(dict.fromkeys(p.student for p in matching.pairs))
    repl = dict(zip(mine, random.Random(seed).sample(s_all, len(mine))))
    pairs = [Pair(p.teacher, repl[p.student], p.position, p.group, {}) for p in matching.pairs]
    return Matching(pairs, "random", {"seed": seed, "randomized_from": matching.method})


def check_vocabularies(teacher, student, teacher_tok=None, student_tok=None) -> None:
    """Teacher labels are token ids: the two models must share one vocabulary."""
    tv = getattr(getattr(teacher, "config", None), "vocab_size", None)
    sv = getattr(getattr(student, "config", None), "vocab_size", None)
    if teacher_tok is not None and student_tok is not None:
        if teacher_tok.get_vocab() != student_tok.get_vocab():
            raise ValueError("teacher and student vocabularies differ (their tokenizers map tokens to different "
                             "ids); circuit distillation on teacher labels needs one shared vocabulary")
    elif tv is not None and sv is not None and tv != sv:
        raise ValueError(f"teacher and student vocabularies differ: vocab_size {tv} vs {sv}")


class CircuitDistiller(nn.Module):
    """The loss of circuit distillation as a module a user drives in their own loop.

    ``loss, parts = cd(batch)``; ``cd.trainable_parameters()`` gives the slices (or, for full-model methods,
    all student parameters) for the optimizer.
    """

    def __init__(self, student: nn.Module, matching: Matching | None, *, teacher: nn.Module | None = None,
                 config: DistillConfig | None = None):
        super().__init__()
        self.config = (config or DistillConfig()).validate()
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never trained, never in state_dict
        method = self.config.method
        if method not in FULL_MODEL and (matching is None or len(matching) == 0):
            raise ValueError(f"method {method!r} needs a non-empty matching")
        self.matching = matching
        if matching is not None:
            _check_matching(matching, student, teacher)
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        if method in FULL_MODEL:
            for p in student.parameters():
                p.requires_grad_(True)
            self.slices = None
            self._params = [p for p in student.parameters()]
        else:
            self.slices = make_trainable(student, [p.student for p in matching.pairs], kv=self.config.kv)
            self._params = list(self.slices.params)
        if method in USES_CKA and self.config.cka_estimator == "biased":
            d = get_adapter(student).spec.d_head
            m = self.config.batch_size
            if m < 2 * d:
                import warnings

                warnings.warn(f"CKA batch m={m} with d_head={d}: two unrelated heads already score about "
                              f"{d / (m + d):.2f} with the biased estimator (about d/(m+d)), so the alignment "
                              "signal is the small distance above that; use batch_size >= 4 * d_head or "
                              "cka_estimator='unbiased'", stacklevel=2)

        self._forward_module = student  # the DDP wrapper under torchrun (see enable_ddp)
        self._ddp = False
        self._lam = None  # set by calibrate_lambda when config.lam == "auto"

    def enable_ddp(self, **ddp_kwargs) -> None:
        """Wrap the student in DistributedDataParallel (only the trainable slices are reduced) and compute the
        CKA term on the *global* batch: student and teacher z are all-gathered (with autograd) across ranks,
        so the result equals one process at the same global batch."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        # without CE, some slices get no gradient (o columns of the last matched head): DDP must look for them
        ddp_kwargs.setdefault("find_unused_parameters", self.config.method not in USES_CE)
        self._forward_module = DDP(self.student, **ddp_kwargs)
        self._ddp = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self._params

    @property
    def n_trainable(self) -> int:
        return sum(p.numel() for p in self._params)

    def _fused_alignment(self, cache, pairs, batch: DistillBatch, t_z: torch.Tensor, b: int):
        """One fused kernel launch per student layer, reading z ``[B, T, H*D]`` in place."""
        spec = get_adapter(self.student).spec
        dev = t_z.device
        total, ckas = t_z.new_zeros(()), torch.zeros(len(pairs), device=dev)
        for layer in sorted({p.student.layer for p in pairs}):
            idx = [i for i, p in enumerate(pairs) if p.student.layer == layer]
            z = cache.layer(layer)  # [B, T, H, D], on the forward path
            xs = z.reshape(b, z.shape[1], spec.n_heads * spec.d_head)
            pos_s = torch.stack([batch.student_pos[pairs[i].position].to(dev) for i in idx])  # [P_l, B]
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
                raise ValueError("the offline teacher cache holds no z; rebuild it with the matching")
            if need_logits and batch.teacher_logits is None:
                raise ValueError("KD needs teacher logits; rebuild the offline cache with logits=True")
            return batch.teacher_z, batch.teacher_labels, batch.teacher_logits
        if self.teacher is None:
            raise ValueError("no teacher: pass teacher= or batches from an offline teacher cache")
        pairs = self.matching.pairs if self.matching is not None else []
        t_heads = list(dict.fromkeys(p.teacher for p in pairs))
        dev = next(self.teacher.parameters()).device
        with torch.inference_mode():
            with capture_z(self.teacher, t_heads or None, detach=True) as cache:
                last, _ = logits_at(self.teacher, batch.teacher_pos["last"], input_ids=batch.teacher_ids.to(dev))
            b = batch.teacher_ids.shape[0]
            last = last.float()  # [B, V]: the lm_head ran on the last position only
            z = None
            if need_z:
                z = _gather_roles(cache, [p.teacher for p in pairs], [p.position for p in pairs],
                                  batch.teacher_pos, b).float()
        return (None if z is None else z.clone()), last.argmax(-1).clone(), last.clone()

    @property
    def lam(self) -> float:
        """The CKA weight in use: ``config.lam``, or the value :meth:`calibrate_lambda` set for ``lam="auto"``."""
        if self.config.method == "cka":
            return 1.0
        if self._lam is None:
            if self.config.lam == "auto":
                raise ValueError('lam="auto": call calibrate_lambda(batches) first (train_loop does)')
            return float(self.config.lam)
        return self._lam

    def terms(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        """The loss terms as tensors on the graph: ``ce``, ``align`` (sum over pairs of 1 - CKA), ``cka`` (per
        pair), ``kd``, each present when the method uses it."""
        cfg = self.config
        need_cka = cfg.method in USES_CKA and (cfg.method == "cka" or cfg.lam == "auto" or cfg.lam > 0)
        kd_w = cfg.effective_kd_weight
        t_z, t_labels, t_logits = self._teacher_signals(batch, need_cka, kd_w > 0)
        dev = next(self.student.parameters()).device
        b = batch.student_ids.shape[0]
        pairs = self.matching.pairs if self.matching is not None else []
        s_heads = list(dict.fromkeys(p.student for p in pairs)) if need_cka else []
        fused = (need_cka and not self._ddp and cfg.cka_estimator == "biased"
                 and choose_impl(dev, cfg.impl) == "triton")
        if fused:  # capture whole layers: their z views lie on the forward path, read in place by the kernel
            spec = get_adapter(self.student).spec
            s_heads = [h for h in spec.all_heads() if h.layer in {p.student.layer for p in pairs}]
        with capture_z(self.student, s_heads or [], detach=False) as cache:
            last, _ = logits_at(self._forward_module, batch.student_pos["last"],
                                input_ids=batch.student_ids.to(dev))  # [B, V]: lm_head on the last position only
        out: dict[str, torch.Tensor] = {}
        if cfg.method in USES_CE:
            target = batch.gold if cfg.labels == "gold" else t_labels
            out["ce"] = F.cross_entropy(last.float(), target.to(dev))
        if need_cka:
            t_z = t_z.to(dev)
            if fused:
                out["align"], out["cka"] = self._fused_alignment(cache, pairs, batch, t_z, b)
            else:
                xs = _gather_roles(cache, [p.student for p in pairs], [p.position for p in pairs],
                                   batch.student_pos, b)  # [P, B, d_s]
                if self._ddp:
                    xs, t_z = _all_gather_batch(xs), _all_gather_batch(t_z.detach())  # [P, B_global, d]
                out["align"], out["cka"] = cka_loss(xs, t_z, eps=cfg.eps, impl=cfg.impl, estimator=cfg.cka_estimator)
        if kd_w > 0:
            t = cfg.kd_temperature
            out["kd"] = F.kl_div(F.log_softmax(last.float() / t, -1), F.log_softmax(t_logits.to(dev) / t, -1),
                                 reduction="batchmean", log_target=True) * t * t
        return out

    def gradient_ratio(self, batch: DistillBatch) -> dict[str, float]:
        """Gradient norms of the CE and alignment terms on the trainable parameters for one batch:
        ``{"grad_ce", "grad_align", "ratio": grad_align / grad_ce, "cosine"}`` (lambda not applied). Leaves no
        gradient behind."""
        t = self.terms(batch)
        if "ce" not in t or "align" not in t:
            raise ValueError(f"gradient_ratio needs a method with both CE and alignment terms, not "
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


# ------------------------------------------------------------------------------------------------
# Offline teacher cache
# ------------------------------------------------------------------------------------------------
def build_teacher_cache(teacher: nn.Module, teacher_batch: EncodedBatch, matching: Matching | None, path: str, *,
                        shard_size: int = 1024, logits: bool = False, batch_size: int = 128,
                        progress: bool = False, tokenizer=None) -> str:
    """Precompute the teacher's matched heads' z (at each pair's role), labels and optionally last-token
    logits for every example, into ``path/shard_*.safetensors`` plus ``path/index.json``."""
    from safetensors.torch import save_file

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    pairs = matching.pairs if matching is not None else []
    dev = next(teacher.parameters()).device
    t_heads = list(dict.fromkeys(p.teacher for p in pairs))
    n = len(teacher_batch)
    zs, labels, lg = [], [], []
    from tqdm import tqdm

    with torch.inference_mode():
        for i in tqdm(range(0, n, batch_size), disable=not progress, desc=f"teacher cache ({n} prompts)"):
            sub = teacher_batch.index(range(i, min(i + batch_size, n)))
            with capture_z(teacher, t_heads or [], detach=True) as cache:
                last, _ = logits_at(teacher, sub.positions["last"], input_ids=sub.input_ids.to(dev))
            last = last.float().cpu()
            labels.append(last.argmax(-1))
            if logits:
                lg.append(last)
            if pairs:
                zs.append(_gather_roles(cache, [p.teacher for p in pairs], [p.position for p in pairs],
                                        sub.positions, len(sub)).float().cpu())
    labels_t = torch.cat(labels)
    z_t = torch.cat(zs, dim=1) if zs else None
    lg_t = torch.cat(lg) if lg else None
    shards = []
    for k, s in enumerate(range(0, n, shard_size)):
        e = min(n, s + shard_size)
        tensors = {"labels": labels_t[s:e].contiguous()}
        if z_t is not None:
            tensors["z"] = z_t[:, s:e].contiguous()
        if lg_t is not None:
            tensors["logits"] = lg_t[s:e].contiguous()
        name = f"shard_{k:05d}.safetensors"
        save_file(tensors, os.path.join(tmp, name))
        shards.append({"file": name, "start": s, "stop": e})
    index = {"n": n, "shards": shards, "pairs": [p.to_json() for p in pairs], "logits": logits,
             "vocab_sha": None if tokenizer is None else vocab_sha(tokenizer)}
    with open(os.path.join(tmp, "index.json"), "w") as f:
        json.dump(index, f, indent=2)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


class TeacherCache:
    """Reads an offline teacher cache; ``get(indices)`` returns ``(z [P, B, d] | None, labels [B], logits)``."""

    def __init__(self, path: str, matching: Matching | None = None):
        from safetensors.torch import load_file

        idx_path = os.path.join(path, "index.json")
        if not os.path.isfile(idx_path):
            raise FileNotFoundError(f"teacher_cache: {path!r} has no index.json; build it with build_teacher_cache")
        with open(idx_path) as f:
            self.index = json.load(f)
        # the cache holds the teacher side only: (teacher head, position) per pair, in order. Student heads may
        # differ (the ce+rand-cka control re-draws them over the same teacher heads).
        if matching is not None:
            want = [(str(p.teacher), p.position) for p in matching.pairs]
            have = [(d["teacher"], d["position"]) for d in self.index["pairs"]]
            if want != have:
                raise ValueError(f"teacher_cache {path!r} holds the teacher heads {have[:4]}..., the matching needs "
                                 f"{want[:4]}...; rebuild it with this matching")
        shards = [load_file(os.path.join(path, s["file"])) for s in self.index["shards"]]
        self.labels = torch.cat([s["labels"] for s in shards])
        self.z = torch.cat([s["z"] for s in shards], dim=1) if "z" in shards[0] else None
        self.logits = torch.cat([s["logits"] for s in shards]) if "logits" in shards[0] else None

    def __len__(self) -> int:
        return int(self.index["n"])

    def get(self, idx: torch.Tensor):
        return (None if self.z is None else self.z[:, idx], self.labels[idx],
                None if self.logits is None else self.logits[idx])


# ------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------
@dataclass
class DistillResult:
    student: nn.Module
    matching: Matching | None
    circuit: Circuit | None
    metrics: dict
    log: list = field(default_factory=list)
    correct: list = field(default_factory=list)  # per test example, for McNemar
    circuit_correct: list = field(default_factory=list)


def vocab_sha(tokenizer) -> str:
    """A hash of a tokenizer's token -> id map (what teacher labels mean)."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha1(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


def check_cache_vocabulary(path: str, student_tok, vocab_size: int | None = None) -> None:
    """A teacher cache's labels are teacher token ids: they must mean the same tokens for the student (checked
    from its index, before any model loads) and fit the student's vocabulary (once it is loaded)."""
    idx_path = os.path.join(path, "index.json")
    if not os.path.isfile(idx_path):
        raise FileNotFoundError(f"teacher_cache: {path!r} has no index.json; build it with build_teacher_cache")
    with open(idx_path) as f:
        index = json.load(f)
    sha = index.get("vocab_sha")
    if sha is not None and student_tok is not None and sha != vocab_sha(student_tok):
        raise ValueError(f"teacher_cache {path!r} was built with a tokenizer whose vocabulary differs from the "
                         "student's; its labels are token ids of another vocabulary")
    if vocab_size is not None:
        from safetensors import safe_open

        top = -1
        for sh in index["shards"]:
            with safe_open(os.path.join(path, sh["file"]), "pt") as f:
                top = max(top, int(f.get_tensor("labels").max()))
        if top >= vocab_size:
            raise ValueError(f"teacher_cache {path!r} holds label id {top}, outside the student's vocabulary of "
                             f"{vocab_size}; teacher and student must share one vocabulary")


def _nonfinite(parts: dict, params) -> str | None:
    """The first non-finite loss part, or "gradient" when a trainable gradient is NaN/inf; None when all finite."""
    for k, v in parts.items():
        if not math.isfinite(v):
            return f"loss term {k!r} ({v})"
    grads = [p.grad for p in params if p.grad is not None]
    if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):  # one device sync
        return "gradient"
    return None


def _make_batch(idx, s_enc: EncodedBatch, t_enc: EncodedBatch | None, cache: TeacherCache | None) -> DistillBatch:
    b = DistillBatch(s_enc.input_ids[idx], {k: v[idx] for k, v in s_enc.positions.items()}, s_enc.answer_ids[idx])
    if cache is not None:
        b.teacher_z, b.teacher_labels, b.teacher_logits = cache.get(idx)
    elif t_enc is not None:
        b.teacher_ids = t_enc.input_ids[idx]
        b.teacher_pos = {k: v[idx] for k, v in t_enc.positions.items()}
    return b


def _resolve_task(task_or_dataset, n_boxes: int | None = None):
    from fastcd.tasks import EntityTracking, TheoryOfMind, get_task

    if isinstance(task_or_dataset, str):
        return get_task(task_or_dataset)
    if isinstance(task_or_dataset, (EntityTracking, TheoryOfMind)):
        return task_or_dataset
    raise TypeError("task_or_dataset must be a task name ('entity-tracking', 'tom') or a task object, "
                    f"got {type(task_or_dataset).__name__}")


def _atomic_save(state: dict, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_loop(cd: CircuitDistiller, opt, gen: torch.Generator, cfg: DistillConfig, s_train: EncodedBatch,
               t_train: EncodedBatch | None = None, cache=None, *, step: int = 0, log: list | None = None,
               world: int = 1, rank: int = 0, eval_batch: EncodedBatch | None = None, on_step=None,
               desc: str | None = None) -> list[dict]:
    """The training loop that :func:`distill` and ``fastcd experiment`` share: ``cfg.steps`` AdamW steps on
    batches drawn with ``gen`` from ``s_train`` (teacher side from ``t_train`` and the live teacher, or from
    ``cache``: anything with ``get(idx) -> (z, labels, logits)``), the non-finite guard, a log row every
    ``cfg.log_every`` steps and ``val_accuracy`` on ``eval_batch`` every ``cfg.eval_every`` steps.
    ``on_step(step, log)`` runs after every step (checkpointing). Returns the log."""
    from tqdm import tqdm

    log = [] if log is None else log
    student = cd.student
    student.train()
    if cfg.lam == "auto" and cd._lam is None and cfg.method in USES_CKA:
        # calibrated on 3 batches from their own generator, so the training batches are those of a fixed lambda
        g = torch.Generator().manual_seed(cfg.seed + 7919)
        batches = [_make_batch(torch.randint(len(s_train), (cfg.batch_size,), generator=g).view(world, -1)[rank],
                               s_train, t_train, cache) for _ in range(3)]
        cd.calibrate_lambda(batches)
    n_skipped = 0
    t0 = time.time()
    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress or rank != 0,
               desc=desc or f"distill {cfg.method}")
    try:
        while step < cfg.steps:
            idx = torch.randint(len(s_train), (cfg.batch_size,), generator=gen)  # the global batch, same on all ranks
            idx = idx.view(world, -1)[rank]  # this rank's shard
            loss, parts = cd(_make_batch(idx, s_train, t_train, cache))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            bad = _nonfinite(parts, cd.trainable_parameters())
            if bad:
                msg = f"non-finite {bad} at step {step + 1} (method {cfg.method}, lr {cfg.lr})"
                if cfg.on_nonfinite == "stop":
                    raise FloatingPointError(f"distill: {msg}; stopped without saving a model (lower lr, check the "
                                             "inputs, or on_nonfinite='skip' to skip such steps)")
                n_skipped += 1
                opt.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                if n_skipped > max(3, cfg.steps // 10):
                    raise FloatingPointError(f"distill: {msg}; {n_skipped} steps skipped, more than 10% of the run")
                continue
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items() if k in ("ce", "cka_loss", "kd")})
            if step % cfg.log_every == 0 or step == cfg.steps:
                log.append({"step": step, **parts, "elapsed_s": round(time.time() - t0, 2)})
            if eval_batch is not None and cfg.eval_every and step % cfg.eval_every == 0:
                student.eval()
                if not log or log[-1]["step"] != step:  # an eval step that is not a log step gets its own row
                    log.append({"step": step, **parts, "elapsed_s": round(time.time() - t0, 2)})
                log[-1]["val_accuracy"] = sum(accuracy_per_example(student, eval_batch)) / len(eval_batch)
                student.train()
            if on_step is not None:
                on_step(step, log)
    finally:
        bar.close()
    return log


def distill(teacher, student, task_or_dataset, circuit: Circuit | None = None, matching: Matching | None = None,
            config: DistillConfig | None = None, *, teacher_tokenizer=None, student_tokenizer=None,
            teacher_cache: str | None = None) -> DistillResult:
    """Run circuit distillation end to end.

    Args:
        teacher, student: local HF directories or modules. ``teacher`` may be None with ``teacher_cache``.
        task_or_dataset: ``"entity-tracking"``, ``"tom"`` or a task object (``EntityTracking(n_boxes=5)``).
        circuit: the teacher circuit; discovered when None (path patching for entity tracking, mean-ablation
            patching for ToM).
        matching: teacher->student pairs; computed with ``config.matching_method`` when None.
        config: :class:`DistillConfig`.
        teacher_tokenizer, student_tokenizer: default: loaded from the model directories.
        teacher_cache: an offline teacher cache directory (see :func:`build_teacher_cache`).

    Returns:
        :class:`DistillResult` with the trained student (merged, ready for ``save_pretrained``), the matching,
        the circuit, metrics (student, student circuit and teacher accuracy, trainable share), and the log.
    """

    cfg = (config or DistillConfig()).validate()
    torch.manual_seed(cfg.seed)
    task = _resolve_task(task_or_dataset)
    if cfg.out and os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ValueError(f"out: {cfg.out!r} exists and is not a directory")
    for arg, what in ((student, "student"), (teacher, "teacher")):  # paths, architectures, weights: seconds
        if isinstance(arg, (str, os.PathLike)):
            check_model_path(arg, what)
    ckpt_path = os.path.join(cfg.out, "ckpt.pt") if cfg.out else None
    if ckpt_path and os.path.isfile(ckpt_path) and cfg.overwrite:
        os.remove(ckpt_path)
    if cfg.resume and not (ckpt_path and os.path.isfile(ckpt_path)):
        raise ValueError(f"resume: there is no checkpoint to resume in out={cfg.out!r} (ckpt.pt is written every "
                         "save_every steps)")
    s_tok = student_tokenizer or (load_tokenizer(student, "student") if isinstance(student, (str, os.PathLike))
                                  else None)
    t_tok = teacher_tokenizer or (load_tokenizer(teacher, "teacher") if isinstance(teacher, (str, os.PathLike))
                                  else None)
    if s_tok is None:
        raise ValueError("student_tokenizer is needed when student is a module")
    t_tok = t_tok or s_tok
    # word pools: only words that are single tokens for both tokenizers (says how many were dropped)
    task = adapt_task(task, [s_tok] if t_tok is s_tok else [s_tok, t_tok])
    # checks that need no weights, before any model loads (a 1.5B model takes minutes on a CPU)
    if t_tok is not s_tok:
        check_vocabularies(None, None, t_tok, s_tok)
    if matching is not None:
        matching.check_models(teacher, student)
        roles = set(task.roles) | {"last"}
        for p in matching.pairs:
            if p.position not in roles:
                raise ValueError(f"matching: pair {p.teacher} -> {p.student} is at position {p.position!r}; the "
                                 f"{task.name} task has the roles {sorted(roles)}")
    if teacher_cache is not None and teacher is None:
        check_cache_vocabulary(teacher_cache, s_tok)
    if circuit is not None and teacher is not None:
        t_spec = spec_of(teacher)
        for h in circuit.unique_heads():
            t_spec.check_head(h, "circuit head")
    student = load_model(student, device=cfg.device, what="student")
    teacher = None if teacher is None else load_model(teacher, dtype=cfg.teacher_dtype, device=cfg.device,
                                                      what="teacher")
    if teacher is None and teacher_cache is None:
        raise ValueError("teacher is None: pass a teacher or a teacher_cache")
    if teacher is not None:
        check_vocabularies(teacher, student, t_tok, s_tok)
    s_vocab = get_adapter(student).spec.vocab_size
    if teacher is None:  # the vocabulary hash was checked before loading; now the label ids against the student
        check_cache_vocabulary(teacher_cache, None, s_vocab)
    top = max(s_tok.get_vocab().values())
    if top >= s_vocab:
        raise ValueError(f"student_tokenizer has token ids up to {top}, the student's embedding has "
                         f"{s_vocab} rows: they do not belong together")
    # what a checkpoint must agree on to be resumed (the matching is added once it is known)
    identity = {"config": _cfg_key(cfg), "teacher": _fingerprint(teacher), "student": _fingerprint(student),
                "task": f"{type(task).__name__}:{_sha(vars(task))}",
                "teacher_cache": _fingerprint(teacher_cache), "matching": None}
    if ckpt_path and os.path.isfile(ckpt_path) and matching is not None:  # fail before any model loads
        _load_checkpoint(ckpt_path, {**identity, "matching": _sha(matching.to_json())}, cfg)
    train_ex = task.generate(cfg.n_train, seed=cfg.seed, split="train")
    # one fixed test set for every method and seed, so that runs compare paired on the same prompts
    test_pairs = task.pairs(cfg.n_eval, seed=TEST_SEED, split="test")
    s_train = task.encode(train_ex, s_tok)
    t_train = task.encode(train_ex, t_tok) if teacher is not None else None
    s_test = task.encode([p.clean for p in test_pairs], s_tok)
    s_ref = task.encode([p.corrupt for p in test_pairs], s_tok)

    # --- circuit and matching -------------------------------------------------------------------------
    needs_matching = cfg.method not in FULL_MODEL or cfg.method == "ce+rand-cka"
    if needs_matching and matching is None:
        if teacher is None:
            raise ValueError("matching must be given when training from a teacher cache")
        dpairs = task.pairs(cfg.n_discovery, seed=cfg.seed, split="val")
        t_clean = task.encode([p.clean for p in dpairs], t_tok)
        t_corrupt = task.encode([p.corrupt for p in dpairs], t_tok)
        if circuit is None:
            circuit = discover_circuit(teacher, task, t_clean, t_corrupt, cfg)
        if cfg.method == "ce+rand-cka":
            matching = match_random(circuit, student, seed=cfg.seed)
        else:
            inp = MatchInputs(teacher, student, circuit, t_clean, task.encode([p.clean for p in dpairs], s_tok),
                              t_corrupt, task.encode([p.corrupt for p in dpairs], s_tok))
            kw = {"progress": cfg.progress} if cfg.matching_method in ("ablation", "combined") else {}
            matching = match(inp, cfg.matching_method, **kw)
    elif cfg.method == "ce+rand-cka" and matching is not None and matching.method != "random":
        matching = randomize_students(matching, student, seed=cfg.seed)
    if matching is not None:
        _check_matching(matching, student, teacher)

    cache = TeacherCache(teacher_cache, matching if cfg.method in USES_CKA else None) if teacher_cache else None
    if cache is not None and len(cache) != cfg.n_train:
        raise ValueError(f"teacher_cache holds {len(cache)} examples, config.n_train is {cfg.n_train}")

    cd = CircuitDistiller(student, matching if cfg.method not in FULL_MODEL else None, teacher=teacher, config=cfg)
    world, rank = 1, 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        if cfg.batch_size % world:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the world size {world}")
        if world > 1:
            cd.enable_ddp()
    opt = torch.optim.AdamW(cd.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, log = 0, []
    ckpt = os.path.join(cfg.out, "ckpt.pt") if cfg.out else None
    base_accuracy = None
    if ckpt and os.path.isfile(ckpt):
        identity["matching"] = _sha(matching.to_json()) if matching is not None else None
        state = _load_checkpoint(ckpt, identity, cfg)
        with torch.no_grad():
            for p, v in zip(cd.trainable_parameters(), state["params"]):
                p.copy_(v)
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])  # dropout and any other use of the global generator
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if state.get("python_rng") is not None:
            random.setstate(state["python_rng"])
        step, log = state["step"], state["log"]
        if state.get("n_eval") == cfg.n_eval:
            base_accuracy = state.get("base_accuracy")
        cd._lam = state.get("lam")
    identity["matching"] = _sha(matching.to_json()) if matching is not None else None
    if base_accuracy is None:  # the untrained student, reported beside the trained one
        was = student.training
        student.eval()
        base_accuracy = sum(accuracy_per_example(student, s_test)) / len(s_test)
        student.train(was)

    def save(step_, log_):
        if ckpt and rank == 0 and cfg.save_every and (step_ % cfg.save_every == 0 or step_ == cfg.steps):
            os.makedirs(cfg.out, exist_ok=True)
            write_json_atomic({"identity": identity, "step": step_}, os.path.join(cfg.out, "manifest.json"))
            _atomic_save({"params": [p.detach().clone() for p in cd.trainable_parameters()],
                          "optimizer": opt.state_dict(), "generator": gen.get_state(),
                          "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                          "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                          "step": step_, "log": log_,
                          "identity": identity, "base_accuracy": base_accuracy, "n_eval": cfg.n_eval,
                          "lam": cd._lam}, ckpt)

    s_val = None
    if cfg.eval_every:  # accuracy during training is measured on validation prompts, never on the test set
        s_val = task.encode(task.generate(cfg.n_val, seed=cfg.seed, split="val"), s_tok)
    try:
        log = train_loop(cd, opt, gen, cfg, s_train, t_train, cache, step=step, log=log, world=world, rank=rank,
                         eval_batch=s_val, on_step=save)
    except BaseException:
        if cd.slices is not None:  # leave the student a plain model (no parametrisations) for the caller
            merge(cd.slices)
        raise
    student.eval()
    if cd.slices is not None:
        merge(cd.slices)
    for p in student.parameters():
        p.requires_grad_(False)
    correct = accuracy_per_example(student, s_test)
    metrics = {"method": cfg.method, "student_accuracy": sum(correct) / len(correct),
               "student_base_accuracy": base_accuracy,
               "trainable_params": cd.n_trainable,
               "lam_effective": cd.lam if cfg.method in USES_CKA else None,
               "trainable_fraction": cd.n_trainable / sum(p.numel() for p in student.parameters())}
    circ_correct = []
    if matching is not None:
        means = mean_z(student, s_ref.input_ids.to(next(student.parameters()).device))
        live = [(p.student, p.position) for p in matching.pairs]
        circ_correct = circuit_correct(student, s_test, means, live, batch_size=128)
        metrics["student_circuit_accuracy"] = sum(circ_correct) / len(circ_correct)
        s_spec = get_adapter(student).spec
        trained = s_spec.n_total_heads if cfg.method in FULL_MODEL else len(matching.student_heads())
        metrics["trained_heads"] = trained
        metrics["trained_heads_fraction"] = trained / s_spec.n_total_heads
    if teacher is not None:
        t_test = task.encode([p.clean for p in test_pairs], t_tok)
        metrics["teacher_accuracy"] = sum(accuracy_per_example(teacher, t_test)) / len(t_test)
    metrics["world_size"] = world
    result = DistillResult(student, matching, circuit, metrics, log, correct, circ_correct)
    if cfg.out and rank == 0:
        save_result(result, cfg, s_tok)
    if world > 1:
        torch.distributed.barrier()
    return result


def _cfg_key(cfg: DistillConfig) -> dict:
    """The config fields a checkpoint depends on: not where it is written, how often it logs, evaluates or saves,
    nor ``steps`` (a run may be extended)."""
    d = asdict(cfg)
    for k in ("progress", "out", "overwrite", "resume", "steps", "log_every", "eval_every", "save_every", "n_eval",
              "n_val", "device", "impl"):
        d.pop(k, None)
    d["discovery_k"] = list(d["discovery_k"])
    return d


def _sha(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fingerprint(x) -> str | None:
    """A model or cache path (resolved), or for a module: its class, config and first parameter values."""
    if x is None:
        return None
    if isinstance(x, (str, os.PathLike)):
        p = os.fspath(x)
        return os.path.realpath(p) if os.path.exists(p) else p
    h = hashlib.sha1(type(x).__name__.encode())
    conf = getattr(x, "config", None)
    if conf is not None and hasattr(conf, "to_dict"):
        h.update(json.dumps(conf.to_dict(), sort_keys=True, default=str).encode())
    for p in list(x.parameters())[:4]:
        h.update(p.detach().float().flatten()[:4096].cpu().numpy().tobytes())
    return "module:" + h.hexdigest()[:16]


def _load_checkpoint(path: str, identity: dict, cfg: DistillConfig) -> dict:
    """Read ``ckpt.pt`` and check that it belongs to this run: one line naming every differing field."""
    try:
        state = torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated zip, pickle garbage, ...: one line
        raise ValueError(f"out: {path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]}); delete it, or pass overwrite=True (--overwrite) to "
                         "start over") from None
    old = state.get("identity")
    if not isinstance(old, dict):
        raise ValueError(f"out: {path} was written by an older fastcd without a run identity; use another out or "
                         "overwrite=True (--overwrite)")
    diffs = []
    for k in identity:
        if k == "config":
            for f in sorted(set(old["config"]) | set(identity["config"])):
                if old["config"].get(f) != identity["config"].get(f):
                    diffs.append((f, old["config"].get(f), identity["config"].get(f)))
        elif old.get(k) != identity[k] and not (k == "matching" and identity[k] is None):
            diffs.append((k, old.get(k), identity[k]))
    if diffs:
        detail = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diffs[:4])
        raise ValueError(f"out: {path} belongs to a run that differs in {[d[0] for d in diffs]} ({detail}); use "
                         "another out, or overwrite=True (--overwrite) to start over")
    if state["step"] > cfg.steps:
        raise ValueError(f"out: {path} is at step {state['step']}, past steps={cfg.steps}; raise steps to extend "
                         "the run, or overwrite=True (--overwrite) to start over")
    return state


def discover_circuit(teacher, task, t_clean: EncodedBatch, t_corrupt: EncodedBatch, cfg: DistillConfig) -> Circuit:
    """The default discovery (``cfg.discovery``): ``roles`` = position-aware mean-ablation patching at each of the
    task's position roles (entity tracking; for ToM, the top-n heads under mean ablation at the last token, the
    position the CKA term aligns), or ``path`` = the four-group path patching of Prakash et al. (entity
    tracking). On a 2-layer teacher path patching cannot find the detector and reader groups (they need heads
    below the transmitters), hence the default."""
    from fastcd import discover as D
    from fastcd.path_patching import entity_tracking_circuit

    if cfg.discovery not in ("roles", "path"):
        raise ValueError(f"discovery must be 'roles' or 'path', got {cfg.discovery!r}")
    if cfg.discovery == "path":
        if task.name != "entity-tracking":
            raise ValueError("discovery='path' is defined for entity tracking only")
        circuit, _ = entity_tracking_circuit(teacher, t_clean, t_corrupt, k=tuple(cfg.discovery_k),
                                             progress=cfg.progress)
        return circuit
    src = D.make_source(teacher, t_clean, "mean", corrupt=t_corrupt)
    if task.name == "entity-tracking":
        circuit, _ = D.circuit_by_roles(teacher, t_clean, src, task.roles, task=task.name, progress=cfg.progress)
        return circuit
    res = D.patch_heads_batched(teacher, t_clean, src, metric="prob", position="last", progress=cfg.progress)
    n = cfg.discovery_top_n or max(1, res.scores.numel() // 2)
    return D.circuit_from_scores(res, n, task=task.name, group="heads", position="last")


def save_result(result: DistillResult, cfg: DistillConfig, tokenizer=None) -> str:
    """``OUT/student`` (save_pretrained), ``OUT/matching.json``, ``OUT/circuit.json``, ``OUT/log.json``."""
    out = cfg.out
    os.makedirs(out, exist_ok=True)
    sdir = os.path.join(out, "student")
    tmp = sdir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    result.student.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(sdir, ignore_errors=True)
    os.replace(tmp, sdir)
    if result.matching is not None:
        result.matching.save(os.path.join(out, "matching.json"))
    if result.circuit is not None and result.circuit.heads:
        result.circuit.save(os.path.join(out, "circuit.json"))
    with open(os.path.join(out, "log.json"), "w") as f:
        json.dump({"config": _cfg_key(cfg), "metrics": result.metrics, "log": result.log}, f, indent=2)
    return out


__all__ = ["CircuitDistiller", "DistillBatch", "DistillConfig", "DistillResult", "METHODS", "TeacherCache",
           "build_teacher_cache", "check_cache_vocabulary", "check_vocabularies", "distill", "save_result",
           "vocab_sha"]
