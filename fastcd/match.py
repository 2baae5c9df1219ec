"""Functional correspondence between teacher circuit heads and student heads (PAPER.md §3).

- Ablation matching, the paper's rule (Eqs. 3-5): ``ΔP_s(h_s) = P_base^s - P_abl^s(h_s)``,
  ``ΔP_t(h_t) = P_base^s - P_abl^t(h_t)`` (the teacher's drop relative to the *student's* baseline),
  ``d(h_s, h_t) = |ΔP_s - ΔP_t|``; each candidate student head maps to the teacher head with the nearest drop
  (many-to-one), or each teacher head to the nearest student head. Candidates: the top-K student heads by
  ablation effect.
- CKA matching: all-pairs linear CKA between every teacher circuit head and every student head on the same
  prompts, each at the teacher head's position role; one-to-one assignment (scipy's linear_sum_assignment).
- Combined: cost ``w * (1 - CKA) + (1 - w) * d_abl`` with the same assignment.
- Random pairing (the paper's "CE + Rand CKA" control), seeded.
"""

from __future__ import annotations

import logging
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fastcd import _ext
from fastcd.artifacts import Circuit, Matching, Pair
from fastcd.cka import cka_matrix, cka_matrix_torch
from fastcd.config import MATCH_METHODS
from fastcd.discover import PatchSource, patch_heads_batched
from fastcd.errors import NotApplicable, UsageError
from fastcd.hooks import ALL, capture_z, mean_z, role_positions
from fastcd.models import Head, get_adapter, logits_at, shared_prefix
from fastcd.tasks.base import EncodedBatch

logger = logging.getLogger("fastcd")
ROLES = "roles"  # student_position: ablate each candidate student head at each teacher unit's own role


# ------------------------------------------------------------------------------------------------
# Ablation accuracies
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def ablation_accuracies(model: nn.Module, clean: EncodedBatch, heads: list[tuple[Head, str]], means: torch.Tensor,
                        *, max_batch: int | None = None, progress: bool = False, desc: str = "ablation",
                        metric: str = "accuracy") -> tuple[float, list[float]]:
    """Baseline and mean-ablated value of ``metric`` (default: accuracy, the paper's P; ``prob``: the mean
    probability of the answer, continuous) for each (head, position role).

    Batched exact patching (:func:`fastcd.discover.patch_heads_batched` with ``metric``, mean source): rows
    (head, example) stacked along the batch, each ablating only its own head, with layer skipping and the lm_head
    on the last position only; one call per position role (``max_batch`` None: from the memory budget).
    """

    n, t = clean.input_ids.shape
    if not clean.equal_length or means.shape[1] != t:
        raise UsageError("prompts must share one token length, the one the means were computed for")
    src = PatchSource("mean", means)
    by_role: dict[str, list[int]] = {}
    for k, (_, role) in enumerate(heads):
        by_role.setdefault(role, []).append(k)
    if progress:
        rows = len(heads) * n
        print(f"fastcd: {desc}: {len(heads)} heads x {n} prompts = {rows:,} rows in {len(by_role)} batched "
              "patching call(s)", file=sys.stderr)
    base, out = None, [0.0] * len(heads)
    for role, ks in by_role.items():
        res = patch_heads_batched(model, clean, src, metric=metric, relative=False,
                                  position=None if role == ALL else role, heads=[heads[k][0] for k in ks],
                                  max_batch=max_batch, progress=progress)
        base = res.baseline
        for k in ks:
            h = heads[k][0]
            out[k] = base + float(res.scores[h.layer, h.head])
    if base is None:
        raise UsageError("heads must name at least one (head, position role)")
    return base, out


# ------------------------------------------------------------------------------------------------
# Matchers
# ------------------------------------------------------------------------------------------------
@dataclass
class MatchInputs:
    """Everything matching needs: models, the circuit, and both models' encodings of the same prompts."""

    teacher: nn.Module
    student: nn.Module
    circuit: Circuit
    teacher_clean: EncodedBatch
    student_clean: EncodedBatch
    teacher_ref: EncodedBatch  # reference prompts for per-position means (the corrupt prompts)
    student_ref: EncodedBatch


def _circuit_heads(circuit: Circuit) -> list[tuple[Head, str, str]]:
    """The circuit's units: unique (head, position role) with their group, in circuit order. A head that acts
    at two roles (role-wise discovery) is two units, each matched and aligned at its own position."""
    seen, out = set(), []
    for c in circuit.heads:
        if (c.head, c.position) not in seen:
            seen.add((c.head, c.position))
            out.append((c.head, c.position, c.group))
    return out


