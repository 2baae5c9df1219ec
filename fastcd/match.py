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
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fastcd import _ext
from fastcd.discover import ALL, Circuit, _positions
from fastcd.hooks import capture_z, mean_z
from fastcd.io import read_json, write_json_atomic
from fastcd.models import Head, get_adapter, logits_at
from fastcd.reference import check_cka_inputs, cka_matrix_ref
from fastcd.tasks.base import EncodedBatch

logger = logging.getLogger("fastcd")
METHODS = ("ablation", "cka", "combined", "random")


# ------------------------------------------------------------------------------------------------
# All-pairs CKA: C++ scorer, vectorised torch, per-pair reference
# ------------------------------------------------------------------------------------------------
def cka_matrix_torch(a, b, *, chunk: int = 64, dtype=None) -> np.ndarray:
    """All-pairs biased linear CKA in vectorised torch, Gram form, chunked over heads.

    Each head's centred Gram's upper triangle (off-diagonals times sqrt 2) is one row, built in float64 and
    normalised; all pairs are one matrix product of the rows in ``dtype`` (float64 by default; float32 for
    twice the speed at about 1e-7). ``chunk`` heads' full Grams are alive at a time. Runs on the inputs' device.
    """
    if dtype not in (None, torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    a = a if torch.is_tensor(a) else torch.as_tensor(np.asarray(a))
    b = b if torch.is_tensor(b) else torch.as_tensor(np.asarray(b))
    check_cka_inputs(a, b)
    m = a.shape[1]
    iu = torch.triu_indices(m, m, device=a.device)
    w = torch.full((iu.shape[1],), 2.0**0.5, dtype=torch.float64, device=a.device)  # sqrt(2) in float32: 1e-8
    w[iu[0] == iu[1]] = 1.0

    def packed(x: torch.Tensor) -> torch.Tensor:
        rows = []
        for i in range(0, x.shape[0], chunk):
            xc = x[i : i + chunk].double()
            xc = xc - xc.mean(1, keepdim=True)  # [c, m, d]
            g = xc @ xc.transpose(1, 2)  # [c, m, m]
            rows.append(g[:, iu[0], iu[1]] * w)  # [c, P]
            del g  # free the full Grams before the next chunk
        return torch.cat(rows)

    def unit(g: torch.Tensor) -> torch.Tensor:
        n = g.norm(dim=1, keepdim=True)
        return torch.where(n > 0, g / n.clamp_min(1e-300), torch.zeros_like(g)).to(dtype or torch.float64)

    return (unit(packed(a)) @ unit(packed(b)).T).double().cpu().numpy()


def cka_matrix(a, b, *, impl: str | None = None, form: str = "auto", max_bytes: int = 256 << 20,
               precision: str = "float64") -> np.ndarray:
    """All-pairs biased linear CKA, ``[heads_a, m, d_a] x [heads_b, m, d_b] -> [heads_a, heads_b]`` float64.

    Args:
        impl: ``"cpp"`` (fastcd._C, bounded memory), ``"torch"`` (vectorised), ``"python"`` (per-pair
            reference) or None: the C++ scorer when built, torch otherwise (announced once).
    """
    if impl is None:
        impl = "cpp" if _ext.HAS_CPP else "torch"
        from fastcd.models import announce

        announce(f"fastcd: CKA scorer uses {'fastcd._C (C++)' if impl == 'cpp' else 'the torch fallback'}")
    if impl == "cpp":
        if not _ext.HAS_CPP:
            raise RuntimeError(f"impl='cpp' was asked for but fastcd._C is not built ({_ext.CPP_ERROR})")
        a_np = _as_float_array(a)
        b_np = _as_float_array(b)
        try:
            return _ext._C.cka_matrix(a_np, b_np, form, int(max_bytes), precision)
        except (TypeError, RuntimeError) as e:
            raise ValueError(str(e)) from None
    if impl == "torch":
        return cka_matrix_torch(a, b, dtype=torch.float32 if precision == "float32" else torch.float64)
    if impl == "python":
        return cka_matrix_ref(a, b)
    raise ValueError(f"impl must be 'cpp', 'torch', 'python' or None, got {impl!r}")


def _as_float_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.numpy() if x.dtype in (torch.float32, torch.float64) else x.double().numpy()
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    return np.ascontiguousarray(x)


# ------------------------------------------------------------------------------------------------
# Matching object
# ------------------------------------------------------------------------------------------------
@dataclass
class Pair:
    teacher: Head
    student: Head
    position: str  # position role where both heads' activations are taken
    group: str = ""
    scores: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"teacher": str(self.teacher), "student": str(self.student), "position": self.position,
                "group": self.group, "scores": self.scores}


