"""Path patching for entity tracking after Prakash et al. (2024), PAPER.md §2.

Adapted from the logic of github.com/Nix07/finetuning (path patching for entity tracking), at the level
of heads and their q/v inputs:

1. For a sender head s: run the clean prompts with s's z at the sender position replaced by its value on
   the corrupt prompts, and *every other head's z frozen to its clean value* at every position. Only paths
   through the residual stream (and MLPs) carry s's change.
2. ``receivers="logits"``: the metric of that run is s's direct effect. Otherwise record the receivers'
   query (Q-composition, at the receivers' position) or value (V-composition, at the sender's position)
   inputs, patch them into a fresh clean run, and read the metric there.
3. Score = mean over examples of (p_patch - p_clean) / p_clean; the groups take the top-k most negative.

Groups, in order: value fetchers (last token, direct effect), position transmitters (last token,
Q-composition into the value fetchers), position detectors (query label, V-composition into the position
transmitters), structure readers (queried box label in the context, V-composition into the detectors).
Senders run batched: rows (sender, example) are stacked along the batch. With GQA, a receiver's value is
its KV group's value, so patching it also reaches the other heads of that group.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from fastcd.artifacts import Circuit, CircuitHead
from fastcd.discover import (
    PatchingResult,
    PatchSource,
    _chunks,
    _clean_metric_and_resid,
    _prefix_reuse_ok,
    _run_rows,
)
from fastcd.errors import UsageError
from fastcd.hooks import intervene, role_positions, rows_for_budget, run_with_z
from fastcd.metrics import check_patching_args, clean_metric, metric_values, relative_change
from fastcd.models import Head, get_adapter
from fastcd.tasks.base import EncodedBatch


@dataclass(frozen=True)
class GroupSpec:
    name: str
    position: str  # sender position role
    k: int
    receiver_input: str  # "logits", "q" or "v"
    receivers_from: str | None  # the earlier group whose heads receive


ET_GROUPS = (
    GroupSpec("value_fetcher", "last", 0, "logits", None),
    GroupSpec("position_transmitter", "last", 0, "q", "value_fetcher"),
    GroupSpec("position_detector", "query_label", 0, "v", "position_transmitter"),
    GroupSpec("structure_reader", "box_label", 0, "v", "position_detector"),
)


def _by_module(model, receivers: list[Head], which: str) -> dict[nn.Module, list[tuple[Head, slice]]]:
    """Group receivers by the module whose output holds their q (or v), with each head's output slice."""
    a = get_adapter(model)
    by_mod: dict[nn.Module, list[tuple[Head, slice]]] = {}
    for h in receivers:
        mod, sl = a.qkv_output(h.layer, which, h.head)
        by_mod.setdefault(mod, []).append((h, sl))
    return by_mod


@contextmanager
def _record_inputs(model, receivers: list[Head], which: str, store: dict):
    """Record the receivers' q or v (module output slices) at every position: store[head] = [rows, T, d]."""
    handles = []
    by_mod = _by_module(model, receivers, which)
    try:
        for mod, items in by_mod.items():
            def hook(module, args, out, items=items):
                for h, sl in items:
                    store[h] = out[..., sl].detach().clone()
            handles.append(mod.register_forward_hook(hook))
        yield
    finally:
        for hd in handles:
            hd.remove()


@contextmanager
def _replace_inputs(model, receivers: list[Head], which: str, values: dict, pos_mask: torch.Tensor):
    """Replace the receivers' q or v at ``pos_mask`` ([rows, T]) by ``values[head]`` ([rows, T, d])."""
    handles = []
    by_mod = _by_module(model, receivers, which)
    try:
        for mod, items in by_mod.items():
            def hook(module, args, out, items=items):
                out = out.clone()
                m = pos_mask.to(out.device)[..., None]
                for h, sl in items:
                    out[..., sl] = torch.where(m, values[h].to(out.dtype), out[..., sl])
                return out
            handles.append(mod.register_forward_hook(hook))
        yield
    finally:
        for hd in handles:
            hd.remove()