BASELINES = ("student", "own")


def ablation_scores(inp: MatchInputs, *, student_position: str = ALL, max_batch: int | None = None,
                    progress: bool = False, metric: str = "accuracy", baseline: str = "student") -> dict:
    """ΔP for every student head and every teacher circuit head (Eqs. 3-4). ``baseline``: what a teacher unit's
    ablated P is measured against: ``student`` (Eq. 4 as the paper writes it: P(student) - P(teacher, ablated)) or
    ``own`` (the teacher's own P: where the two models' P differ, Eq. 4's drop is mostly that gap)."""
    if baseline not in BASELINES:
        raise UsageError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    t_dev = next(inp.teacher.parameters()).device
    s_dev = next(inp.student.parameters()).device
    t_means = mean_z(inp.teacher, inp.teacher_ref.input_ids.to(t_dev))
    s_means = mean_z(inp.student, inp.student_ref.input_ids.to(s_dev))
    t_heads = _circuit_heads(inp.circuit)
    s_all = get_adapter(inp.student).spec.all_heads()
    s_roles = list(dict.fromkeys(r for _, r, _ in t_heads)) if student_position == ROLES else [student_position]
    s_base, s_abl = ablation_accuracies(inp.student, inp.student_clean, [(h, r) for r in s_roles for h in s_all],
                                        s_means, max_batch=max_batch, progress=progress, metric=metric,
                                        desc="ablation matching, student heads")
    t_base, t_abl = ablation_accuracies(inp.teacher, inp.teacher_clean, [(h, r) for h, r, _ in t_heads], t_means,
                                        max_batch=max_batch, progress=progress, metric=metric,
                                        desc="ablation matching, teacher circuit heads")
    return {
        "student_base": s_base, "teacher_base": t_base, "student_roles": s_roles,  # student_drop: role by role
        "student_heads": s_all, "student_drop": [s_base - a for a in s_abl],  # Eq. 3
        "teacher_heads": t_heads, "baseline": baseline,
        "teacher_drop": [(s_base if baseline == "student" else t_base) - a for a in t_abl],  # Eq. 4
        "student_ablated": s_abl, "teacher_ablated": t_abl,
    }


def match_ablation(inp: MatchInputs, *, k: int | None = None, direction: str = "student_to_teacher",
                   student_position: str = ALL, scores: dict | None = None, progress: bool = False,
                   metric: str = "accuracy", baseline: str = "student") -> Matching:
    """The paper's rule: nearest ablation drop (Eq. 5), many-to-one; ties to the earliest head.

    ``student_position``: where candidate student heads are ablated: ``all`` positions (default), one role, or
    ``"roles"``: at each role the circuit uses, each teacher unit matched among student heads at its own role.
    ``baseline``: Eq. 4's reference for the teacher's drops (:func:`ablation_scores`).
    """
    if direction not in ("student_to_teacher", "teacher_to_student"):
        raise UsageError(f"direction must be 'student_to_teacher' or 'teacher_to_student', got {direction!r}")
    if metric not in ("accuracy", "prob"):
        raise UsageError(f"metric must be 'accuracy' (the paper's P) or 'prob' (continuous), got {metric!r}")
    sc = scores or ablation_scores(inp, student_position=student_position, progress=progress, metric=metric,
                                   baseline=baseline)
    if student_position == ROLES:
        return _match_ablation_roles(sc, k, direction, metric)
    s_heads, s_drop = sc["student_heads"], np.array(sc["student_drop"])
    t_heads, t_drop = sc["teacher_heads"], np.array(sc["teacher_drop"])
    k = len(t_heads) if k is None else k
    if not isinstance(k, int) or not 1 <= k <= len(s_heads):
        raise UsageError(f"k must be in 1..{len(s_heads)} (the student's heads), got {k}")
    # candidates: the K most impactful student heads; stable sort keeps the lower head first on ties
    cand = sorted(range(len(s_heads)), key=lambda i: (-s_drop[i], i))[:k]
    pairs = []
    if direction == "student_to_teacher":
        nearest = _ext.nearest_indices(s_drop[cand], t_drop)
        for ci, ti in zip(cand, nearest.tolist()):
            t, role, group = t_heads[ti]
            pairs.append(Pair(t, s_heads[ci], role, group, {
                "d_abl": float(abs(s_drop[ci] - t_drop[ti])), "student_drop": float(s_drop[ci]),
                "teacher_drop": float(t_drop[ti])}))
    else:
        nearest = _ext.nearest_indices(t_drop, s_drop[cand])
        for ti, cj in enumerate(nearest.tolist()):
            t, role, group = t_heads[ti]
            ci = cand[cj]
            pairs.append(Pair(t, s_heads[ci], role, group, {
                "d_abl": float(abs(s_drop[ci] - t_drop[ti])), "student_drop": float(s_drop[ci]),
                "teacher_drop": float(t_drop[ti])}))
    return Matching(pairs, "ablation", {"direction": direction, "k": k, "metric": metric,
                                        "baseline": sc.get("baseline", "student"), "student_base": sc["student_base"],
                                        "teacher_base": sc["teacher_base"], "student_position": student_position})


