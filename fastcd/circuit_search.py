"""A role-wise circuit search that reaches a faithfulness target.

Units are ``(head, position role)`` pairs over the roles the task defines, or ``all`` (a head live at every
position: the paper's ToM protocol, where a circuit head is never ablated and every other head is). The search grows
a circuit from the empty one: at each step it scores every unit outside the circuit by attribution *at the current
circuit* (the gradient of the answer's log-probability with respect to a soft keep-mask, ``z' = mean + keep * (z -
mean)``, at keep = 0: the first-order gain of restoring that unit, one forward and one backward over the search
prompts for all units at once), adds the best, and grows the size geometrically until the circuit's faithfulness on
the search prompts reaches ``target``. It then bisects the last step (the units in the order they were ranked) to
the smallest prefix that reaches the target, and prunes: units whose removal costs least (the same gradient at keep
= 1) are dropped in chunks while the target holds. Every size on the way is a point of the curve: its faithfulness
on held-out prompts beside random circuits of the same size and roles, with its units (``unit_list``), so any
point is a circuit (:func:`curve_circuit`); ``on_point`` streams each point as it is measured (the CLI writes them to
``OUT.curve.jsonl``: a search stopped early keeps every circuit it measured).

Reference: :func:`fastcd.metrics.circuit_correct` (the evaluation every number here comes from).
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from fastcd.artifacts import Circuit, CircuitHead
from fastcd.errors import UsageError
from fastcd.hooks import ALL, mean_z, rows_for_budget
from fastcd.metrics import (
    PROTOCOL_TEXT,
    check_aligned,
    check_protocol,
    circuit_correct,
    clean_metric,
    keep_masks,
    metric_values,
    random_units,
    role_free_prefix_length,
)
from fastcd.models import Head, get_adapter, logits_at, run_prefix
from fastcd.tasks.base import EncodedBatch

MIN_HELDOUT = 20  # the random baseline's bound (<= 0.05) needs at least 20 prompts to be resolved at all
MIN_SEARCH_CORRECT = 50  # fewer correctly answered search prompts: a warning (the target check is that noisy)


def check_search_args(*, target: float, roles, task_roles, n_heldout: int, n_random: int, growth: float = 2.0,
                      start: int = 8, max_units: int | None = None) -> None:
    """One-line errors for bad search settings, before any model loads."""
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not 0 < target <= 1:
        raise UsageError(f"target must be a faithfulness in (0, 1], got {target!r}")
    bad = [r for r in roles if r not in task_roles and r != ALL]
    if not roles or bad:
        raise UsageError(f"roles must be a non-empty list of the task's roles {tuple(task_roles)} or 'all' (a head "
                         f"live at every position), got {list(roles)}")
    if n_heldout < MIN_HELDOUT:
        raise UsageError(f"n_heldout must be >= {MIN_HELDOUT}: with fewer held-out prompts the random baseline "
                         f"(<= 0.05) cannot be told from zero, got {n_heldout}")
    if n_random < 2:
        raise UsageError(f"n_random must be >= 2 (the random baseline's spread needs two draws), got {n_random}")
    if not growth > 1:
        raise UsageError(f"growth must be > 1 (the factor the circuit grows by each step), got {growth}")
    if start < 1:
        raise UsageError(f"start must be >= 1 unit, got {start}")
    if max_units is not None and (isinstance(max_units, bool) or not isinstance(max_units, int) or max_units < 1):
        raise UsageError(f"max_units must be a number of units >= 1 (or None: every unit), got {max_units!r}")


@contextmanager
def _soft_keep(model: nn.Module, keep: torch.Tensor, means: torch.Tensor):
    """At every layer ``z = mean + keep * (z - mean)``; ``keep`` is a float ``[L, rows, T, H]`` (may need grad)."""
    adapter = get_adapter(model)
    spec = adapter.spec
    handles = []

    def make(layer: int):
        def hook(module, args):
            z = args[0]
            b, t, _ = z.shape
            ct = torch.promote_types(z.dtype, torch.float32)  # bf16 models mix in fp32, fp64 ones in fp64
            z4 = z.view(b, t, spec.n_heads, spec.d_head).to(ct)
            mu = means[layer][None].to(device=z4.device, dtype=ct)
            new = mu + keep[layer][..., None].to(device=z4.device, dtype=ct) * (z4 - mu)
            return (new.to(z.dtype).reshape(b, t, -1),) + tuple(args[1:])

        return hook

    try:
        for layer in range(spec.n_layers):
            handles.append(adapter.o_proj(layer).register_forward_pre_hook(make(layer)))
        yield
    finally:
        for h in handles:
            h.remove()


def unit_gradients(model: nn.Module, batch: EncodedBatch, means: torch.Tensor, live, roles, *,
                   protocol: str = "strict", batch_size: int = 32) -> torch.Tensor:
    """``[L, H, len(roles)]``: d(mean log p(answer)) / d keep at each unit's role positions, at the circuit ``live``;
    in chunks of at most ``batch_size`` prompts that fit ``FASTCD_MEMORY_BUDGET`` (the same sums in any chunking).

    For a unit outside the circuit (keep = 0) it is the first-order gain of restoring it; for a unit inside
    (keep = 1) the first-order loss of removing it.
    """
    spec = get_adapter(model).spec
    device = next(model.parameters()).device
    n = len(batch)
    # few-shot prompts: every row's prefix is the same prompt under the same mask, so one forward (batch 1) of it
    # with its own keep tensor serves the batch, and that tensor's gradient is the sum of the rows' gradients there
    n_pre = role_free_prefix_length(model, batch)
    # the backward keeps every layer's activations: chunks within the memory budget (396-token prompts on a 1.5B
    # took 13 GB for 32 rows)
    batch_size = min(batch_size, rows_for_budget(model, batch.input_ids.shape[1] - n_pre, grad=True))
    out = torch.zeros(spec.n_layers, spec.n_heads, len(roles))
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        for i in range(0, n, batch_size):
            idx = torch.arange(i, min(i + batch_size, n))
            keep = keep_masks(spec, batch, live, idx, protocol).float()
            ids, last = batch.input_ids[idx].to(device), batch.positions["last"][idx]
            k_pre = keep[:, :1, :n_pre].clone().requires_grad_(True)
            k_suf = keep[:, :, n_pre:].clone().requires_grad_(True)  # the whole prompt when n_pre = 0
            with torch.enable_grad():
                pre = None
                if n_pre:
                    with _soft_keep(model, k_pre, means[:, :n_pre]):
                        pre = run_prefix(model, ids, n_pre)
                with _soft_keep(model, k_suf, means[:, n_pre:]):
                    logits, _ = logits_at(model, last, input_ids=ids, prefix=pre)
                m = metric_values(logits, batch.index(idx), "logprob").sum()
                g_pre, g = torch.autograd.grad(m, [k_pre, k_suf], allow_unused=True)  # g: [L, rows, T - n_pre, H]
            for j, role in enumerate(roles):
                if role == ALL:  # a unit live at every position: its keep mask spans the whole prompt
                    out[:, :, j] += g.sum((1, 2)).float() + (g_pre.sum((1, 2)).float() if n_pre else 0.0)
                    continue
                pos = batch.positions[role][idx] - n_pre
                out[:, :, j] += g[:, torch.arange(len(idx)), pos, :].sum(1).float()
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return out / n


@dataclass
class SearchResult:
    """What :func:`search_circuit` found: the circuit, the curve and the record of the search."""

    circuit: Circuit
    curve: list[dict]
    record: dict = field(default_factory=dict)


def _units_to_circuit(units, spec, task: str, meta: dict) -> Circuit:
    heads = [CircuitHead(h, role, role, 0.0) for h, role in units]
    return Circuit(heads, task, spec.n_layers, spec.n_heads, meta)


def curve_circuit(path, units: int) -> Circuit:
    """The circuit at the search's curve point of ``units`` units, with that point's held-out record in its meta.
    ``path``: the search's streamed ``OUT.curve.jsonl`` (its first line the search's header, then one point per
    line: what a search stopped early leaves) or the circuit JSON a finished search wrote (its ``meta.curve``).
    Bisection and pruning may revisit a size: the last point of that size is taken. A size the curve lacks is an
    error that lists the sizes it has."""
    path = str(path)
    if not os.path.isfile(path):
        raise UsageError(f"path: {path!r} does not exist (expected a search's .curve.jsonl or circuit JSON)")
    if path.endswith(".jsonl"):
        lines = []
        with open(path, encoding="utf-8") as f:
            for n, x in enumerate(f, 1):
                if not x.strip():
                    continue
                try:
                    lines.append(json.loads(x))
                except json.JSONDecodeError as e:
                    raise UsageError(f"path: {path!r} line {n} is not valid JSON ({e.msg})") from None
        if not lines or "search" not in lines[0]:
            raise UsageError(f"path: {path!r} is not a search's curve (its first line must be the search header)")
        head, rows = lines[0]["search"], lines[1:]
    else:
        c = Circuit.load(path)
        head = {"task": c.task, "n_layers": c.n_layers, "n_heads": c.n_heads}
        rows = c.meta.get("curve") or []
    rows = [r for r in rows if "unit_list" in r]
    hit = [r for r in rows if r["units"] == units]
    if not hit:
        raise UsageError(f"units: no curve point in {path!r} has {units!r} units (sizes measured: "
                         f"{[r['units'] for r in rows]})")
    row = hit[-1]
    unit_list = [(Head.parse(h), r) for h, r in row["unit_list"]]
    record = {k: v for k, v in row.items() if k != "unit_list"}
    spec = SimpleNamespace(n_layers=head["n_layers"], n_heads=head["n_heads"])
    return _units_to_circuit(unit_list, spec, head["task"], {"method": "search", "curve_point": record,
                                                           "source": os.path.basename(path)})


def search_circuit(model: nn.Module, search: EncodedBatch, heldout: EncodedBatch, reference: EncodedBatch, *,
                   roles, target: float = 0.85, protocol: str = "strict", start: int = 8, growth: float = 2.0,
                   max_units: int | None = None, n_random: int = 10, n_random_curve: int = 3, prune: bool = True,
                   max_prune_evals: int = 12, seed: int = 0, batch_size: int = 64,
                   task: str = "entity-tracking", progress: bool = False, on_point=None) -> SearchResult:
    """Grow, bisect and prune a circuit of (head, role) units to the smallest that keeps ``target`` of the task.

    Args:
        search: prompts the search decides on (gradients, the target check, pruning).
        heldout: prompts the curve and the final record are measured on (never used to decide).
        reference: prompts of the held-out set's length whose per-position mean z replaces ablated heads (the
            reference's ablation set: the same prompts with the query letter replaced).
        roles: the position roles units may sit at.
        target: faithfulness (circuit / full accuracy on the search prompts) to reach, in (0, 1].
        protocol: ``strict`` (the paper's) or ``lenient`` (:data:`fastcd.metrics.PROTOCOL_TEXT`).
        start, growth: the first size in units and the factor each step grows by.
        max_units: stop growing there (default: every unit).
        n_random: random circuits for the final record; ``n_random_curve`` at each curve point.
        on_point: called with each curve point (a dict, ``unit_list`` its units) as soon as it is measured.

    Returns:
        A :class:`SearchResult`; ``record`` holds the final faithfulness record and the search's cost.
    """
    check_protocol(protocol)
    roles = list(roles)
    check_search_args(target=target, roles=roles, task_roles=[r for r in search.positions], n_heldout=len(heldout),
                      n_random=n_random, growth=growth, start=start, max_units=max_units)
    check_aligned(heldout, reference, "reference")
    check_aligned(search, heldout, "held-out")
    spec = get_adapter(model).spec
    all_units = [(h, r) for h in spec.all_heads() for r in roles]
    max_units = len(all_units) if max_units is None else min(max_units, len(all_units))
    t0 = time.time()
    evals = {"search": 0, "heldout": 0, "gradients": 0}
    rng = random.Random(seed)

    def log(msg):
        if progress:
            print(f"fastcd search [{time.time() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    with torch.no_grad():
        means = mean_z(model, reference.input_ids, batch_size=batch_size)
        full_s = float(clean_metric(model, search, "accuracy", None, batch_size)[0].mean())
        full_h = float(clean_metric(model, heldout, "accuracy", None, batch_size)[0].mean())
    if full_s == 0 or full_h == 0:
        raise UsageError(f"the full model scores 0 on the {'search' if full_s == 0 else 'held-out'} prompts: no "
                         "task to keep (choose a task or box count the model solves)")
    n_right = round(full_s * len(search))
    if n_right < MIN_SEARCH_CORRECT:
        import warnings

        warnings.warn(f"the full model answers only {n_right} of the {len(search)} search prompts: the target is "
                      f"decided on so few that pruning fits their noise (Qwen2.5-Coder-0.5B, 26 right: 0.885 on the "
                      f"search prompts, 0.661 held-out); use >= {MIN_SEARCH_CORRECT} right ones (more search prompts)",
                      stacklevel=2)
    kw = dict(batch_size=batch_size, protocol=protocol)

    def acc(batch, units) -> float:
        hits = circuit_correct(model, batch, means, list(units), **kw)
        return sum(hits) / len(hits)

    # the protocol's ceiling with these roles: every head live at every role (at every position: the full model)
    if roles == [ALL]:
        ceiling = {"search": 1.0, "heldout": 1.0}
    else:
        ceiling = {"search": acc(search, all_units) / full_s, "heldout": acc(heldout, all_units) / full_h}
        evals["search"] += 1
        evals["heldout"] += 1
    log(f"every head at the roles {roles}: faithfulness {ceiling['search']:.3f} (search), {ceiling['heldout']:.3f} "
        "(held-out)" + ("" if ceiling["search"] >= target else f": below the target {target}, no circuit of these "
                                                                "roles can reach it under this protocol"))

    def faith_search(units) -> float:
        evals["search"] += 1
        return acc(search, units) / full_s

    curve: list[dict] = []

    def point(units, stage: str) -> dict:
        evals["heldout"] += 1 + n_random_curve
        c = acc(heldout, units)
        rand = [acc(heldout, random_units(spec, units, rng)) for _ in range(n_random_curve)]
        row = {"stage": stage, "units": len(units), "heads": len({h for h, _ in units}),
               "head_share": len({h for h, _ in units}) / spec.n_total_heads,
               "circuit_accuracy": c, "faithfulness": c / full_h, "random_accuracy": statistics.mean(rand),
               "random_sd": statistics.stdev(rand) if len(rand) > 1 else None, "random_accuracies": rand,
               "full_accuracy": full_h, "unit_list": [[str(h), r] for h, r in units]}
        curve.append(row)
        if on_point is not None:
            on_point(row)
        log(f"{stage}: {row['units']} units / {row['heads']} heads: held-out faithfulness {row['faithfulness']:.3f}"
            f" (random circuits {row['random_accuracy'] / full_h:.3f}; accuracy {c:.3f}, random "
            f"{row['random_accuracy']:.3f}, full {full_h:.3f})")
        return row

    def ranked_outside(units) -> list:
        evals["gradients"] += 1
        g = unit_gradients(model, search, means, units, roles, protocol=protocol, batch_size=min(batch_size, 32))
        inside = set(units)
        cand = [(float(g[h.layer, h.head, j]), (h, r)) for h in spec.all_heads() for j, r in enumerate(roles)
                if (h, r) not in inside]
        return [u for _, u in sorted(cand, key=lambda x: -x[0])]

    # 1. grow
    units: list = []
    prev: list = []
    reached, f = False, 0.0
    while len(units) < max_units:
        size = min(max_units, start if not units else math.ceil(len(units) * growth))
        order = ranked_outside(units)
        prev, step = list(units), order[: size - len(units)]
        units = units + step
        f = faith_search(units)
        log(f"grow: {len(units)} units: search faithfulness {f:.3f}")
        point(units, "grow")
        if f >= target:
            reached = True
            break
    # 2. bisect the last step to its smallest prefix that reaches the target
    if reached and prev:
        lo, hi = 0, len(step)  # prefix lengths: lo fails (or is prev), hi reaches
        while hi - lo > max(1, len(step) // 16):
            mid = (lo + hi) // 2
            fm = faith_search(prev + step[:mid])
            log(f"bisect: {len(prev) + mid} units: search faithfulness {fm:.3f}")
            if fm >= target:
                hi, f_hi = mid, fm
            else:
                lo = mid
        if hi < len(step):
            units, f = prev + step[:hi], f_hi
            point(units, "bisect")
    # 3. prune: drop the units whose removal costs least, in chunks, while the target holds
    if reached and prune:
        tries = 0
        chunk = max(1, len(units) // 4)
        cost: list = []
        while tries < max_prune_evals and chunk >= 1 and len(units) > 1:
            if not cost:  # the removal costs at the current circuit (recomputed after each accepted drop)
                evals["gradients"] += 1
                g = unit_gradients(model, search, means, units, roles, protocol=protocol,
                                   batch_size=min(batch_size, 32))
                cost = sorted(units, key=lambda u: float(g[u[0].layer, u[0].head, roles.index(u[1])]))
            trial = [u for u in units if u not in set(cost[:chunk])]
            tries += 1
            ft = faith_search(trial)
            log(f"prune: drop {chunk} -> {len(trial)} units: search faithfulness {ft:.3f}")
            if ft >= target:
                units, cost, f = trial, [], ft
            else:
                chunk //= 2
        point(units, "pruned")
    # 4. the final record on held-out prompts (the last curve point is the final circuit: its accuracy is known),
    # with n_random random circuits of the same size and roles
    assert curve[-1]["units"] == len(units)
    with torch.no_grad():
        rand = [acc(heldout, random_units(spec, units, rng)) for _ in range(n_random)]
    evals["heldout"] += n_random
    c = curve[-1]["circuit_accuracy"]
    n_heads = len({h for h, _ in units})
    record = {
        "target": target, "reached": reached, "protocol": protocol,
        "protocol_text": PROTOCOL_TEXT[protocol],
        "roles": roles, "full_accuracy": full_h, "circuit_accuracy": c, "faithfulness": c / full_h,
        "random_circuit_accuracy": statistics.mean(rand), "random_circuit_sd": statistics.stdev(rand),
        "random_circuit_accuracies": rand, "n_random": n_random, "circuit_units": len(units),
        "circuit_size": n_heads, "n_heads_total": spec.n_total_heads, "head_share": n_heads / spec.n_total_heads,
        "units_per_role": {r: sum(1 for _, x in units if x == r) for r in roles},
        "all_heads_at_roles_faithfulness": ceiling,
        "n_prompts": len(heldout), "n_search_prompts": len(search), "search_full_accuracy": full_s,
        "search_faithfulness": f, "evaluations": evals,
        "seconds": round(time.time() - t0, 1),
    }
    circuit = _units_to_circuit(units, spec, task, {"method": "search", "evaluation": record})
    log(f"done: {len(units)} units, {n_heads} heads ({100 * n_heads / spec.n_total_heads:.1f}%), held-out "
        f"faithfulness {record['faithfulness']:.3f}, random {record['random_circuit_accuracy']:.3f}")
    return SearchResult(circuit, curve, record)


__all__ = ["MIN_HELDOUT", "MIN_SEARCH_CORRECT", "SearchResult", "check_search_args", "curve_circuit", "search_circuit",
           "unit_gradients"]
