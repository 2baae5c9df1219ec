"""The task's default circuit-discovery policy, and one entry point over every method (:func:`default_circuit`):
patching and role-wise patching (:mod:`fastcd.discover`), attribution patching (:mod:`fastcd.attribution`) and
Prakash et al.'s path patching (:mod:`fastcd.path_patching`). ``distill`` and ``fastcd discover`` share it."""

from __future__ import annotations

import torch
from torch import nn

from fastcd.attribution import attribution_patching
from fastcd.config import DISCOVERY_METHODS
from fastcd.discover import (
    CIRCUIT_SHARE,
    circuit_by_roles,
    circuit_from_scores,
    make_source,
    patch_heads_batched,
)
from fastcd.errors import UsageError
from fastcd.path_patching import entity_tracking_circuit
from fastcd.tasks.base import EncodedBatch


def default_circuit(model: nn.Module, task, clean: EncodedBatch, corrupt: EncodedBatch, *, method: str = "auto",
                    top_k: int | None = None, path_k=(4, 2, 2, 2), position: str | None = None, mode: str = "mean",
                    metric: str = "prob", relative: bool = True, threshold: float = 0.05, recheck_top_k: int = 0,
                    batch_size: int = 64, max_batch: int | None = None, progress: bool = False):
    """Find a circuit with the task's default policy, or the one ``method`` names.

    ``method="auto"`` takes ``task.discovery_defaults["method"]``: ``roles`` (position-aware patching at each of
    the task's ``reference_roles`` (else its roles), top 3 per role above ``threshold``; entity tracking: the
    reference's three vital positions) or ``patching`` at
    ``task.discovery_defaults["position"]`` (ToM: the last token, the position the CKA term aligns) keeping
    ``top_k`` heads (default: 15% of them). ``attribution`` is patching's gradient approximation (with an exact
    recheck of the top ``recheck_top_k``); ``path`` is Prakash et al.'s four-group path patching (entity
    tracking; ``path_k`` heads per group).

    Returns:
        ``(circuit, panels, marked)``: the circuit, the score matrices by panel name and the circuit heads to
        outline in each (what :func:`fastcd.plots.head_heatmaps` draws).
    """
    defaults = dict(getattr(task, "discovery_defaults", None) or {"method": "patching", "position": "last"})
    if method == "auto":
        method = defaults.get("method", "patching")
    if method not in DISCOVERY_METHODS:
        raise UsageError(f"discovery method must be 'auto' or one of {DISCOVERY_METHODS}, got {method!r}")
    name = getattr(task, "name", "task")
    if method == "path":
        if name != "entity-tracking":
            raise UsageError("discovery method 'path' is defined for entity tracking only (use patching or "
                             "attribution)")
        circuit, results = entity_tracking_circuit(model, clean, corrupt, k=tuple(path_k), metric=metric,
                                                   max_batch=max_batch, progress=progress)
        panels = {g: r.scores for g, r in results.items()}
        return circuit, panels, {g: [c.head for c in circuit.groups().get(g, [])] for g in results}
    src = make_source(model, clean, mode, corrupt=corrupt, batch_size=batch_size)
    if method == "roles":
        roles = getattr(task, "reference_roles", None) or task.roles
        circuit, results = circuit_by_roles(model, clean, src, roles, k_per_role=top_k or 3,
                                            threshold=threshold, metric=metric, task=name, max_batch=max_batch,
                                            progress=progress)
        panels = {f"@{r}": res.scores for r, res in results.items()}
        return circuit, panels, {f"@{r}": [c.head for c in circuit.heads if c.position == r] for r in results}
    position = position or defaults.get("position", "last")
    kw = dict(metric=metric, relative=relative, position=position, batch_size=batch_size, progress=progress)
    if method == "patching":
        res = patch_heads_batched(model, clean, src, max_batch=max_batch, **kw)
    else:
        with torch.enable_grad():
            res = attribution_patching(model, clean, src, recheck_top_k=recheck_top_k, **kw)
    n_heads = res.scores.numel()
    k = top_k if top_k is not None else max(1, round(CIRCUIT_SHARE * n_heads))
    if not 1 <= k <= n_heads:
        raise UsageError(f"top_k must be in 1..{n_heads} (the number of heads), got {k}")
    circuit = circuit_from_scores(res, k, task=name, group="heads", position=position)
    circuit.meta.update(method=method, forwards=res.forwards)
    label = f"{method} ({mode}, {metric}) @{position}"
    return circuit, {label: res.scores}, {label: circuit.unique_heads()}