def _match_ablation_roles(sc: dict, k: int | None, direction: str, metric: str) -> Matching:
    """Eq. 5 role by role: a teacher unit (head, role) pairs only with a student head ablated at the same role.
    Candidates at a role: the student heads with the largest drops there, as many as the circuit has units there
    (``k``: that many per role instead)."""
    s_heads, roles = sc["student_heads"], sc["student_roles"]
    n = len(s_heads)
    t_heads, t_drop = sc["teacher_heads"], np.array(sc["teacher_drop"])
    if k is not None and (not isinstance(k, int) or not 1 <= k <= n):
        raise UsageError(f"k must be in 1..{n} (the student's heads), got {k}")
    pairs = []
    for j, role in enumerate(roles):
        s_drop = np.array(sc["student_drop"][j * n:(j + 1) * n])
        units = [i for i, (_, r, _) in enumerate(t_heads) if r == role]
        cand = sorted(range(n), key=lambda i: (-s_drop[i], i))[:k or len(units)]
        if direction == "student_to_teacher":
            near = _ext.nearest_indices(s_drop[cand], t_drop[units]).tolist()
            links = [(units[u], cand[c]) for c, u in enumerate(near)]
        else:
            near = _ext.nearest_indices(t_drop[units], s_drop[cand]).tolist()
            links = [(units[u], cand[c]) for u, c in enumerate(near)]
        for ti, ci in links:
            t, r, group = t_heads[ti]
            pairs.append(Pair(t, s_heads[ci], r, group, {"d_abl": float(abs(s_drop[ci] - t_drop[ti])),
                                                        "student_drop": float(s_drop[ci]),
                                                        "teacher_drop": float(t_drop[ti])}))
    return Matching(pairs, "ablation", {"direction": direction, "k": k, "metric": metric, "student_position": ROLES,
                                        "baseline": sc.get("baseline", "student"), "student_base": sc["student_base"],
                                        "teacher_base": sc["teacher_base"]})


@torch.no_grad()
def head_activations(model: nn.Module, batch: EncodedBatch, heads: list[Head], role: str,
                     batch_size: int = 128) -> torch.Tensor:
    """``[len(heads), n, d_head]`` z of each head at position ``role`` (``all``: flattened over positions)."""
    device = next(model.parameters()).device
    outs = []
    for i in range(0, len(batch), batch_size):
        sub = batch.index(range(i, min(i + batch_size, len(batch))))
        pos = None if role == ALL else role_positions(sub, role)
        ids = sub.input_ids.to(device)
        prefix = None if pos is None else shared_prefix(model, ids, [pos, sub.positions["last"]])  # few-shot prompts
        with capture_z(model, heads, positions=pos if prefix is None else pos - prefix.length, detach=True) as cache:
            logits_at(model, sub.positions["last"], input_ids=ids, prefix=prefix)  # no full logits
        z = cache.stack().float().cpu()  # [b, k, H, D]
        outs.append(z.permute(2, 0, 1, 3).reshape(len(heads), -1, z.shape[-1]))
    return torch.cat(outs, dim=1)


