"""Statistics for comparing methods on the same test prompts."""

from __future__ import annotations

import math

import numpy as np

from fastcd.errors import UsageError


def mcnemar(correct_a, correct_b) -> dict:
    """Exact McNemar test between two methods' per-example correctness on the same prompts.

    Returns ``{"a_only": a right & b wrong, "b_only": a wrong & b right, "p_value": two-sided exact binomial p,
    "n": prompts}`` (the one schema of every McNemar record: demo, experiment reports).
    """
    from scipy.stats import binomtest

    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise UsageError(f"correct_a and correct_b must be 1-D of one length, got {a.shape} and {b.shape}")
    n01 = int((a & ~b).sum())
    n10 = int((~a & b).sum())
    p = 1.0 if n01 + n10 == 0 else float(binomtest(n01, n01 + n10, 0.5).pvalue)
    return {"a_only": n01, "b_only": n10, "p_value": p, "n": int(a.size)}


def holm(p_values) -> list[float]:
    """Holm-adjusted p-values of a family (statsmodels' ``multipletests(method="holm")``); [] for no tests."""
    from statsmodels.stats.multitest import multipletests

    p_values = list(p_values)
    return [float(p) for p in multipletests(p_values, method="holm")[1]] if p_values else []


MIN_SEEDS_FOR_A_CLAIM = 6


def holm_in_place(results: list[dict], names=("p_t", "p_wilcoxon")) -> None:
    """Holm over ``results`` (dicts of :func:`paired_seed_test`) for each p-value name, written beside it as
    ``NAME_holm``; a result whose p is undefined (None) is not in that family."""
    for name in names:
        have = [r for r in results if r[name] is not None]
        for r, p in zip(have, holm(r[name] for r in have)):
            r[name + "_holm"] = p


def _fmt(x, fmt=".3g") -> str:
    return "-" if x is None else format(x, fmt)


def _diff_ci(sl: dict) -> str:
    """A - B with its 95% interval, as the seed-level tables write it."""
    ci = "" if sl["ci95"] is None else f" [{sl['ci95'][0]:+.3f}, {sl['ci95'][1]:+.3f}]"
    return f"{_fmt(sl['mean_diff'], '+.3f')}{ci}"


def paired_seed_test(acc_a: dict, acc_b: dict, *, alpha: float = 0.05, power: float = 0.8) -> dict:
    """Seed-level comparison of two methods: each seed is one replication of the whole procedure (its own training
    prompts, batch order and random heads), so the unit of analysis is the seed's accuracy difference a - b.

    ``acc_a`` / ``acc_b``: ``{seed: accuracy}``; only common seeds count. Returns the mean difference with its 95%
    t-interval, the paired t-test (primary) and the exact Wilcoxon signed-rank test (secondary, no normality
    assumption; with n seeds its smallest two-sided p is 2 / 2**n), and ``mde``: the mean difference a two-sided
    paired t-test at ``alpha`` detects with probability ``power`` for this many seeds and the observed SD of the
    differences (statsmodels' ``TTestPower``). p-values and the MDE are None where undefined (fewer than 2 seeds,
    or differences without spread)."""
    from scipy import stats as st
    from statsmodels.stats.power import TTestPower

    if not (0 < alpha < 1 and 0 < power < 1):
        raise UsageError(f"alpha and power must be in (0, 1), got {alpha} and {power}")
    seeds = sorted(set(acc_a) & set(acc_b))
    d = np.array([acc_a[s] - acc_b[s] for s in seeds], dtype=float)
    n = len(d)
    out = {"seeds": seeds, "n_seeds": n, "mean_diff": float(d.mean()) if n else None, "sd_diff": None,
           "ci95": None, "p_t": None, "p_wilcoxon": None, "mde": None}
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    if sd <= 1e-12 * max(1.0, float(np.abs(d).max())):
        sd = 0.0  # equal differences up to float rounding (0.7 - 0.4 vs 0.8 - 0.5): no spread, not a tiny one
    out["sd_diff"] = sd
    if sd > 0:
        half = float(st.t.ppf(0.975, n - 1)) * sd / np.sqrt(n)
        out["ci95"] = [float(out["mean_diff"] - half), float(out["mean_diff"] + half)]
        out["p_t"] = float(st.ttest_1samp(d, 0.0).pvalue)
        out["mde"] = float(TTestPower().solve_power(nobs=n, alpha=alpha, power=power, alternative="two-sided")) * sd
    if np.any(d != 0):
        out["p_wilcoxon"] = float(st.wilcoxon(d, zero_method="wilcox", method="exact" if n <= 25 else "auto").pvalue)
    elif sd == 0:
        out["p_wilcoxon"] = 1.0  # every seed equal: no evidence of a difference
    return out


