"""Circuit discovery in the teacher: per-head patching scores, batched exact patching, attribution
patching, circuits from scores, and the default discovery policy (PAPER.md §2). Metrics and circuit
evaluation live in :mod:`fastcd.metrics`, the :class:`~fastcd.artifacts.Circuit` type in :mod:`fastcd.artifacts`.

Scores follow Prakash et al. (2024): the mean over examples of the relative change of the metric,
``(m_patch - m_clean) / m_clean``; the most negative heads matter most.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from fastcd.artifacts import Circuit, CircuitHead
from fastcd.errors import UsageError
from fastcd.hooks import ALL, intervene, mean_z, position_mask, role_positions, rows_for_budget, run_with_z
from fastcd.metrics import (
    check_aligned,
    check_patching_args,
    clean_metric,
    metric_values,
    relative_change,
)
from fastcd.models import Head, ModelSpec, get_adapter, logits_at
from fastcd.tasks.base import EncodedBatch

MODES = ("mean", "corrupt", "zero")



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
        raise UsageError(f"mode must be one of {MODES}, got {mode!r}")
    device = next(model.parameters()).device
    if mode == "zero":
        return PatchSource("zero", None)
    if mode == "mean":
        ref = reference or corrupt or clean
        check_aligned(clean, ref, "reference")
        return PatchSource("mean", mean_z(model, ref.input_ids.to(device), batch_size=batch_size))
    if corrupt is None:
        raise UsageError("mode='corrupt' needs corrupt prompts (corrupt=...)")
    check_aligned(clean, corrupt, "corrupt")
    if corrupt.input_ids.shape[0] != clean.input_ids.shape[0]:
        raise UsageError(f"corrupt has {len(corrupt)} examples, clean has {len(clean)}; they must pair up")
    zs = []
    for i in range(0, len(corrupt), batch_size):
        zs.append(run_with_z(model, corrupt.input_ids[i : i + batch_size].to(device), logits=False)[1])
    return PatchSource("corrupt", torch.cat(zs, dim=1))


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
            raise UsageError(f"k must be in 1..{n_valid} (the number of scored heads), got {k}")
        key = flat.nan_to_num(nan=float("inf") if most_negative else float("-inf"))
        order = torch.argsort(key, descending=not most_negative, stable=True)[:k]
        h = self.scores.shape[1]
        out = [(Head(int(i) // h, int(i) % h), float(flat[i])) for i in order]
        if strict:
            out = [(hd, v) for hd, v in out if (v < 0 if most_negative else v > 0)]
        return out



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


def _rows_cache(prefix_kv, ex_idx: torch.Tensor, length: int | None = None):
    """A KV cache of the clean prefix for rows ``ex_idx``: its first ``length`` tokens (None: all kept)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for l, (k, v) in enumerate(prefix_kv):
        idx = ex_idx.to(k.device)
        cache.update(k[idx, :, :length], v[idx, :, :length], l)
    return cache


def _run_rows(model, adapter, clean: EncodedBatch, ex_idx: torch.Tensor, *, layer: int, p0: int, resid, prefix_kv):
    """Logits at each row's last token of a run on the clean prompts ``ex_idx`` (hooks and interventions already
    on). With ``resid`` (layer skipping) the run starts from the clean residual stream at ``layer`` and, with
    ``p0 > 0``, at token ``p0`` on the clean prefix's keys and values (the caller guarantees that nothing before
    either has changed); without, a full forward."""
    device = next(model.parameters()).device
    last = clean.positions["last"][ex_idx]
    if resid is None:
        return logits_at(model, last, input_ids=clean.input_ids[ex_idx].to(device))[0]
    kw = {}
    if p0 > 0:
        t, r = clean.input_ids.shape[1], len(ex_idx)
        kw = {_cache_kwarg(model): _rows_cache(prefix_kv, ex_idx, p0), "use_cache": True,
              "position_ids": torch.arange(p0, t, device=device)[None].expand(r, -1)}
    with adapter.start_at_layer(layer):
        return logits_at(model, last - p0, inputs_embeds=resid[layer][ex_idx, p0:].to(device), **kw)[0]