@dataclass
class Matching:
    """Teacher -> student head pairs with their scores and positions; JSON with heads named ``L{l}H{h}``."""

    pairs: list[Pair]
    method: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.pairs:
            raise ValueError("matching must hold at least one pair")

    def student_heads(self) -> list[Head]:
        return sorted({p.student for p in self.pairs})

    def teacher_heads(self) -> list[Head]:
        return sorted({p.teacher for p in self.pairs})

    def __len__(self) -> int:
        return len(self.pairs)

    def __str__(self) -> str:
        lines = [f"Matching({self.method}, {len(self.pairs)} pairs, {len(self.student_heads())} student heads)",
                 f"  {'teacher':>8} -> {'student':<8} {'position':<14} scores"]
        for p in self.pairs:
            sc = " ".join(f"{k}={v:.3f}" for k, v in p.scores.items() if isinstance(v, float))
            lines.append(f"  {str(p.teacher):>8} -> {str(p.student):<8} {p.position:<14} {sc}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"method": self.method, "pairs": [p.to_json() for p in self.pairs], "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict) -> Matching:
        try:
            pairs = [Pair(Head.parse(p["teacher"]), Head.parse(p["student"]), p["position"], p.get("group", ""),
                          dict(p.get("scores", {}))) for p in d["pairs"]]
            return cls(pairs, d["method"], d.get("meta", {}))
        except KeyError as e:
            raise ValueError(f"matching JSON is missing key {e}") from None

    def save(self, path) -> None:
        write_json_atomic(self.to_json(), path)

    @classmethod
    def load(cls, path) -> Matching:
        return cls.from_json(read_json(path, "matching"))

    def check_models(self, teacher, student) -> None:
        """A clear error when a pair names a head that the models lack. Models or paths (checked from their
        config, before any weight loads); None skips that side."""
        from fastcd.models import spec_of

        ts = None if teacher is None else spec_of(teacher)
        ss = None if student is None else spec_of(student)
        for p in self.pairs:
            if ts is not None:
                ts.check_head(p.teacher, "matching teacher head")
            if ss is not None:
                ss.check_head(p.student, "matching student head")


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
    from fastcd.discover import PatchSource, patch_heads_batched

    n, t = clean.input_ids.shape
    if not clean.equal_length or means.shape[1] != t:
        raise ValueError("prompts must share one token length, the one the means were computed for")
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
        raise ValueError("heads must name at least one (head, position role)")
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


def ablation_scores(inp: MatchInputs, *, student_position: str = ALL, max_batch: int | None = None,
                    progress: bool = False, metric: str = "accuracy") -> dict:
    """ΔP for every student head and every teacher circuit head (Eqs. 3-4)."""
    t_dev = next(inp.teacher.parameters()).device
    s_dev = next(inp.student.parameters()).device
    t_means = mean_z(inp.teacher, inp.teacher_ref.input_ids.to(t_dev))
    s_means = mean_z(inp.student, inp.student_ref.input_ids.to(s_dev))
    t_heads = _circuit_heads(inp.circuit)
    s_all = get_adapter(inp.student).spec.all_heads()
    s_base, s_abl = ablation_accuracies(inp.student, inp.student_clean, [(h, student_position) for h in s_all],
                                        s_means, max_batch=max_batch, progress=progress, metric=metric,
                                        desc="ablation matching, student heads")
    t_base, t_abl = ablation_accuracies(inp.teacher, inp.teacher_clean, [(h, r) for h, r, _ in t_heads], t_means,
                                        max_batch=max_batch, progress=progress, metric=metric,
                                        desc="ablation matching, teacher circuit heads")
    return {
        "student_base": s_base, "teacher_base": t_base,
        "student_heads": s_all, "student_drop": [s_base - a for a in s_abl],  # Eq. 3
        "teacher_heads": t_heads, "teacher_drop": [s_base - a for a in t_abl],  # Eq. 4: student's baseline
        "student_ablated": s_abl, "teacher_ablated": t_abl,
    }


def match_ablation(inp: MatchInputs, *, k: int | None = None, direction: str = "student_to_teacher",
                   student_position: str = ALL, scores: dict | None = None, progress: bool = False,
                   metric: str = "accuracy") -> Matching:
    """The paper's rule: nearest ablation drop (Eq. 5), many-to-one; ties to the earliest head."""
    if direction not in ("student_to_teacher", "teacher_to_student"):
        raise ValueError(f"direction must be 'student_to_teacher' or 'teacher_to_student', got {direction!r}")
    if metric not in ("accuracy", "prob"):
        raise ValueError(f"metric must be 'accuracy' (the paper's P) or 'prob' (continuous), got {metric!r}")
    sc = scores or ablation_scores(inp, student_position=student_position, progress=progress, metric=metric)
    s_heads, s_drop = sc["student_heads"], np.array(sc["student_drop"])
    t_heads, t_drop = sc["teacher_heads"], np.array(sc["teacher_drop"])
    k = len(t_heads) if k is None else k
    if not isinstance(k, int) or not 1 <= k <= len(s_heads):
        raise ValueError(f"k must be in 1..{len(s_heads)} (the student's heads), got {k}")
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
                                        "student_base": sc["student_base"],
                                        "teacher_base": sc["teacher_base"], "student_position": student_position})