def seed_level_lines(tests: list[dict], replications: bool = True) -> list[str]:
    """The primary comparisons: one accuracy difference per seed (a replication), paired t and Wilcoxon."""
    f = _fmt
    unit = ("each seed a replication with its own training prompts" if replications else
            "WARNING: made before seeds had their own prompts: every seed trained on one shared pool, so the seeds "
            "are not replications and the spread between them is the batch order's only")
    lines = [f"## Seed-level comparisons (primary: one accuracy difference A - B per seed, {unit}; paired t-test "
             "and exact Wilcoxon signed-rank, each Holm-corrected over "
             f"the comparisons; MDE = the difference a paired t-test detects with 80% power at alpha 0.05; fewer "
             f"than {MIN_SEEDS_FOR_A_CLAIM} seeds is marked: no claim rests on it)", "",
             "| Setting | A | B | seeds | mean A - B [95% CI] | SD over seeds | p (t) | Holm | p (Wilcoxon) | Holm "
             "| MDE |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in tests:
        sl = t["seed_level"]
        few = "" if sl["n_seeds"] >= MIN_SEEDS_FOR_A_CLAIM else " (too few)"
        a, b = _sides(t)
        lines.append(f"| {t['setting']} | {a} | {b} | {sl['n_seeds']}{few} | {_diff_ci(sl)}"
                     f" | {f(sl['sd_diff'], '.3f')} | {f(sl['p_t'])} | {f(sl.get('p_t_holm'))} | "
                     f"{f(sl['p_wilcoxon'])} | {f(sl.get('p_wilcoxon_holm'))} | {f(sl['mde'], '.3f')} |")
    if any(t.get("lrs") for t in tests):
        lines += ["", "Marked \"at lr\": A and B ran at different learning rates (each method's own choice, or "
                  "full_lr), so their difference is partly one of learning rates: rerun B at A's lr (select_lr: false) "
                  "before reading it as the methods'."]
    return lines + [""]


def _sides(t: dict) -> tuple[str, str]:
    """A and B of a comparison, each with its lr when the two ran at different ones."""
    return ((t["a"], t["b"]) if not t.get("lrs") else
            (f"{t['a']} at lr {t['lrs'][0]:g}", f"{t['b']} at lr {t['lrs'][1]:g}"))


def val_ce_tests(tests: list[dict], runs: dict) -> None:
    """The paper's Fig. 5 question at the seed level, beside each accuracy comparison whose two methods logged a
    validation CE (``runs``: the comparison's index in ``tests`` -> (A's runs, B's runs)): per seed, A - B of the
    final validation CE and of its mean over the logged evaluations (lower: reached sooner); each with
    :func:`paired_seed_test` and Holm over the comparisons that have it (``t["val_ce"]``)."""
    def summary(rs, part):
        out = {}
        for r in rs:
            v = [x["val_ce"] for x in r.get("log") or [] if x.get("val_ce") is not None]
            if v:
                out[r["seed"]] = v[-1] if part == "final" else sum(v) / len(v)
        return out

    for i, (rs_a, rs_b) in runs.items():
        a, b = summary(rs_a, "final"), summary(rs_b, "final")
        if a and b:
            tests[i]["val_ce"] = {"final": paired_seed_test(a, b),
                                  "mean": paired_seed_test(summary(rs_a, "mean"), summary(rs_b, "mean"))}
    for part in ("final", "mean"):
        holm_in_place([t["val_ce"][part] for t in tests if t.get("val_ce")])


def val_ce_lines(tests: list[dict]) -> list[str]:
    """The table of :func:`val_ce_tests` (empty without validation CE logs)."""
    have = [t for t in tests if t.get("val_ce")]
    if not have:
        return []

    def cell(sl):
        return f"{_diff_ci(sl)} | {_fmt(sl['p_t'])} | {_fmt(sl.get('p_t_holm'))} | {_fmt(sl['mde'], '.3f')}"

    lines = ["## Validation CE (the paper's Fig. 5: does A converge faster to a lower CE than B? per seed, A - B of "
             "the answer token's CE on the validation split: at the last evaluation, and its mean over every "
             "evaluation (lower: lower sooner); paired t-test, Holm over the comparisons; negative: A lower)", "",
             "| Setting | A | B | seeds | final: A - B [95% CI] | p (t) | Holm | MDE | mean over the curve: A - B "
             "[95% CI] | p (t) | Holm | MDE |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in have:
        v = t["val_ce"]
        few = "" if v["final"]["n_seeds"] >= MIN_SEEDS_FOR_A_CLAIM else " (too few)"
        a, b = _sides(t)
        lines.append(f"| {t['setting']} | {a} | {b} | {v['final']['n_seeds']}{few} | {cell(v['final'])} | "
                     f"{cell(v['mean'])} |")
    if any(t.get("lrs") for t in have):  # a higher lr lowers the CE sooner whatever the method
        lines += ["", "Marked \"at lr\": A and B ran at different learning rates, so their CE curves differ partly "
                  "by the lr's."]
    return lines + [""]


def mean_ci(values, level: float = 0.95) -> dict:
    """Mean and the t-interval over seeds (no interval from one seed)."""
    from scipy import stats

    v = [float(x) for x in values]
    n = len(v)
    mean = sum(v) / n
    if n < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": n}
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    h = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - h, "hi": mean + h, "sd": sd, "n": n}
