"""Statistics for comparing methods on the same test prompts."""

from __future__ import annotations

import numpy as np

from fastcd.errors import UsageError


def mcnemar(correct_a, correct_b) -> dict:
    """Exact McNemar test between two methods' per-example correctness on the same prompts.

    Returns ``{"b": a right & b wrong, "c": a wrong & b right, "p_value": two-sided exact binomial p}``.
    """
    from scipy.stats import binomtest

    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise UsageError(f"correct_a and correct_b must be 1-D of one length, got {a.shape} and {b.shape}")
    n01 = int((a & ~b).sum())
    n10 = int((~a & b).sum())
    p = 1.0 if n01 + n10 == 0 else float(binomtest(n01, n01 + n10, 0.5).pvalue)
    return {"b": n01, "c": n10, "p_value": p}
