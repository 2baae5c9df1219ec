"""Plain Python / PyTorch twins of every fast path. Each one is the specification its fast path is tested
against, and the execution path wherever the fast path is unavailable."""

from __future__ import annotations

import math

import numpy as np

from fastcd.errors import UsageError
from fastcd.vocab import CKA_ESTIMATORS


def nearest_indices_ref(query, keys) -> np.ndarray:
    """Twin of ``fastcd._C.nearest_indices``: argmin_j |query_i - keys_j|, ties to the lowest j."""
    q = np.asarray(query, dtype=np.float64)
    k = np.asarray(keys, dtype=np.float64)
    if q.ndim != 1:
        raise UsageError(f"query must be a 1-D array, got {q.ndim} dimensions")
    if k.ndim != 1:
        raise UsageError(f"keys must be a 1-D array, got {k.ndim} dimensions")
    if k.shape[0] == 0:
        raise UsageError("keys must not be empty")
    for name, a in (("query", q), ("keys", k)):
        bad = np.flatnonzero(~np.isfinite(a))
        if bad.size:
            raise UsageError(f"{name} must be finite, found {a[bad[0]]} at index {int(bad[0])}")
    out = np.empty(q.shape[0], dtype=np.int64)
    for i, qi in enumerate(q.tolist()):
        best, best_d = 0, math.fabs(qi - k[0])
        for j in range(1, k.shape[0]):
            d = math.fabs(qi - k[j])
            if d < best_d:
                best, best_d = j, d
        out[i] = best
    return out


def linear_cka_ref(x, y, eps: float = 0.0):
    """Biased linear CKA of one pair (PAPER.md §4), the readable formula in torch.

    K = X X^T, L = Y Y^T, H = I - 11^T/m, HSIC(K, L) = tr(K H L H) / (m-1)^2,
    CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).

    Args:
        x: ``(m, p1)``; y: ``(m, p2)``.
        eps: added inside the square root (0 gives the exact value; a zero denominator then gives 0).
    """
    import torch

    x, y = torch.as_tensor(x), torch.as_tensor(y)
    m = x.shape[0]
    if eps == 0.0 and (not (x - x.mean(0)).any() or not (y - y.mean(0)).any()):
        return torch.zeros((), dtype=x.dtype)  # a constant head: CKA is defined as 0
    h = torch.eye(m, dtype=x.dtype, device=x.device) - 1.0 / m
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h) / (m - 1) ** 2  # noqa: E731
    den = torch.sqrt(hsic(k, k) * hsic(l, l) + eps)
    if eps == 0.0 and float(den) == 0.0:
        return torch.zeros((), dtype=x.dtype)
    return hsic(k, l) / den


def cka_matrix_ref(a, b):
    """Twin of ``fastcd._C.cka_matrix``: all-pairs biased linear CKA, one pair at a time, float64.

    Args:
        a: ``[heads_a, m, d_a]``; b: ``[heads_b, m, d_b]``.

    Returns:
        ``np.ndarray`` float64 ``[heads_a, heads_b]``; a head with constant activations scores 0.
    """
    import torch

    a = torch.as_tensor(np.asarray(a)).double()
    b = torch.as_tensor(np.asarray(b)).double()
    check_cka_inputs(a, b)
    out = np.zeros((a.shape[0], b.shape[0]))
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            out[i, j] = float(linear_cka_ref(a[i], b[j]))
    return out


def check_cka_inputs(a, b) -> None:
    """The argument checks shared by every implementation of the all-pairs CKA scorer."""
    for name, x in (("a", a), ("b", b)):
        if x.dim() != 3:
            raise UsageError(f"{name} must have shape [heads, m, d], got {x.dim()} dimensions")
        if x.shape[0] < 1 or x.shape[2] < 1:
            raise UsageError(f"{name} must have at least one head and one feature")
        if x.shape[1] < 2:
            raise UsageError(f"{name} must have m >= 2 samples, got {x.shape[1]}")
        if not bool(x.isfinite().all()):
            raise UsageError(f"{name} must be finite, found a non-finite value")
    if a.shape[1] != b.shape[1]:
        raise UsageError(f"a and b must have the same m (samples): a has {a.shape[1]}, b has {b.shape[1]}")