@torch.no_grad()
def path_patch(model: nn.Module, clean: EncodedBatch, corrupt_z: torch.Tensor, *, sender_position: str,
               receivers: list[Head] | None, receiver_input: str = "logits", receiver_position: str = "last",
               metric: str = "prob", relative: bool = True, max_batch: int | None = None, batch_size: int = 64,
               skip_layers: bool = True, reuse_prefix: bool = True) -> PatchingResult:
    """Path-patching score of every sender head into ``receivers`` (or straight into the logits).

    Args:
        corrupt_z: ``[L, n, T, H, D]`` from :func:`fastcd.hooks.run_with_z` on the paired corrupt prompts.
        sender_position: position role where the sender is patched.
        receivers: receiving heads (None with ``receiver_input="logits"``).
        receiver_input: ``logits`` (direct effect), ``q`` (read at ``receiver_position``) or ``v`` (read at
            the sender's position).
        skip_layers, reuse_prefix: the fast path (Llama-like models, as in
            :func:`fastcd.discover.patch_heads_batched`). Every head is frozen to its clean z, so a sender in
            layer l changes nothing before layer l, nor any token before its position: step 1 starts from the
            clean residual stream at the sender's layer, step 2 at the first receiver's layer, both at the
            row's earliest patched token on the clean prefix's keys and values (rows grouped by that token).
            Both off: full forwards (the specification; tests compare the two).

    Returns:
        A :class:`PatchingResult`; senders that cannot reach any receiver (same or later layer) are NaN.
    """
    check_patching_args(clean, metric, batch_size)
    if receiver_input not in ("logits", "q", "v"):
        raise UsageError(f"receiver_input must be 'logits', 'q' or 'v', got {receiver_input!r}")
    if receiver_input != "logits" and not receivers:
        raise UsageError("receivers must be a non-empty list of heads for q/v composition")
    adapter = get_adapter(model)
    spec = adapter.spec
    device = next(model.parameters()).device
    n, t = clean.input_ids.shape
    if corrupt_z.shape[:3] != (spec.n_layers, n, t):
        raise UsageError(f"corrupt_z must be [L={spec.n_layers}, n={n}, T={t}, H, D], got {tuple(corrupt_z.shape)}")
    receivers = [spec.check_head(h, "receivers") for h in (receivers or [])]
    _, clean_z = run_with_z(model, clean.input_ids.to(device), logits=False)  # [L, n, T, H, D]
    s_pos = role_positions(clean, sender_position)  # [n, 1]
    r_pos = role_positions(clean, receiver_position if receiver_input == "q" else sender_position)
    skip = skip_layers and adapter.supports_layer_skip
    # a row starts at the earlier of its sender's and its receivers' token; rows are grouped by that token
    start_tok = torch.zeros(n, dtype=torch.long)
    if skip and reuse_prefix and _prefix_reuse_ok(adapter, t):
        start_tok = torch.minimum(s_pos[:, 0], r_pos[:, 0])
    resid = prefix_kv = None
    if skip:
        base, fw, resid, prefix_kv = _clean_metric_and_resid(model, clean, metric, None, batch_size,
                                                             prefix=int(start_tok.max()))
    else:
        base, fw = clean_metric(model, clean, metric, None, batch_size)
    fw += 1  # the clean run that recorded clean_z
    max_layer = spec.n_layers if receiver_input == "logits" else max(h.layer for h in receivers)
    r_first = min((h.layer for h in receivers), default=0) if skip else 0
    senders = [h for h in spec.all_heads() if h.layer < max_layer]  # layer-major
    by_layer: dict[int, list[int]] = {}
    for k, h in enumerate(senders):
        by_layer.setdefault(h.layer, []).append(k)
    if max_batch is None:
        max_batch = rows_for_budget(model, t)
    out = torch.empty(len(senders), n)
    for layer, ks in by_layer.items():  # a forward patches senders of one layer, so it can start there
        first = layer if skip else 0
        for k_local, ex_idx in _chunks(len(ks), start_tok, max_batch):
            r, p0 = len(ex_idx), int(start_tok[ex_idx[0]])
            freeze = torch.ones(1, t - p0, spec.n_heads, dtype=torch.bool)
            # Step 1: freeze every head to clean, put the sender's corrupt value at the sender position.
            plan = {}
            for l in range(first, spec.n_layers):
                value = clean_z[l][ex_idx, p0:].clone()  # [rows, T - p0, H, D]
                if l == layer:
                    for j in k_local.unique().tolist():
                        sel = (k_local == j).nonzero().flatten()
                        h, p = senders[ks[j]], s_pos[ex_idx[sel], 0]
                        value[sel, p - p0, h.head] = corrupt_z[layer][ex_idx[sel], p, h.head]
                plan[l] = (freeze, value)
            run = {"p0": p0, "resid": resid, "prefix_kv": prefix_kv}
            if receiver_input == "logits":
                with intervene(model, plan):
                    logits = _run_rows(model, adapter, clean, ex_idx, layer=first, **run)
                fw += 1
            else:
                store: dict = {}
                with intervene(model, plan), _record_inputs(model, receivers, receiver_input, store):
                    _run_rows(model, adapter, clean, ex_idx, layer=first, **run)  # records the receivers' inputs
                # Step 2: a fresh clean run with the receivers' inputs patched at their reading position.
                pm = torch.zeros(r, t - p0, dtype=torch.bool)
                pm[torch.arange(r), r_pos[ex_idx, 0] - p0] = True
                # receivers before the first layer step 1 ran read clean inputs: nothing to patch there
                with _replace_inputs(model, [h for h in receivers if h in store], receiver_input, store, pm):
                    logits = _run_rows(model, adapter, clean, ex_idx, layer=r_first, **run)
                fw += 2
            out[[ks[j] for j in k_local.tolist()], ex_idx] = metric_values(logits, clean.index(ex_idx), metric).cpu()
    scores = torch.full((spec.n_layers, spec.n_heads), float("nan"))
    for k, h in enumerate(senders):
        scores[h.layer, h.head] = relative_change(out[k], base, metric, relative)
    return PatchingResult(scores, float(base.mean()), fw, metric, "corrupt", sender_position)


