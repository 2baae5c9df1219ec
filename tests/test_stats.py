"""Seed-level statistics: a paired comparison over replications, checked against scipy and statsmodels."""

import math

import numpy as np
import pytest
from scipy.stats import ttest_rel, wilcoxon
from statsmodels.stats.power import TTestPower

from fastcd.stats import mcnemar, mean_ci, paired_seed_test, seed_level_lines, val_ce_lines


def test_paired_seed_test_equals_scipy_and_its_mde_has_80_percent_power():
    rng = np.random.default_rng(0)
    a = {s: float(x) for s, x in enumerate(0.6 + 0.03 * rng.standard_normal(8))}
    b = {s: float(x) for s, x in enumerate(0.55 + 0.03 * rng.standard_normal(8))}
    b[99] = 0.1  # a seed only one side has: not paired, left out
    r = paired_seed_test(a, b)
    xa, xb = [a[s] for s in range(8)], [b[s] for s in range(8)]
    d = np.subtract(xa, xb)
    assert r["seeds"] == list(range(8)) and r["n_seeds"] == 8
    assert r["mean_diff"] == pytest.approx(d.mean()) and r["sd_diff"] == pytest.approx(d.std(ddof=1))
    assert r["p_t"] == pytest.approx(ttest_rel(xa, xb).pvalue)
    assert r["p_wilcoxon"] == pytest.approx(wilcoxon(d, method="exact").pvalue)
    lo, hi = r["ci95"]
    assert lo < r["mean_diff"] < hi
    assert (lo > 0) == (r["p_t"] < 0.05)  # the interval and the test agree
    power = TTestPower().power(effect_size=r["mde"] / r["sd_diff"], nobs=8, alpha=0.05, alternative="two-sided")
    assert power == pytest.approx(0.8, abs=1e-6)
    # with more seeds the same spread gives a smaller detectable effect
    more = paired_seed_test({s: a[s % 8] + 1e-3 * s for s in range(16)}, {s: b[s % 8] for s in range(16)})
    assert more["mde"] < r["mde"]


def test_undefined_cases_say_none_instead_of_a_number():
    one = paired_seed_test({0: 0.5}, {0: 0.4})
    assert one["n_seeds"] == 1 and one["p_t"] is None and one["mde"] is None and one["ci95"] is None
    flat = paired_seed_test({0: 0.5, 1: 0.5, 2: 0.5}, {0: 0.5, 1: 0.5, 2: 0.5})
    assert flat["p_t"] is None and flat["p_wilcoxon"] == 1.0 and flat["mean_diff"] == 0.0
    shifted = paired_seed_test({0: 0.6, 1: 0.6}, {0: 0.5, 1: 0.5})  # the same gain in every seed: no spread
    assert shifted["p_t"] is None and math.isclose(shifted["mean_diff"], 0.1)
    rounded = paired_seed_test({0: 0.7, 1: 0.8}, {0: 0.4, 1: 0.5})  # 0.29999999999999993 and 0.30000000000000004
    assert rounded["sd_diff"] == 0.0 and rounded["p_t"] is None and rounded["ci95"] is None and rounded["mde"] is None
    with pytest.raises(ValueError, match="alpha and power"):
        paired_seed_test({0: 1.0}, {0: 1.0}, power=1.5)


def test_mcnemar():
    a = [True] * 30 + [False] * 10
    b = [True] * 20 + [False] * 20
    r = mcnemar(a, b)
    assert (r["a_only"], r["b_only"], r["n"]) == (10, 0, len(a)) and r["p_value"] < 0.01
    assert mcnemar(a, a)["p_value"] == 1.0
    with pytest.raises(ValueError, match="one length"):
        mcnemar([True], [True, False])


def test_mean_ci_is_the_t_interval():
    c = mean_ci([0.5, 0.7])
    assert c["mean"] == pytest.approx(0.6)
    assert c["hi"] - c["mean"] == pytest.approx(12.7062 * 0.1 * math.sqrt(2) / math.sqrt(2), rel=1e-4)
    assert mean_ci([0.4])["lo"] is None


def test_comparisons_at_two_lrs_are_marked_in_both_seed_level_tables():
    """A comparison whose methods ran at different lrs is marked 'at lr' in the accuracy table and in the
    validation-CE table (a higher lr lowers the CE sooner whatever the method); one at a single lr is not."""
    def sl(a, b):
        return paired_seed_test(dict(enumerate(a)), dict(enumerate(b)))

    acc = sl([0.8, 0.7, 0.9, 0.8, 0.75, 0.85], [0.7, 0.72, 0.8, 0.81, 0.7, 0.8])
    ce = {"final": sl([0.3, 0.2, 0.25, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.35, 0.3, 0.2]),
          "mean": sl([0.5, 0.4, 0.45, 0.5, 0.4, 0.3], [0.6, 0.5, 0.4, 0.55, 0.5, 0.4])}
    one = {"setting": "s", "a": "ce+cka", "b": "circuit-ce", "seed_level": acc, "val_ce": ce}
    two = {**one, "b": "ce+perm-cka", "lrs": [5e-4, 1e-4]}
    for lines in (seed_level_lines([one, two], replications=True), val_ce_lines([one, two])):
        text = "\n".join(lines)
        assert "| s | ce+cka | circuit-ce | 6 |" in text
        assert "| s | ce+cka at lr 0.0005 | ce+perm-cka at lr 0.0001 | 6 |" in text
        assert 'Marked "at lr": A and B ran at different learning rates' in text
    for lines in (seed_level_lines([one], replications=True), val_ce_lines([one])):
        assert "at lr" not in "\n".join(lines)