@torch.no_grad()
def patch_heads_loop(model: nn.Module, clean: EncodedBatch, source: PatchSource, *, metric: str = "prob",
                     relative: bool = True, position: str | None = None, distractor_ids=None,
                     batch_size: int = 64, heads: list[Head] | None = None, progress: bool = False
                     ) -> PatchingResult:
    """Reference: one forward per head (and per chunk of examples). The specification of the batched path."""
    from tqdm import tqdm

    check_patching_args(clean, metric, batch_size)
    spec = get_adapter(model).spec
    device = next(model.parameters()).device
    base, fw = clean_metric(model, clean, metric, distractor_ids, batch_size)
    heads = heads or spec.all_heads()
    scores = torch.full((spec.n_layers, spec.n_heads), float("nan"))
    n, t = clean.input_ids.shape
    pos = role_positions(clean, position)
    for head in tqdm(heads, disable=not progress, desc="patching (loop)"):
        vals = []
        for i in range(0, n, batch_size):
            idx = torch.arange(i, min(i + batch_size, n))
            mask = torch.zeros(len(idx), t, spec.n_heads, dtype=torch.bool)
            mask[:, :, head.head] = position_mask(None if pos is None else pos[idx], len(idx), t)
            value = source.rows(head.layer, idx, t, spec)
            with intervene(model, {head.layer: (mask, value)}):
                logits, _ = logits_at(model, clean.positions["last"][idx], input_ids=clean.input_ids[idx].to(device))
            fw += 1
            d = None if distractor_ids is None else distractor_ids[idx]
            vals.append(metric_values(logits, clean.index(idx), metric, d).cpu())
        scores[head.layer, head.head] = relative_change(torch.cat(vals), base, metric, relative)
    return PatchingResult(scores, float(base.mean()), fw, metric, source.mode, position)


