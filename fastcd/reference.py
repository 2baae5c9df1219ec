"""Plain Python / PyTorch twins of every fast path. Each one is the specification its fast path is tested
against, and the execution path wherever the fast path is unavailable."""

from __future__ import annotations

import math

import numpy as np


def nearest_indices_ref(query, keys) -> np.ndarray:
    """Twin of ``fastcd._C.nearest_indices``: argmin_j |query_i - keys_j|, ties to the lowest j."""
    q = np.asarray(query, dtype=np.float64)
    k = np.asarray(keys, dtype=np.float64)
    if q.ndim != 1:
        raise ValueError(f"query must be a 1-D array, got {q.ndim} dimensions")
    if k.ndim != 1:
        raise ValueError(f"keys must be a 1-D array, got {k.ndim} dimensions")
    if k.shape[0] == 0:
        raise ValueError("keys must not be empty")
    for name, a in (("query", q), ("keys", k)):
        bad = np.flatnonzero(~np.isfinite(a))
        if bad.size:
            raise ValueError(f"{name} must be finite, found {a[bad[0]]} at index {int(bad[0])}")
    out = np.empty(q.shape[0], dtype=np.int64)
    for i, qi in enumerate(q.tolist()):
        best, best_d = 0, math.fabs(qi - k[0])
        for j in range(1, k.shape[0]):
            d = math.fabs(qi - k[j])
            if d < best_d:
                best, best_d = j, d
        out[i] = best
    return out
