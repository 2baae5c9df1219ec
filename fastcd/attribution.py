"""Attribution patching: every head's patching score from one forward and one backward per chunk (the linear
approximation), with an exact recheck of the top heads; and the rank correlation to compare it with exact
patching (PAPER.md §2)."""

from __future__ import annotations

import sys

import torch
from torch import nn

from fastcd.discover import PatchingResult, PatchSource, patch_heads_batched
from fastcd.errors import UsageError
from fastcd.hooks import capture_z, position_mask, role_positions
from fastcd.metrics import check_patching_args, clean_metric, metric_values
from fastcd.models import get_adapter, logits_at, shared_prefix
from fastcd.tasks.base import EncodedBatch


def attribution_patching(model: nn.Module, clean: EncodedBatch, source: PatchSource, *, metric: str = "prob",
                         relative: bool = True, position: str | None = None, distractor_ids=None,
                         batch_size: int = 64, recheck_top_k: int = 0, progress: bool = False
                         ) -> PatchingResult:
    """Linearised patching for every head at once: ``score ≈ grad_z(metric) · (z_source - z_clean)``.

    One clean forward with the graph, the source (corrupt forward or precomputed means) and one backward
    per chunk. For the relative ``prob`` score, ``(p' - p) / p ≈ grad(log p) · Δz``, so the log-probability
    gradient is used. ``recheck_top_k`` re-scores the k most negative heads exactly. With a ``position`` role
    after a prefix every prompt shares (few-shot prompts), the prefix runs once per chunk
    (:func:`fastcd.models.shared_prefix`): the same scores.
    """
    check_patching_args(clean, metric, batch_size)
    if metric in ("accuracy", "candidate_accuracy"):
        raise UsageError(f"metric={metric!r} has no gradient; use prob, logprob or logit_diff for attribution")
    spec = get_adapter(model).spec
    device = next(model.parameters()).device
    n, t = clean.input_ids.shape
    pos = role_positions(clean, position)
    base, fw = clean_metric(model, clean, metric, distractor_ids, batch_size)
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
        ids, last = clean.input_ids[idx].to(device), clean.positions["last"][idx]
        prefix = None
        if pos is not None:  # scores at a role after a shared prefix: the prefix runs once, its keys and values
            with torch.no_grad():  # constants (no patched position lies in it, so no gradient is read there)
                prefix = shared_prefix(model, ids, [last, pos[idx]])
        p = 0 if prefix is None else prefix.length
        with capture_z(model, None) as cache:
            logits, _ = logits_at(model, last, input_ids=ids, prefix=prefix)
        fw += 1
        d = None if distractor_ids is None else distractor_ids[idx]
        m = metric_values(logits, clean.index(idx), grad_metric, d).sum()
        zs = [cache.layer(l) for l in range(spec.n_layers)]  # each [rows, T - p, H, D]
        grads = torch.autograd.grad(m, zs)
        pm = position_mask(None if pos is None else pos[idx] - p, len(idx), t - p).to(device)  # [rows, T - p]
        for l in range(spec.n_layers):
            src = source.rows(l, idx, t, spec)[:, p:].to(device=device, dtype=zs[l].dtype)
            delta = (src - zs[l].detach())  # [rows, T - p, H, D]
            contrib = (delta * grads[l]).sum(-1)  # [rows, T, H]
            total[l] += (contrib * pm[..., None]).sum(dim=(0, 1)).float().cpu()
    model.train(was_training)
    scores = total / n
    if relative and grad_metric == metric:
        denom = abs(float(base.mean()))
        if denom == 0.0:
            raise UsageError(f"relative metric {metric!r}: the clean mean is 0; use relative=False")
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


__all__ = ["attribution_patching", "spearman"]