def _chunks(n_heads: int, start_tok: torch.Tensor, max_batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The forwards of one layer's rows (head k of ``n_heads``, example i): ``(k_local, ex_idx)`` chunks of at most
    ``max_batch`` rows whose examples share one start token ``start_tok[i]``."""
    n = len(start_tok)
    k_all = torch.arange(n_heads).repeat_interleave(n)
    ex_all = torch.arange(n).repeat(n_heads)
    out = []
    for tok in torch.unique(start_tok).tolist():
        sel = (start_tok[ex_all] == tok).nonzero().flatten()
        for i in range(0, len(sel), max_batch):
            idx = sel[i : i + max_batch]
            out.append((k_all[idx], ex_all[idx]))
    return out


@torch.no_grad()
def patch_heads_batched(model: nn.Module, clean: EncodedBatch, source: PatchSource, *, metric: str = "prob",
                        relative: bool = True, position: str | None = None, distractor_ids=None,
                        max_batch: int | None = None, batch_size: int = 64, heads: list[Head] | None = None,
                        skip_layers: bool = True, reuse_prefix: bool = True, progress: bool = False
                        ) -> PatchingResult:
    """Exact per-head patching with many head interventions per forward.

    Rows ``(head k, example i)`` are stacked along the batch, each row patching only its own head, in
    forwards of at most ``max_batch`` rows (the memory bound; None: as many as ``FASTCD_MEMORY_BUDGET``,
    default 2 GiB, allows, :func:`fastcd.hooks.rows_for_budget`). Same scores as :func:`patch_heads_loop`.
    With ``skip_layers`` (Llama-like models), a forward that patches layer l starts from the clean residual
    stream at layer l instead of recomputing layers 0..l-1, which are unchanged by the patch; the clean
    residual streams are kept, ``[n_layers, n, T, d_model]``. With ``reuse_prefix`` and a position role, the
    tokens before a row's patched position are not recomputed either: their clean keys and values are reused as
    a KV cache and only the suffix runs; rows are grouped by that position (one group for ``last``, up to one per
    box for a role that moves from prompt to prompt, such as ``box_label``).
    """
    from tqdm import tqdm

    check_patching_args(clean, metric, batch_size)
    if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
        raise UsageError(f"max_batch must be an integer >= 1 or None (from the memory budget), got {max_batch!r}")
    adapter = get_adapter(model)
    spec = adapter.spec
    heads = heads or spec.all_heads()
    n, t = clean.input_ids.shape
    if max_batch is None:
        max_batch = rows_for_budget(model, t)
    pos = role_positions(clean, position)
    skip = skip_layers and adapter.supports_layer_skip
    # Rows are ordered by the patched head's layer, so each forward patches heads of one layer only and,
    # with layer skipping, starts from the cached clean residual stream at that layer.
    order = sorted(range(len(heads)), key=lambda k: (heads[k].layer, k))
    by_layer: dict[int, list[int]] = {}
    for k in order:
        by_layer.setdefault(heads[k].layer, []).append(k)
    # With prefix reuse, a forward runs from its rows' patched token on: rows are grouped by that token (one group
    # for `last`; up to one per box for a role that moves from prompt to prompt), the clean keys/values kept up to
    # the latest one.
    reuse = skip and reuse_prefix and pos is not None and _prefix_reuse_ok(adapter, t) and int(pos.max()) > 0
    start_tok = pos[:, 0] if reuse else torch.zeros(n, dtype=torch.long)
    resid = prefix_kv = None  # without layer skipping: full forwards
    if skip:
        base, fw, resid, prefix_kv = _clean_metric_and_resid(model, clean, metric, distractor_ids, batch_size,
                                                             prefix=int(start_tok.max()))
    else:
        base, fw = clean_metric(model, clean, metric, distractor_ids, batch_size)
    out = torch.empty(len(heads), n)
    chunks = {layer: _chunks(len(ks), start_tok, max_batch) for layer, ks in by_layer.items()}
    if progress:
        n_fw = sum(len(c) for c in chunks.values())
        print(f"fastcd: batched patching: {len(heads)} heads x {n} prompts = {len(heads) * n:,} rows in {n_fw} "
              f"forwards of <= {max_batch} rows" + (", each from layer l on (layer skipping)" if skip else ""),
              file=sys.stderr)
    bar = tqdm(total=len(heads) * n, disable=not progress, desc="patching (batched)")
    for layer, ks in by_layer.items():
        for k_local, ex_idx in chunks[layer]:  # which head (of this layer), which example
            r = len(ex_idx)
            p0 = int(start_tok[ex_idx[0]])  # every row of the chunk starts at the same token
            pm = position_mask(None if pos is None else pos[ex_idx], r, t)  # [rows, T]
            mask = torch.zeros(r, t, spec.n_heads, dtype=torch.bool)
            for j in k_local.unique().tolist():
                sel = k_local == j
                mask[sel, :, heads[ks[j]].head] = pm[sel]
            # positions before p0 (and layers before this one) are untouched by the patch: they are not rerun
            plan = {layer: (mask[:, p0:], source.rows(layer, ex_idx, t, spec)[:, p0:])}
            with intervene(model, plan):
                logits = _run_rows(model, adapter, clean, ex_idx, layer=layer, p0=p0, resid=resid, prefix_kv=prefix_kv)
            fw += 1
            d = None if distractor_ids is None else distractor_ids[ex_idx]
            vals = metric_values(logits, clean.index(ex_idx), metric, d).cpu()
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



def circuit_from_scores(result: PatchingResult, k: int, *, task: str, group: str = "heads",
                        position: str = ALL) -> Circuit:
    """The (at most) ``k`` most negative heads of a score matrix as a one-group circuit; heads whose patch
    does not lower the metric are left out."""
    n_layers, n_heads = result.scores.shape
    top = result.top(k, strict=True)
    if not top:
        raise UsageError("no head lowers the metric when patched; the circuit would be empty")
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
        raise UsageError(f"k_per_role must be >= 1, got {k_per_role}")
    if threshold < 0:
        raise UsageError(f"threshold must be >= 0, got {threshold}")
    spec = get_adapter(model).spec
    heads, results = [], {}
    for role in roles:
        res = patch_heads_batched(model, clean, source, metric=metric, position=role, max_batch=max_batch,
                                  progress=progress)
        results[role] = res
        heads += [CircuitHead(h, role, role, v) for h, v in res.top(k_per_role, strict=True) if v < -threshold]
    if not heads:
        raise UsageError(f"no head's patch lowers {metric} by more than {threshold} at roles {list(roles)}")
    circuit = Circuit(heads, task, spec.n_layers, spec.n_heads,
                      {"method": "roles", "metric": metric, "k_per_role": k_per_role, "threshold": threshold,
                       "mode": source.mode})
    return circuit, results




# ------------------------------------------------------------------------------------------------
# The default discovery policy (the CLI's `fastcd discover` and distill() both use it)
# ------------------------------------------------------------------------------------------------
CIRCUIT_SHARE = 0.15  # patching/attribution keep this share of the heads by default (the paper's 11-15%)
