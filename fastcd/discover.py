"""Circuit discovery in the teacher: per-head patching scores, batched exact patching, attribution
patching, circuits and their evaluation (PAPER.md §2).

Scores follow Prakash et al. (2024): the mean over examples of the relative change of the metric,
``(m_patch - m_clean) / m_clean``; the most negative heads matter most. Circuit evaluation follows
their ``circuit_eval.ipynb`` (github.com/Nix07/finetuning): per-position means, circuit heads live only
at their group's position, every other (head, position) mean-ablated, a random circuit of the same size
averaged over draws, faithfulness = circuit / full.
"""

from __future__ import annotations

import math
import os
import random
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from fastcd.hooks import capture_z, intervene, mean_z, run_with_z
from fastcd.io import read_json, write_json_atomic
from fastcd.models import Head, ModelSpec, get_adapter, logits_at, rows_for_budget
from fastcd.tasks.base import EncodedBatch

METRICS = ("prob", "logprob", "logit_diff", "accuracy", "candidate_accuracy")
SCORINGS = ("vocab", "candidates")
MODES = ("mean", "corrupt", "zero")
ALL = "all"  # position role: every position


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------
def metric_values(logits: torch.Tensor, batch: EncodedBatch, metric: str,
                  distractor_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example metric at each example's last position.

    Args:
        logits: ``[n, T, vocab]``, or ``[n, vocab]`` already taken at each example's last position (what
            :func:`fastcd.models.logits_at` returns).
        metric: ``prob`` (probability of the answer), ``logprob``, ``logit_diff`` (answer minus
            distractor logit; needs ``distractor_ids``), ``accuracy`` (argmax over the vocabulary is the answer)
            or ``candidate_accuracy`` (argmax among the answers the prompt allows, ``batch.candidate_ids``: the
            in-context objects for entity tracking, the story's drinks and "unknown" for ToM).

    Returns:
        ``[n]`` float tensor.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if bool((batch.answer_ids < 0).any()):
        raise ValueError("batch has examples without an answer (corrupt prompts?); metrics need clean examples")
    n = logits.shape[0]
    if logits.dim() == 2:
        last = logits.float()
    else:
        last = logits[torch.arange(n), batch.positions["last"].to(logits.device)].float()  # [n, vocab]
    ans = batch.answer_ids.to(logits.device)
    if metric == "prob":
        return last.softmax(-1)[torch.arange(n), ans]
    if metric == "logprob":
        return last.log_softmax(-1)[torch.arange(n), ans]
    if metric == "accuracy":
        return (last.argmax(-1) == ans).float()
    if metric == "candidate_accuracy":
        if batch.candidate_ids is None:
            raise ValueError("metric='candidate_accuracy' needs batch.candidate_ids (encode with the task's encode())")
        cand = batch.candidate_ids.to(logits.device)
        return (cand[torch.arange(n), last.gather(1, cand).argmax(-1)] == ans).float()
    if distractor_ids is None:
        distractor_ids = batch.distractor_ids
    if distractor_ids is None:
        raise ValueError("metric='logit_diff' needs distractor_ids (one alternative answer token per example)")
    d = distractor_ids.to(logits.device)
    return last[torch.arange(n), ans] - last[torch.arange(n), d]


@torch.no_grad()
def accuracy_per_example(model: nn.Module, batch: EncodedBatch, batch_size: int = 256, *,
                         scoring: str = "vocab") -> list[bool]:
    """Whether the argmax at each example's last position is its answer: over the whole vocabulary
    (``scoring="vocab"``) or among the answers the prompt allows (``scoring="candidates"``)."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    metric = "accuracy" if scoring == "vocab" else "candidate_accuracy"
    vals, _ = _clean_metric(model, batch, metric, None, batch_size)
    return vals.bool().tolist()


def relative_change(patched: torch.Tensor, clean: torch.Tensor, metric: str, relative: bool) -> torch.Tensor:
    """Score of a patch: per-example ``(p - c) / c`` for ``prob`` (Prakash), else on the means."""
    if not relative:
        return (patched - clean).mean(-1)
    if metric == "prob":
        zero = (clean == 0).nonzero()
        if zero.numel():
            raise ValueError(
                f"relative metric 'prob': the clean probability is 0 for example {int(zero[0, 0])}; "
                "use relative=False or metric='logprob'"
            )
        return ((patched - clean) / clean).mean(-1)
    base = clean.mean()
    if float(base) == 0.0:
        raise ValueError(f"relative metric {metric!r}: the clean mean is 0; use relative=False")
    return (patched.mean(-1) - base) / base.abs()


# ------------------------------------------------------------------------------------------------
# Sources of patched values
# ------------------------------------------------------------------------------------------------
@dataclass
class PatchSource:
    """Where patched z comes from: per-position ``means`` [L, T, H, D] (mean ablation), the ``corrupt`` run's
    z [L, n, T, H, D] (clean -> corrupt patching), or zeros."""

    mode: str
    z: torch.Tensor | None  # means [L, T, H, D] or corrupt z [L, n, T, H, D]

    def rows(self, layer: int, example_idx: torch.Tensor, t: int, spec: ModelSpec) -> torch.Tensor:
        """Values for the given examples at ``layer``: ``[rows, T, H, D]``."""
        if self.mode == "zero":
            return torch.zeros(1, t, spec.n_heads, spec.d_head)
        if self.mode == "mean":
            return self.z[layer][None]
        return self.z[layer][example_idx]


def make_source(model: nn.Module, clean: EncodedBatch, mode: str, *, corrupt: EncodedBatch | None = None,
                reference: EncodedBatch | None = None, batch_size: int = 64) -> PatchSource:
    """Build the patch source. ``mean``: means over ``reference`` (default: ``corrupt``, else ``clean``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = next(model.parameters()).device
    if mode == "zero":
        return PatchSource("zero", None)
    if mode == "mean":
        ref = reference or corrupt or clean
        _check_aligned(clean, ref, "reference")
        return PatchSource("mean", mean_z(model, ref.input_ids.to(device), batch_size=batch_size))
    if corrupt is None:
        raise ValueError("mode='corrupt' needs corrupt prompts (corrupt=...)")
    _check_aligned(clean, corrupt, "corrupt")
    if corrupt.input_ids.shape[0] != clean.input_ids.shape[0]:
        raise ValueError(f"corrupt has {len(corrupt)} examples, clean has {len(clean)}; they must pair up")
    zs = []
    for i in range(0, len(corrupt), batch_size):
        zs.append(run_with_z(model, corrupt.input_ids[i : i + batch_size].to(device), logits=False)[1])
    return PatchSource("corrupt", torch.cat(zs, dim=1))


def _check_aligned(a: EncodedBatch, b: EncodedBatch, name: str) -> None:
    if not a.equal_length or not b.equal_length or a.input_ids.shape[1] != b.input_ids.shape[1]:
        raise ValueError(
            f"clean and {name} prompts must all have one token length where positions align "
            f"(got lengths {a.attention_mask.sum(1).unique().tolist()} and {b.attention_mask.sum(1).unique().tolist()})"
        )


def _positions(batch: EncodedBatch, role: str | None) -> torch.Tensor | None:
    """``[n, 1]`` per-example positions of ``role``, or None for every position."""
    if role is None or role == ALL:
        return None
    if role not in batch.positions:
        raise ValueError(f"position role {role!r} is not in this task's roles {sorted(batch.positions)} or 'all'")
    return batch.positions[role][:, None]


def _pos_mask(pos: torch.Tensor | None, rows: int, t: int) -> torch.Tensor:
    """bool ``[rows, T]``: where to patch."""
    if pos is None:
        return torch.ones(rows, t, dtype=torch.bool)
    m = torch.zeros(rows, t, dtype=torch.bool)
    m[torch.arange(rows)[:, None], pos] = True
    return m


# ------------------------------------------------------------------------------------------------
# Exact per-head patching
# ------------------------------------------------------------------------------------------------
@dataclass
class PatchingResult:
    scores: torch.Tensor  # [n_layers, n_heads]
    baseline: float  # mean clean metric
    forwards: int  # model forward launches used
    metric: str
    mode: str
    position: str | None

    def top(self, k: int, most_negative: bool = True, *, strict: bool = False) -> list[tuple[Head, float]]:
        """The ``k`` best-scoring heads (most negative first by default); NaN scores (no path) never rank.

        ``strict=True`` keeps only heads whose score has the wanted sign (patching them hurts the metric),
        so fewer than ``k`` may come back.
        """
        flat = self.scores.flatten()
        n_valid = int((~torch.isnan(flat)).sum())
        if not isinstance(k, int) or not 1 <= k <= n_valid:
            raise ValueError(f"k must be in 1..{n_valid} (the number of scored heads), got {k}")
        key = flat.nan_to_num(nan=float("inf") if most_negative else float("-inf"))
        order = torch.argsort(key, descending=not most_negative, stable=True)[:k]
        h = self.scores.shape[1]
        out = [(Head(int(i) // h, int(i) % h), float(flat[i])) for i in order]
        if strict:
            out = [(hd, v) for hd, v in out if (v < 0 if most_negative else v > 0)]
        return out


@torch.no_grad()
def _clean_metric(model, clean, metric, distractor_ids, batch_size) -> tuple[torch.Tensor, int]:
    device = next(model.parameters()).device
    vals, fw = [], 0
    for i in range(0, len(clean), batch_size):
        sub = clean.index(range(i, min(i + batch_size, len(clean))))
        logits, _ = logits_at(model, sub.positions["last"], input_ids=sub.input_ids.to(device))
        fw += 1
        d = None if distractor_ids is None else distractor_ids[i : i + batch_size]
        vals.append(metric_values(logits, sub, metric, d).cpu())
    return torch.cat(vals), fw


@torch.no_grad()
def _clean_metric_and_resid(model, clean, metric, distractor_ids, batch_size, prefix: int = 0):
    """Clean metric and the clean residual stream at the input of every decoder layer ``[L, n, T, d]``, from one
    pass; with ``prefix > 0`` also the clean keys/values of the first ``prefix`` tokens of every layer
    ``[(K [n, kv, prefix, d_head], V), ...]`` (copied, so the rest of the cache is freed with each chunk)."""
    spec = get_adapter(model).spec
    device = next(model.parameters()).device
    vals, hs, kvs, fw = [], [], [], 0
    for i in range(0, len(clean), batch_size):
        sub = clean.index(range(i, min(i + batch_size, len(clean))))
        logits, out = logits_at(model, sub.positions["last"], input_ids=sub.input_ids.to(device),
                                output_hidden_states=True, use_cache=prefix > 0)
        fw += 1
        d = None if distractor_ids is None else distractor_ids[i : i + batch_size]
        vals.append(metric_values(logits, sub, metric, d).cpu())
        hs.append(torch.stack(out.hidden_states[: spec.n_layers]))  # hidden_states[l] is layer l's input
        if prefix > 0:
            # causal attention: the first `prefix` positions' keys/values are the clean run's
            cache = getattr(out, "cache", None) or out.past_key_values
            kvs.append([(layer.keys[:, :, :prefix].clone(), layer.values[:, :, :prefix].clone())
                        for layer in cache.layers])
        del out  # the full logits and cache of this chunk
    kv = ([(torch.cat([p[l][0] for p in kvs]), torch.cat([p[l][1] for p in kvs])) for l in range(len(kvs[0]))]
          if kvs else None)
    return torch.cat(vals), fw, torch.cat(hs, dim=1), kv


def _prefix_reuse_ok(adapter, t: int) -> bool:
    """Prefix reuse rebuilds a plain full-attention KV cache: not for sliding windows shorter than the prompt."""
    cfg = adapter.config
    window = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", window is not None)
    return not (uses_window and window is not None and window < t)


def _cache_kwarg(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _rows_cache(prefix_kv, ex_idx: torch.Tensor):
    from transformers import DynamicCache

    cache = DynamicCache()
    for l, (k, v) in enumerate(prefix_kv):
        idx = ex_idx.to(k.device)
        cache.update(k[idx], v[idx], l)
    return cache


def _shift_last(batch: EncodedBatch, p0: int) -> EncodedBatch:
    """The same batch with ``last`` counted from position ``p0`` (for logits of a suffix run)."""
    import dataclasses

    return dataclasses.replace(batch, positions={**batch.positions, "last": batch.positions["last"] - p0})


def _check_common(clean: EncodedBatch, metric: str, batch_size: int) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not clean.equal_length:
        raise ValueError("clean prompts must all have one token length where positions align")


@torch.no_grad()
def patch_heads_loop(model: nn.Module, clean: EncodedBatch, source: PatchSource, *, metric: str = "prob",
                     relative: bool = True, position: str | None = None, distractor_ids=None,
                     batch_size: int = 64, heads: list[Head] | None = None, progress: bool = False
                     ) -> PatchingResult:
    """Reference: one forward per head (and per chunk of examples). The specification of the batched path."""
    from tqdm import tqdm

    _check_common(clean, metric, batch_size)
    spec = get_adapter(model).spec
    device = next(model.parameters()).device
    base, fw = _clean_metric(model, clean, metric, distractor_ids, batch_size)
    heads = heads or spec.all_heads()
    scores = torch.full((spec.n_layers, spec.n_heads), float("nan"))
    n, t = clean.input_ids.shape
    pos = _positions(clean, position)
    for head in tqdm(heads, disable=not progress, desc="patching (loop)"):
        vals = []
        for i in range(0, n, batch_size):
            idx = torch.arange(i, min(i + batch_size, n))
            mask = torch.zeros(len(idx), t, spec.n_heads, dtype=torch.bool)
            mask[:, :, head.head] = _pos_mask(None if pos is None else pos[idx], len(idx), t)
            value = source.rows(head.layer, idx, t, spec)
            with intervene(model, {head.layer: (mask, value)}):
                logits, _ = logits_at(model, clean.positions["last"][idx], input_ids=clean.input_ids[idx].to(device))
            fw += 1
            d = None if distractor_ids is None else distractor_ids[idx]
            vals.append(metric_values(logits, clean.index(idx), metric, d).cpu())
        scores[head.layer, head.head] = relative_change(torch.cat(vals), base, metric, relative)
    return PatchingResult(scores, float(base.mean()), fw, metric, source.mode, position)


@torch.no_grad()
def patch_heads_batched(model: nn.Module, clean: EncodedBatch, source: PatchSource, *, metric: str = "prob",
                        relative: bool = True, position: str | None = None, distractor_ids=None,
                        max_batch: int | None = None, batch_size: int = 64, heads: list[Head] | None = None,
                        skip_layers: bool = True, reuse_prefix: bool = True, progress: bool = False
                        ) -> PatchingResult:
    """Exact per-head patching with many head interventions per forward.

    Rows ``(head k, example i)`` are stacked along the batch, each row patching only its own head, in
    forwards of at most ``max_batch`` rows (the memory bound; None: as many as ``FASTCD_MEMORY_BUDGET``,
    default 2 GiB, allows, :func:`fastcd.models.rows_for_budget`). Same scores as :func:`patch_heads_loop`.
    With ``skip_layers`` (Llama-like models), a forward that patches layer l starts from the clean residual
    stream at layer l instead of recomputing layers 0..l-1, which are unchanged by the patch; the clean
    residual streams are kept, ``[n_layers, n, T, d_model]``. With ``reuse_prefix`` and a position role, the
    tokens before the earliest patched position are not recomputed either: their clean keys and values are
    reused as a KV cache and only the suffix runs.
    """
    from tqdm import tqdm

    _check_common(clean, metric, batch_size)
    if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be an integer >= 1 or None (from the memory budget), got {max_batch!r}")
    adapter = get_adapter(model)
    spec = adapter.spec
    device = next(model.parameters()).device
    heads = heads or spec.all_heads()
    n, t = clean.input_ids.shape
    if max_batch is None:
        max_batch = rows_for_budget(model, t)
    pos = _positions(clean, position)
    skip = skip_layers and adapter.supports_layer_skip
    # Rows are ordered by the patched head's layer, so each forward patches heads of one layer only and,
    # with layer skipping, starts from the cached clean residual stream at that layer.
    order = sorted(range(len(heads)), key=lambda k: (heads[k].layer, k))
    by_layer: dict[int, list[int]] = {}
    for k in order:
        by_layer.setdefault(heads[k].layer, []).append(k)
    p0 = int(pos.min()) if (skip and reuse_prefix and pos is not None and _prefix_reuse_ok(adapter, t)) else 0
    if skip:
        base, fw, resid, prefix_kv = _clean_metric_and_resid(model, clean, metric, distractor_ids, batch_size,
                                                             prefix=p0)
        shifted = _shift_last(clean, p0) if p0 > 0 else None
    else:
        base, fw = _clean_metric(model, clean, metric, distractor_ids, batch_size)
    out = torch.empty(len(heads), n)
    if progress:
        n_fw = sum(-(-len(ks) * n // max_batch) for ks in by_layer.values())
        print(f"fastcd: batched patching: {len(heads)} heads x {n} prompts = {len(heads) * n:,} rows in about {n_fw} "
              f"forwards of <= {max_batch} rows" + (", each from layer l on (layer skipping)" if skip else ""),
              file=sys.stderr)
    bar = tqdm(total=len(heads) * n, disable=not progress, desc="patching (batched)")
    for layer, ks in by_layer.items():
        total = len(ks) * n
        for start in range(0, total, max_batch):
            rows = torch.arange(start, min(start + max_batch, total))
            k_local, ex_idx = rows // n, rows % n  # which head (of this layer), which example
            r = len(rows)
            pm = _pos_mask(None if pos is None else pos[ex_idx], r, t)  # [rows, T]
            mask = torch.zeros(r, t, spec.n_heads, dtype=torch.bool)
            for j in k_local.unique().tolist():
                sel = k_local == j
                mask[sel, :, heads[ks[j]].head] = pm[sel]
            if p0 > 0:
                # Positions before p0 are untouched by the patch: run only the suffix, on the clean prefix's
                # keys and values, from the clean residual stream at this layer.
                plan = {layer: (mask[:, p0:], source.rows(layer, ex_idx, t, spec)[:, p0:])}
                kw = {_cache_kwarg(model): _rows_cache(prefix_kv, ex_idx),
                      "position_ids": torch.arange(p0, t, device=device)[None].expand(r, -1)}
                sub = shifted.index(ex_idx)
                with intervene(model, plan), adapter.start_at_layer(layer):
                    logits, _ = logits_at(model, sub.positions["last"],
                                          inputs_embeds=resid[layer][ex_idx, p0:].to(device), use_cache=True, **kw)
            else:
                plan = {layer: (mask, source.rows(layer, ex_idx, t, spec))}
                sub = clean.index(ex_idx)
                with intervene(model, plan):
                    if skip:
                        with adapter.start_at_layer(layer):
                            logits, _ = logits_at(model, sub.positions["last"],
                                                  inputs_embeds=resid[layer][ex_idx].to(device))
                    else:
                        logits, _ = logits_at(model, sub.positions["last"], input_ids=sub.input_ids.to(device))
            fw += 1
            d = None if distractor_ids is None else distractor_ids[ex_idx]
            vals = metric_values(logits, sub, metric, d).cpu()
            for j in k_local.unique().tolist():
                sel = k_local == j
                out[ks[j], ex_idx[sel]] = vals[sel]
            bar.update(r)
    bar.close()
    scores = torch.full((spec.n_layers, spec.n_heads), float("nan"))
    per_head = out
    for k, head in enumerate(heads):
        scores[head.layer, head.head] = relative_change(per_head[k], base, metric, relative)
    return PatchingResult(scores, float(base.mean()), fw, metric, source.mode, position)


# ------------------------------------------------------------------------------------------------
# Attribution patching
# ------------------------------------------------------------------------------------------------
def attribution_patching(model: nn.Module, clean: EncodedBatch, source: PatchSource, *, metric: str = "prob",
                         relative: bool = True, position: str | None = None, distractor_ids=None,
                         batch_size: int = 64, recheck_top_k: int = 0, progress: bool = False
                         ) -> PatchingResult:
    """Linearised patching for every head at once: ``score ≈ grad_z(metric) · (z_source - z_clean)``.

    One clean forward with the graph, the source (corrupt forward or precomputed means) and one backward
    per chunk. For the relative ``prob`` score, ``(p' - p) / p ≈ grad(log p) · Δz``, so the log-probability
    gradient is used. ``recheck_top_k`` re-scores the k most negative heads exactly.
    """
    _check_common(clean, metric, batch_size)
    if metric in ("accuracy", "candidate_accuracy"):
        raise ValueError(f"metric={metric!r} has no gradient; use prob, logprob or logit_diff for attribution")
    spec = get_adapter(model).spec
    device = next(model.parameters()).device
    n, t = clean.input_ids.shape
    pos = _positions(clean, position)
    base, fw = _clean_metric(model, clean, metric, distractor_ids, batch_size)
    grad_metric = "logprob" if (metric == "prob" and relative) else metric
    total = torch.zeros(spec.n_layers, spec.n_heads)
    was_training = model.training
    model.eval()
    from tqdm import tqdm

    if progress:
        print(f"fastcd: attribution patching: {spec.n_total_heads} heads, {n} prompts: {-(-n // batch_size)} forward + "
              f"backward passes of <= {batch_size} prompts", file=sys.stderr)
    for i in tqdm(range(0, n, batch_size), disable=not progress, desc="attribution patching"):
        idx = torch.arange(i, min(i + batch_size, n))
        with capture_z(model, None) as cache:
            logits, _ = logits_at(model, clean.positions["last"][idx], input_ids=clean.input_ids[idx].to(device))
        fw += 1
        d = None if distractor_ids is None else distractor_ids[idx]
        m = metric_values(logits, clean.index(idx), grad_metric, d).sum()
        zs = [cache.layer(l) for l in range(spec.n_layers)]  # each [rows, T, H, D]
        grads = torch.autograd.grad(m, zs)
        pm = _pos_mask(None if pos is None else pos[idx], len(idx), t).to(device)  # [rows, T]
        for l in range(spec.n_layers):
            src = source.rows(l, idx, t, spec).to(device=device, dtype=zs[l].dtype)
            delta = (src - zs[l].detach())  # [rows, T, H, D]
            contrib = (delta * grads[l]).sum(-1)  # [rows, T, H]
            total[l] += (contrib * pm[..., None]).sum(dim=(0, 1)).float().cpu()
    model.train(was_training)
    scores = total / n
    if relative and grad_metric == metric:
        denom = abs(float(base.mean()))
        if denom == 0.0:
            raise ValueError(f"relative metric {metric!r}: the clean mean is 0; use relative=False")
        scores = scores / denom
    result = PatchingResult(scores, float(base.mean()), fw, metric, source.mode, position)
    if recheck_top_k:
        top = [h for h, _ in result.top(recheck_top_k)]
        exact = patch_heads_batched(model, clean, source, metric=metric, relative=relative, position=position,
                                    distractor_ids=distractor_ids, heads=top, batch_size=batch_size)
        for h in top:
            result.scores[h.layer, h.head] = exact.scores[h.layer, h.head]
        result.forwards += exact.forwards
    return result


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two score matrices (scipy)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic)


# ------------------------------------------------------------------------------------------------
# Circuits
# ------------------------------------------------------------------------------------------------
@dataclass
class CircuitHead:
    head: Head
    group: str
    position: str  # a position role of the task, or "all"
    score: float

    def to_json(self) -> dict:
        return {"head": str(self.head), "group": self.group, "position": self.position, "score": self.score}


@dataclass
class Circuit:
    """Heads with their group, position role and score; JSON with heads named ``L{l}H{h}``."""

    heads: list[CircuitHead]
    task: str
    n_layers: int
    n_heads: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.heads:
            raise ValueError("circuit must hold at least one head")
        for ch in self.heads:
            if not (0 <= ch.head.layer < self.n_layers and 0 <= ch.head.head < self.n_heads):
                raise ValueError(f"circuit head {ch.head} is out of range for {self.n_layers} x {self.n_heads}")

    def unique_heads(self) -> list[Head]:
        seen, out = set(), []
        for ch in self.heads:
            if ch.head not in seen:
                seen.add(ch.head)
                out.append(ch.head)
        return out

    def groups(self) -> dict[str, list[CircuitHead]]:
        out: dict[str, list[CircuitHead]] = {}
        for ch in self.heads:
            out.setdefault(ch.group, []).append(ch)
        return out

    def __len__(self) -> int:
        return len(self.heads)

    def __str__(self) -> str:
        lines = [f"Circuit({self.task}, {len(self.unique_heads())} unique heads of {self.n_layers * self.n_heads})"]
        for g, chs in self.groups().items():
            lines.append(f"  {g} @ {chs[0].position}: " + ", ".join(f"{c.head}({c.score:+.3f})" for c in chs))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"task": self.task, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "heads": [c.to_json() for c in self.heads], "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict) -> Circuit:
        try:
            heads = [CircuitHead(Head.parse(h["head"]), h["group"], h["position"], float(h["score"]))
                     for h in d["heads"]]
            return cls(heads, d["task"], int(d["n_layers"]), int(d["n_heads"]), d.get("meta", {}))
        except KeyError as e:
            raise ValueError(f"circuit JSON is missing key {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(self.to_json(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Circuit:
        return cls.from_json(read_json(path, "circuit"))


def circuit_from_scores(result: PatchingResult, k: int, *, task: str, group: str = "heads",
                        position: str = ALL) -> Circuit:
    """The (at most) ``k`` most negative heads of a score matrix as a one-group circuit; heads whose patch
    does not lower the metric are left out."""
    n_layers, n_heads = result.scores.shape
    top = result.top(k, strict=True)
    if not top:
        raise ValueError("no head lowers the metric when patched; the circuit would be empty")
    heads = [CircuitHead(h, group, position, s) for h, s in top]
    return Circuit(heads, task, n_layers, n_heads, {"metric": result.metric, "mode": result.mode})


def circuit_by_roles(model: nn.Module, clean: EncodedBatch, source: PatchSource, roles, *, k_per_role: int = 3,
                     threshold: float = 0.05, metric: str = "prob", task: str = "", max_batch: int | None = None,
                     progress: bool = False) -> tuple[Circuit, dict]:
    """Position-aware activation patching: for each position role, patch every head there alone and keep the
    (at most) ``k_per_role`` heads whose relative metric drop exceeds ``threshold``. A head may appear under
    several roles; the circuit keeps it live at each of them.

    Returns:
        ``(circuit, {role: PatchingResult})``.
    """
    if k_per_role < 1:
        raise ValueError(f"k_per_role must be >= 1, got {k_per_role}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    spec = get_adapter(model).spec
    heads, results = [], {}
    for role in roles:
        res = patch_heads_batched(model, clean, source, metric=metric, position=role, max_batch=max_batch,
                                  progress=progress)
        results[role] = res
        heads += [CircuitHead(h, role, role, v) for h, v in res.top(k_per_role, strict=True) if v < -threshold]
    if not heads:
        raise ValueError(f"no head's patch lowers {metric} by more than {threshold} at roles {list(roles)}")
    circuit = Circuit(heads, task, spec.n_layers, spec.n_heads,
                      {"method": "roles", "metric": metric, "k_per_role": k_per_role, "threshold": threshold,
                       "mode": source.mode})
    return circuit, results


# ------------------------------------------------------------------------------------------------
# Circuit evaluation
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def circuit_correct(model: nn.Module, clean: EncodedBatch, means: torch.Tensor,
                    live: list[tuple[Head, str]], *, batch_size: int = 64) -> list[bool]:
    """Per-example correctness with only ``live`` (head, position role) pairs active; every other head at every
    position, and live heads at other positions, mean-ablated with per-position ``means`` [L, T, H, D]."""
    spec = get_adapter(model).spec
    device = next(model.parameters()).device
    n, t = clean.input_ids.shape
    if means.shape[1] != t:
        raise ValueError(f"means are for length {means.shape[1]}, prompts have length {t}")
    out: list[bool] = []
    for i in range(0, n, batch_size):
        idx = torch.arange(i, min(i + batch_size, n))
        keep = torch.zeros(spec.n_layers, len(idx), t, spec.n_heads, dtype=torch.bool)
        for head, role in live:
            keep[head.layer, :, :, head.head] |= _pos_mask(
                None if role == ALL else _positions(clean, role)[idx], len(idx), t)
        plan = {l: (~keep[l], means[l][None]) for l in range(spec.n_layers)}
        with intervene(model, plan):
            logits, _ = logits_at(model, clean.positions["last"][idx], input_ids=clean.input_ids[idx].to(device))
        out += metric_values(logits, clean.index(idx), "accuracy").bool().tolist()
    return out


def circuit_accuracy(model: nn.Module, clean: EncodedBatch, means: torch.Tensor,
                     live: list[tuple[Head, str]], *, batch_size: int = 64) -> float:
    """Mean of :func:`circuit_correct`."""
    hits = circuit_correct(model, clean, means, live, batch_size=batch_size)
    return sum(hits) / len(hits)


@torch.no_grad()
def evaluate_circuit(model: nn.Module, clean: EncodedBatch, circuit: Circuit, *, reference: EncodedBatch,
                     n_random: int = 10, seed: int = 0, batch_size: int = 64) -> dict:
    """Full-model, circuit-only and random-circuit accuracy and faithfulness (PAPER.md §2)."""
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    spec = get_adapter(model).spec
    if (circuit.n_layers, circuit.n_heads) != (spec.n_layers, spec.n_heads):
        raise ValueError(
            f"circuit is for {circuit.n_layers} x {circuit.n_heads} heads, "
            f"the model has {spec.n_layers} x {spec.n_heads}"
        )
    _check_aligned(clean, reference, "reference")
    device = next(model.parameters()).device
    means = mean_z(model, reference.input_ids.to(device), batch_size=batch_size)
    full, _ = _clean_metric(model, clean, "accuracy", None, batch_size)
    full_acc = float(full.mean())
    live = [(c.head, c.position) for c in circuit.heads]
    circ = circuit_accuracy(model, clean, means, live, batch_size=batch_size)
    rng = random.Random(seed)
    all_heads = spec.all_heads()
    size = len(circuit.unique_heads())
    roles = [c.position for c in circuit.heads]
    rand = []
    for _ in range(n_random):
        pick = rng.sample(all_heads, size)
        rand.append(circuit_accuracy(model, clean, means, [(h, roles[i % len(roles)]) for i, h in enumerate(pick)],
                                     batch_size=batch_size))
    return {
        "full_accuracy": full_acc,
        "circuit_accuracy": circ,
        "random_circuit_accuracy": sum(rand) / len(rand),
        "random_circuit_accuracies": rand,
        "faithfulness": circ / full_acc if full_acc > 0 else math.nan,
        "circuit_size": size,
        "n_heads_total": spec.n_total_heads,
    }