def cka_scores(inp: MatchInputs, *, impl: str | None = None, shapes: dict | None = None
               ) -> tuple[np.ndarray, list, list[Head]]:
    """``[n_teacher_circuit_heads, n_student_heads]`` CKA, each row at its teacher head's position role.
    ``shapes`` (a dict) gets ``m`` (activation rows per head) and the teacher's and student's ``d_head``."""
    t_heads = _circuit_heads(inp.circuit)
    s_all = get_adapter(inp.student).spec.all_heads()
    out = np.zeros((len(t_heads), len(s_all)))
    for role in sorted({r for _, r, _ in t_heads}):
        rows = [i for i, (_, r, _) in enumerate(t_heads) if r == role]
        xt = head_activations(inp.teacher, inp.teacher_clean, [t_heads[i][0] for i in rows], role)  # unique per role
        xs = head_activations(inp.student, inp.student_clean, s_all, role)
        out[rows] = cka_matrix(xt.numpy(), xs.numpy(), impl=impl)
        if shapes is not None:
            shapes.update(m=min(shapes.get("m", xt.shape[1]), xt.shape[1]), d_teacher=xt.shape[2],
                          d_student=xs.shape[2])
    return out, t_heads, s_all


def cka_null(m: int, d_a: int, d_b: int, draws: int = 32, seed: int = 0) -> tuple[float, float]:
    """Mean and 95th percentile of the biased linear CKA of two independent isotropic Gaussian activation matrices
    ``[m, d_a]`` and ``[m, d_b]``: what two unrelated heads score by chance at this m (real unrelated heads, whose
    effective rank is lower, usually score less)."""

    g = torch.Generator().manual_seed(seed)
    v = torch.tensor([float(cka_matrix_torch(torch.randn(1, m, d_a, generator=g, dtype=torch.float64),
                                             torch.randn(1, m, d_b, generator=g, dtype=torch.float64))[0, 0])
                      for _ in range(draws)])
    return float(v.mean()), float(v.quantile(0.95))


def noise_floor(pairs: list, cka: np.ndarray, shapes: dict) -> dict:
    """The matching's noise floor: the Gaussian null at its m and d_head, how many pairs score at or below its
    95th percentile, and each teacher unit's median CKA over all student heads (what a typical head scores).
    Warns when any pair is within the null's reach."""
    import warnings

    m, dt, ds = shapes["m"], shapes["d_teacher"], shapes["d_student"]
    mean, p95 = cka_null(m, dt, ds)
    low = [p for p in pairs if p.scores["cka"] <= p95]
    floor = {"m": m, "null_mean": mean, "null_p95": p95, "pairs_within_null": len(low),
             "median_over_student_heads": float(np.median(cka))}
    if low:
        d = max(dt, ds)
        warnings.warn(f"CKA matching: {len(low)} of {len(pairs)} pairs score at or below {p95:.2f}, what two "
                      f"independent random heads reach at m={m} activation rows (d_head {dt}/{ds}; biased linear CKA, "
                      f"null mean {mean:.2f}; a typical student head scores {floor['median_over_student_heads']:.2f} "
                      f"here): they are not distinguishable from chance. Use more prompts (m >= {4 * d} puts the null "
                      "near 0.2)", stacklevel=3)
    return floor


def _assign(cost: np.ndarray) -> list[tuple[int, int]]:
    from scipy.optimize import linear_sum_assignment

    r, c = linear_sum_assignment(cost)
    return list(zip(r.tolist(), c.tolist()))


def match_cka(inp: MatchInputs, *, impl: str | None = None) -> Matching:
    """One-to-one assignment maximising total CKA between teacher circuit heads and student heads."""
    shapes: dict = {}
    cka, t_heads, s_all = cka_scores(inp, impl=impl, shapes=shapes)
    if len(t_heads) > len(s_all):
        raise UsageError(f"the circuit has {len(t_heads)} heads but the student only {len(s_all)}: "
                         "one-to-one assignment is impossible")
    pairs = [Pair(t_heads[i][0], s_all[j], t_heads[i][1], t_heads[i][2], {"cka": float(cka[i, j])})
             for i, j in _assign(1.0 - cka)]
    return Matching(pairs, "cka", {"mean_cka": float(np.mean([p.scores["cka"] for p in pairs])),
                                   "noise_floor": noise_floor(pairs, cka, shapes)})