@torch.no_grad()
def head_activations(model: nn.Module, batch: EncodedBatch, heads: list[Head], role: str,
                     batch_size: int = 128) -> torch.Tensor:
    """``[len(heads), n, d_head]`` z of each head at position ``role`` (``all``: flattened over positions)."""
    device = next(model.parameters()).device
    outs = []
    for i in range(0, len(batch), batch_size):
        sub = batch.index(range(i, min(i + batch_size, len(batch))))
        pos = None if role == ALL else _positions(sub, role)
        with capture_z(model, heads, positions=pos, detach=True) as cache:
            logits_at(model, sub.positions["last"], input_ids=sub.input_ids.to(device))  # no full logits
        z = cache.stack().float().cpu()  # [b, k, H, D]
        outs.append(z.permute(2, 0, 1, 3).reshape(len(heads), -1, z.shape[-1]))
    return torch.cat(outs, dim=1)


def cka_scores(inp: MatchInputs, *, impl: str | None = None) -> tuple[np.ndarray, list, list[Head]]:
    """``[n_teacher_circuit_heads, n_student_heads]`` CKA, each row at its teacher head's position role."""
    t_heads = _circuit_heads(inp.circuit)
    s_all = get_adapter(inp.student).spec.all_heads()
    out = np.zeros((len(t_heads), len(s_all)))
    for role in sorted({r for _, r, _ in t_heads}):
        rows = [i for i, (_, r, _) in enumerate(t_heads) if r == role]
        xt = head_activations(inp.teacher, inp.teacher_clean, [t_heads[i][0] for i in rows], role)  # unique per role
        xs = head_activations(inp.student, inp.student_clean, s_all, role)
        out[rows] = cka_matrix(xt.numpy(), xs.numpy(), impl=impl)
    return out, t_heads, s_all


def _assign(cost: np.ndarray) -> list[tuple[int, int]]:
    from scipy.optimize import linear_sum_assignment

    r, c = linear_sum_assignment(cost)
    return list(zip(r.tolist(), c.tolist()))


def match_cka(inp: MatchInputs, *, impl: str | None = None) -> Matching:
    """One-to-one assignment maximising total CKA between teacher circuit heads and student heads."""
    cka, t_heads, s_all = cka_scores(inp, impl=impl)
    if len(t_heads) > len(s_all):
        raise ValueError(f"the circuit has {len(t_heads)} heads but the student only {len(s_all)}: "
                         "one-to-one assignment is impossible")
    pairs = [Pair(t_heads[i][0], s_all[j], t_heads[i][1], t_heads[i][2], {"cka": float(cka[i, j])})
             for i, j in _assign(1.0 - cka)]
    return Matching(pairs, "cka", {"mean_cka": float(np.mean([p.scores["cka"] for p in pairs]))})


def match_combined(inp: MatchInputs, *, weight: float = 0.5, impl: str | None = None,
                   student_position: str = ALL, progress: bool = False) -> Matching:
    """One-to-one assignment minimising ``weight * (1 - CKA) + (1 - weight) * d_abl``."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    cka, t_heads, s_all = cka_scores(inp, impl=impl)
    sc = ablation_scores(inp, student_position=student_position, progress=progress)
    d = np.abs(np.array(sc["teacher_drop"])[:, None] - np.array(sc["student_drop"])[None])  # [n_t, n_s]
    cost = weight * (1.0 - cka) + (1.0 - weight) * d
    pairs = [Pair(t_heads[i][0], s_all[j], t_heads[i][1], t_heads[i][2],
                  {"cka": float(cka[i, j]), "d_abl": float(d[i, j]), "cost": float(cost[i, j])})
             for i, j in _assign(cost)]
    return Matching(pairs, "combined", {"weight": weight})


def match_random(circuit: Circuit, student: nn.Module, *, seed: int = 0) -> Matching:
    """Each teacher circuit head paired with a random distinct student head (seeded control)."""
    t_heads = _circuit_heads(circuit)
    s_all = get_adapter(student).spec.all_heads()
    if len(t_heads) > len(s_all):
        raise ValueError(f"the circuit has {len(t_heads)} heads but the student only {len(s_all)}")
    pick = random.Random(seed).sample(s_all, len(t_heads))
    pairs = [Pair(t, s, role, group, {}) for (t, role, group), s in zip(t_heads, pick)]
    return Matching(pairs, "random", {"seed": seed})


def match(inp: MatchInputs, method: str = "ablation", **kwargs) -> Matching:
    """Dispatch to the matchers: ``ablation``, ``cka``, ``combined`` or ``random``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "ablation":
        return match_ablation(inp, **kwargs)
    if method == "cka":
        return match_cka(inp, **kwargs)
    if method == "combined":
        return match_combined(inp, **kwargs)
    return match_random(inp.circuit, inp.student, **kwargs)