def cka_loss_ref(x, y, *, eps: float = 1e-8, upcast: bool = True, estimator: str = "biased"):
    """Alignment loss of P head pairs: ``sum_p (1 - CKA(x_p, y_p))`` (paper Eq. 7, summed over pairs).

    ``estimator="biased"`` (the paper's): linear CKA in feature form on centred activations that are first
    scaled to unit Frobenius norm, with eps inside the square root so that it is never NaN (a constant head gives
    CKA 0 and a finite gradient):
    ``X^ = Xc / ||Xc||_F``, ``CKA = ||Y^^T X^||_F^2 / sqrt(||X^^T X^||_F^2 ||Y^^T Y^||_F^2 + eps)``.
    The scaling makes the result independent of the activations' scale (eps is relative: it matters only for a
    dead head), and nothing overflows in float32 at scale 1e4 or underflows at 1e-4. The norms are constants in
    the backward pass: exact CKA is scale-invariant, so its gradient is orthogonal to Xc and this drops a term
    of order eps only (the Triton kernel does the same).

    ``estimator="unbiased"``: debiased CKA from the unbiased HSIC estimator (Song et al. 2012), in Gram form
    (``m x m``, zeroed diagonals): not pulled towards 1 by the finite batch the way the biased estimator is
    (two independent Gaussian heads of width 64 score about 0.7 at m=32 with the biased one). Needs m >= 4; its
    value can be slightly negative. Torch only.

    Args:
        x: student activations ``[P, m, d_s]`` (or ``[m, d_s]`` for one pair); keeps its graph.
        y: teacher activations ``[P, m, d_t]`` (or ``[m, d_t]``).
        upcast: compute in float32 at least (bf16/fp16 inputs lose the centring otherwise).

    Returns:
        ``(loss, cka)``: the scalar loss and the per-pair CKA ``[P]``.
    """
    import torch

    if estimator not in ESTIMATORS:
        raise UsageError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if x.dim() == 2:
        x, y = x[None], y[None]
    if x.dim() != 3 or y.dim() != 3:
        raise UsageError(f"x and y must be [P, m, d] (or [m, d]), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[:2] != y.shape[:2]:
        raise UsageError(f"x and y must share P and m, got {tuple(x.shape[:2])} and {tuple(y.shape[:2])}")
    if x.shape[1] < 2:
        raise UsageError(f"CKA needs a batch of m >= 2 examples, got m={x.shape[1]}")
    if estimator == "unbiased" and x.shape[1] < 4:
        raise UsageError(f"the unbiased HSIC estimator needs m >= 4 examples, got m={x.shape[1]}")
    with torch.autocast(x.device.type, enabled=False):  # under autocast the matmuls below would run in bf16/fp16
        return _cka_loss_body(x, y, eps, upcast, estimator)


def _cka_loss_body(x, y, eps, upcast, estimator):
    import torch

    if upcast:
        x, y = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, (
            y.float() if y.dtype in (torch.float16, torch.bfloat16) else y)
    y = y.to(x.dtype)
    xc = x - x.mean(1, keepdim=True)  # [P, m, d_s]
    yc = y - y.mean(1, keepdim=True)  # [P, m, d_t]
    tiny = torch.finfo(x.dtype).tiny
    xc = xc / _frobenius(xc.detach()).clamp_min(tiny)[:, None, None]
    yc = yc / _frobenius(yc.detach()).clamp_min(tiny)[:, None, None]
    if estimator == "unbiased":
        m = x.shape[1]  # Gram matrices of rows with mean square norm 1, so the HSICs are O(1) next to eps
        kx, ky = m * (xc @ xc.transpose(1, 2)), m * (yc @ yc.transpose(1, 2))  # [P, m, m]
        hxy, hxx, hyy = _hsic_unbiased(kx, ky), _hsic_unbiased(kx, kx), _hsic_unbiased(ky, ky)
        cka = hxy / torch.sqrt((hxx * hyy).clamp_min(0) + eps)
        return (1.0 - cka).sum(), cka
    cross = (yc.transpose(1, 2) @ xc).pow(2).sum((1, 2))  # ||Yc^T Xc||_F^2, [P]
    sxx = (xc.transpose(1, 2) @ xc).pow(2).sum((1, 2))  # ||Xc^T Xc||_F^2
    syy = (yc.transpose(1, 2) @ yc).pow(2).sum((1, 2))
    cka = cross / torch.sqrt(sxx * syy + eps)
    return (1.0 - cka).sum(), cka


ESTIMATORS = CKA_ESTIMATORS  # fastcd.vocab holds the vocabulary


def _frobenius(x):
    """Per-pair Frobenius norm of ``[P, m, d]``, computed without overflow (max-scaled)."""
    scale = x.abs().amax((1, 2)).clamp_min(1e-30)
    return (x / scale[:, None, None]).pow(2).sum((1, 2)).sqrt() * scale


def _hsic_unbiased(k, l):
    """Unbiased HSIC (Song et al. 2012, Eq. 5) of ``[P, m, m]`` Gram matrices, up to the factor 1/(m(m-3)) that
    cancels in CKA: ``tr(K~L~) + 1'K~1 1'L~1 / ((m-1)(m-2)) - 2/(m-2) 1'K~L~1`` with zeroed diagonals."""
    import torch

    m = k.shape[-1]
    eye = torch.eye(m, dtype=k.dtype, device=k.device)
    k = k * (1 - eye)
    l = l * (1 - eye)
    tr = (k * l.transpose(1, 2)).sum((1, 2))
    sk, sl = k.sum((1, 2)), l.sum((1, 2))
    kl1 = (k.sum(2) * l.sum(1)).sum(1)  # 1' K L 1 = (K 1) . (L' 1); L symmetric
    return (tr + sk * sl / ((m - 1) * (m - 2)) - 2.0 / (m - 2) * kl1) / (m * (m - 3))


def cka_loss_gather_ref(xs, pos_s, head_s, y, pos_t, head_t, *, ds: int, dt: int, eps: float = 1e-8,
                        estimator: str = "biased"):
    """Specification of the fused Triton kernel: gather each pair's head z at its per-example positions from
    ``[batch, pos, heads * d_head]`` tensors, then :func:`cka_loss_ref`.

    Args:
        xs: student z ``[B, T, H_s * ds]``; pos_s: ``[P, B]`` token positions; head_s: ``[P]``.
        y: teacher z ``[B, T', H_t * dt]`` with pos_t ``[P, B]`` and head_t ``[P]``, or already gathered
            ``[P, B, dt]`` with ``pos_t=None``.
    """
    import torch

    p, m = pos_s.shape
    rows = torch.arange(m, device=xs.device)
    x = torch.stack([xs[rows, pos_s[i].long()].view(m, -1, ds)[:, int(head_s[i])] for i in range(p)])
    if pos_t is None:
        yt = y
    else:
        yt = torch.stack([y[rows, pos_t[i].long()].view(m, -1, dt)[:, int(head_t[i])] for i in range(p)])
    return cka_loss_ref(x, yt, eps=eps, estimator=estimator)