def entity_tracking_circuit(model: nn.Module, clean: EncodedBatch, corrupt: EncodedBatch, *,
                            k: tuple[int, int, int, int] = (4, 2, 2, 2), metric: str = "prob",
                            max_batch: int | None = None, progress: bool = False) -> tuple[Circuit, dict]:
    """The four-group entity-tracking circuit by iterative path patching.

    Args:
        k: top-k of (value fetchers, position transmitters, position detectors, structure readers);
            Prakash's defaults for Llama-7B are (20, 5, 10, 5).

    Returns:
        ``(circuit, {group: PatchingResult})``. Only heads with a negative score join a group (at most k);
        a group that gets none, or whose receivers cannot be reached, is listed in ``meta["empty_groups"]``.
    """
    from tqdm import tqdm

    if len(k) != 4 or any((not isinstance(x, int)) or x < 1 for x in k):
        raise UsageError(f"k must be four positive integers (one per group), got {k}")
    device = next(model.parameters()).device
    spec = get_adapter(model).spec
    zs = []
    for i in range(0, len(corrupt), 64):
        zs.append(run_with_z(model, corrupt.input_ids[i : i + 64].to(device), logits=False)[1])
    corrupt_z = torch.cat(zs, dim=1)
    if corrupt_z.shape[2] != clean.input_ids.shape[1]:
        raise UsageError("clean and corrupt prompts must have one token length where positions align")
    groups = [GroupSpec(g.name, g.position, kk, g.receiver_input, g.receivers_from) for g, kk in zip(ET_GROUPS, k)]
    chosen: dict[str, list[Head]] = {}
    results: dict[str, PatchingResult] = {}
    heads: list[CircuitHead] = []
    skipped = []
    for g in tqdm(groups, disable=not progress, desc="path patching"):
        receivers = None if g.receivers_from is None else chosen[g.receivers_from]
        if receivers is not None and not any(h.layer > 0 for h in receivers):
            # no earlier head can reach these receivers: the group is empty
            chosen[g.name] = []
            skipped.append(g.name)
            continue
        res = path_patch(model, clean, corrupt_z, sender_position=g.position, receivers=receivers,
                         receiver_input=g.receiver_input, metric=metric, max_batch=max_batch)
        results[g.name] = res
        top = res.top(min(g.k, int((~torch.isnan(res.scores)).sum())), strict=True)  # only heads that hurt
        chosen[g.name] = [h for h, _ in top]
        if not top:
            skipped.append(g.name)
        heads += [CircuitHead(h, g.name, g.position, s) for h, s in top]
    if not heads:
        raise UsageError("path patching found no head whose patch lowers the metric; is the model solving the task?")
    circuit = Circuit(heads, "entity-tracking", spec.n_layers, spec.n_heads,
                      {"method": "path_patching", "metric": metric, "k": list(k), "empty_groups": skipped})
    return circuit, results


__all__ = ["ET_GROUPS", "GroupSpec", "PatchSource", "entity_tracking_circuit", "path_patch"]