def match_combined(inp: MatchInputs, *, weight: float = 0.5, impl: str | None = None,
                   student_position: str = ALL, progress: bool = False) -> Matching:
    """One-to-one assignment minimising ``weight * (1 - CKA) + (1 - weight) * d_abl``."""
    if not 0.0 <= weight <= 1.0:
        raise UsageError(f"weight must be in [0, 1], got {weight}")
    cka, t_heads, s_all = cka_scores(inp, impl=impl)
    sc = ablation_scores(inp, student_position=student_position, progress=progress)
    d = np.abs(np.array(sc["teacher_drop"])[:, None] - np.array(sc["student_drop"])[None])  # [n_t, n_s]
    cost = weight * (1.0 - cka) + (1.0 - weight) * d
    pairs = [Pair(t_heads[i][0], s_all[j], t_heads[i][1], t_heads[i][2],
                  {"cka": float(cka[i, j]), "d_abl": float(d[i, j]), "cost": float(cost[i, j])})
             for i, j in _assign(cost)]
    return Matching(pairs, "combined", {"weight": weight})


def match_random(circuit_or_matching: Circuit | Matching, student: nn.Module, *, seed: int = 0) -> Matching:
    """The random-pairing control (seeded). From a circuit: each teacher circuit unit paired with a random
    distinct student head. From a matching: the same pairs (teacher heads, positions) and the same number of
    trained student heads, each distinct student head replaced by a random distinct one."""
    s_all = get_adapter(student).spec.all_heads()
    if isinstance(circuit_or_matching, Matching):
        units = [(p.teacher, p.position, p.group, p.student) for p in circuit_or_matching.pairs]
        meta = {"seed": seed, "randomized_from": circuit_or_matching.method}
    else:
        units = [(t, role, group, i) for i, (t, role, group) in enumerate(_circuit_heads(circuit_or_matching))]
        meta = {"seed": seed}
    mine = list(dict.fromkeys(u[3] for u in units))  # the distinct student heads to re-draw
    if len(mine) > len(s_all):
        raise UsageError(f"the circuit has {len(mine)} heads but the student only {len(s_all)}")
    repl = dict(zip(mine, random.Random(seed).sample(s_all, len(mine))))
    return Matching([Pair(t, repl[key], role, group, {}) for t, role, group, key in units], "random", meta)


def match(inp: MatchInputs, method: str = "ablation", **kwargs) -> Matching:
    """Dispatch to the matchers: ``ablation``, ``cka``, ``combined`` or ``random``."""
    if method not in MATCH_METHODS:
        raise UsageError(f"method must be one of {MATCH_METHODS}, got {method!r}")
    fn = {"ablation": match_ablation, "cka": match_cka, "combined": match_combined}.get(method)
    m = fn(inp, **kwargs) if fn is not None else match_random(inp.circuit, inp.student, **kwargs)
    m.meta.setdefault("task", inp.circuit.task)  # what it was made for: a run of another task refuses it
    return m


def random_student_matching(m: Matching, student_heads: list, seed: int, rule: str) -> Matching:
    """The random-heads controls (rand-ce, ce+rand-cka): ``m``'s teacher units, each with a random student head
    (seeded by the run's seed alone, so both controls train the same heads on the same batches)."""
    pick = random.Random(seed).sample(student_heads, len(m.pairs))
    return Matching([Pair(p.teacher, s, p.position, p.group) for p, s in zip(m.pairs, pick)], "random",
                    {"seed": seed, "teacher_side": rule})


def permuted_matching(m: Matching, seed: int, rule: str) -> Matching:
    """The permuted-targets control (ce+perm-cka): the same student heads at their own positions; each pair's
    teacher target is another pair's (teacher head, role) unit, with no fixed point. The targets come from the
    teacher cache, so a target's role may differ from the student's position (``meta["teacher_units"]``).
    :class:`fastcd.errors.NotApplicable` when no such permutation exists."""
    units = [(p.teacher, p.position) for p in m.pairs]
    n = len(units)
    if len(set(units)) < 2:
        raise NotApplicable(f"ce+perm-cka needs at least two distinct teacher units in matching {rule!r}, got {units}")
    perm = list(range(n))
    rng = random.Random(seed)
    for _ in range(10000):
        rng.shuffle(perm)
        if all(units[perm[i]] != units[i] for i in range(n)):
            break
    else:
        raise NotApplicable(f"ce+perm-cka: no permutation of {units} moves every target")
    return Matching([Pair(units[perm[i]][0], p.student, p.position, p.group) for i, p in enumerate(m.pairs)],
                    "permuted", {"seed": seed, "teacher_units": [[str(units[perm[i]][0]), units[perm[i]][1]]
                                                                 for i in range(n)]})
