"""The report of an experiment, rebuilt from its run records (``OUT/runs.jsonl``): per setting the accuracy mean
with its 95% t-interval over seeds, exact McNemar tests pooled over seeds with Holm's correction
(statsmodels), the diagnostics and recovery tables (``summary.md``, ``report.json``) and the figures."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

from fastcd.config import ALL_METHODS, METHOD_SPECS
from fastcd.experiment_config import ExperimentConfig, chosen_lrs, lr_choices
from fastcd.io import correct_from_bits, experiment_status, write_json_atomic, write_text_atomic
from fastcd.plan import plan_vs_measured
from fastcd.plots import accuracy_plot, curves_plot, lr_selection_plot, sweep_plot, variant
from fastcd.stats import (
    holm,
    holm_in_place,
    mcnemar,
    mean_ci,
    paired_seed_test,
    seed_level_lines,
    val_ce_lines,
    val_ce_tests,
)


def read_runs(path: str) -> dict[str, dict]:
    """The finished runs in ``runs.jsonl`` by key; a line cut short by a kill is skipped (that run reruns)."""
    recs = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                line = line.strip()
                if not line:
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    experiment_status(f"{path} line {i + 1} is incomplete (a killed write); that run reruns")
                    continue
                recs[r["key"]] = r
    return recs


def append_record(path: str, rec: dict) -> None:
    """One JSON line, flushed to disk; a line left unfinished by a kill is closed first so it cannot swallow it."""
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(rec) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def setting_label(s: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in s.items() if v is not None)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _group_key(setting: dict) -> str:
    s = {k: v for k, v in setting.items() if k not in ("matching", "lam", "cka_estimator")}
    return setting_label(s)


def _groups_of(rec: dict, cfg: ExperimentConfig) -> list[dict]:
    """The settings (tables, panels, comparisons) a run belongs to. A full-model run at ``full_lr`` is shared by
    every circuit lr of its setting (one run per seed serves them all), so it joins each of those groups."""
    s = rec["setting"]
    if cfg.select_lr:  # each method at its own chosen lr: one group over the lr grid
        return [{**s, "lr": SELECTED}]
    if cfg.full_lr is not None and rec["method"] in METHOD_SPECS and METHOD_SPECS[rec["method"]].full_model:
        return [{**s, "lr": lr} for lr in cfg.values("lr")]
    return [s]


SELECTED = "chosen on validation"
# McNemar comparisons besides CE + Align CKA against every other method (same setting and matching)
CONTROL_PAIRS = (("ce+rand-cka", "rand-ce"), ("circuit-ce", "rand-ce"))


def write_report(out: str, cfg: ExperimentConfig | None = None) -> dict:
    """Rebuild ``report.json``, ``summary.md`` and the figures from ``runs.jsonl`` and the shared records."""
    exp_path = os.path.join(out, "experiment.json")
    with open(exp_path) as f:
        manifest = json.load(f)
    cfg = cfg or ExperimentConfig.from_dict(manifest["config"])
    recs = list(read_runs(os.path.join(out, "runs.jsonl")).values())
    by_key = {r["key"]: r for r in recs}
    wanted = {s["key"] for s in cfg.run_specs(chosen_lrs(cfg, by_key))}
    recs = [r for r in recs if r["key"] in wanted]
    selection = lr_choices(cfg, by_key) if cfg.select_lr else None
    tuning = [r for r in recs if r["seed"] in cfg.tune_seeds]  # they chose the lr; never in a table or a test
    recs = [r for r in recs if r["seed"] not in cfg.tune_seeds]
    not_applicable = [{k: r[k] for k in ("method", "seed", "setting", "not_applicable")}
                      for r in recs if "not_applicable" in r]
    recs = [r for r in recs if "not_applicable" not in r]

    def shared(name):
        p = os.path.join(out, "shared", name)
        return json.load(open(p)) if os.path.isfile(p) else None

    base, teacher = shared("base_eval.json"), shared("teacher_eval.json")
    # rows: one per (setting without lam/matching/estimator, method, matching, lam, estimator)
    rows: dict[tuple, list] = {}
    group_lr: dict[str, float] = {}
    for r in recs:
        s = r["setting"]
        for g in _groups_of(r, cfg):
            group_lr[_group_key(g)] = g["lr"]
            rows.setdefault((_group_key(g), r["method"], s.get("matching"), s.get("lam"), s.get("cka_estimator")),
                            []).append(r)
    table = []
    for (group, method, rule, lam, est), rs in sorted(rows.items(), key=lambda kv: (
            kv[0][0], _order(kv[0][1]), str(kv[0][2]), str(kv[0][3]), str(kv[0][4]))):
        rs = sorted(rs, key=lambda r: r["seed"])
        acc = [r["accuracy"] for r in rs]
        label = METHOD_SPECS[method].label if method in METHOD_SPECS else method
        own_lr = rs[0]["setting"]["lr"] if rs[0]["setting"]["lr"] != group_lr[group] else None  # full_lr, selected
        if own_lr is not None:
            label += f" (lr {own_lr:g})"
        if est == "unbiased":
            label += " (unbiased CKA)"
        row = {"setting": group, "method": method, "matching": rule, "label": label, "own_lr": own_lr,
               "lam": lam, "cka_estimator": est, "seeds": [r["seed"] for r in rs], "accuracy": mean_ci(acc),
               "per_seed": acc,
               "trainable_fraction": rs[0]["trainable_fraction"],
               "trained_heads_fraction": rs[0].get("trained_heads_fraction"),
               "lam_effective": [r.get("lam_effective") for r in rs]}
        if "circuit_accuracy" in rs[0]:
            row["circuit_accuracy"] = mean_ci([r["circuit_accuracy"] for r in rs])
            row["per_seed_circuit"] = [r["circuit_accuracy"] for r in rs]
            if all(r["accuracy"] > 0 for r in rs):  # the matched student circuit's faithfulness, run by run
                row["circuit_faithfulness"] = mean_ci([r["circuit_accuracy"] / r["accuracy"] for r in rs])
        if rs[0].get("grad"):
            row["grad_ratio"] = mean_ci([r["grad"]["ratio"] for r in rs])
            row["grad_cosine"] = mean_ci([r["grad"]["cosine"] for r in rs])
        final_cka = [r["log"][-1].get("mean_cka") for r in rs if r["log"] and "mean_cka" in r["log"][-1]]
        if final_cka:
            row["final_mean_cka"] = mean_ci(final_cka)
        table.append(row)
    # McNemar, pooled over seeds (paired by seed on the one test set), Holm over the family
    tests, tested, test_runs = [], set(), {}

    def add(ka, kb, rs_a, rs_b):  # one test per pair of rows, whichever side it comes from
        if frozenset((ka, kb)) in tested:
            return
        tested.add(frozenset((ka, kb)))
        t = _pooled_test(rs_a, rs_b)
        if t is not None:
            test_runs[len(tests)] = (rs_a, rs_b)
            lrs = [rs_a[0]["setting"].get("lr"), rs_b[0]["setting"].get("lr")]  # each its own choice, or full_lr
            tests.append({"setting": ka[0], "a": _name(*ka[1:]), "b": _name(*kb[1:]), **t,
                          **({"lrs": lrs} if lrs[0] != lrs[1] else {}),
                          "seed_level": paired_seed_test({r["seed"]: r["accuracy"] for r in rs_a},
                                                         {r["seed"]: r["accuracy"] for r in rs_b})})

    for ka, rs in rows.items():
        group, method, rule = ka[:3]
        if method != "ce+cka":
            continue
        ref = {r["seed"]: r for r in rs}
        for kb, rs2 in rows.items():
            if kb[0] != group or kb == ka:
                continue
            if not METHOD_SPECS[kb[1]].full_model and kb[2] != rule:
                continue
            add(ka, kb, rs, rs2)
        if base is not None:
            common = sorted(ref)
            a = sum((correct_from_bits(ref[s]["correct"]) for s in common), [])
            b = correct_from_bits(base["correct"]) * len(common)
            tests.append({"setting": group, "a": _name(*ka[1:]), "b": "untrained student",
                          "seeds": common, **mcnemar(a, b),
                          "seed_level": paired_seed_test({s: ref[s]["accuracy"] for s in common},
                                                         {s: base["accuracy"] for s in common})})
    # the random-head controls against each other: what the CKA term does on the same random heads, and
    # whether the matched heads train better than random ones under CE alone
    for a_m, b_m in CONTROL_PAIRS:
        for ka, rs in rows.items():
            if ka[1] != a_m:
                continue
            for kb, rs2 in rows.items():
                if kb[0] == ka[0] and kb[1] == b_m and kb[2] == ka[2]:
                    add(ka, kb, rs, rs2)
    if tests:
        for t, p in zip(tests, holm(t["p_value"] for t in tests)):
            t["p_holm"] = p
        holm_in_place([t["seed_level"] for t in tests])  # the seed-level family: the comparisons whose p is defined
        val_ce_tests(tests, test_runs)
    import torch

    report = {"config": asdict(cfg), "runs_done": len(recs) + len(tuning) + len(not_applicable),
              "runs_total": cfg.n_planned_runs(), "lr_selection": selection,
              "not_applicable": not_applicable, "table": table,
              "mcnemar": tests, "base": None if base is None else {k: v for k, v in base.items() if k != "correct"},
              "teacher_accuracy": None if teacher is None else teacher["accuracy"],
              "n_test": cfg.n_test, "circuit": shared("circuit.json"), "recovery": shared("recovery.json"),
              "diagnostics": shared("diagnostics.json"), "cache": shared("cache.json"),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "seeds_are_replications": manifest["shared"].get("pool") == "per-seed"}
    report["plan"] = plan_vs_measured(out, recs + tuning)
    report["teacher_circuit"] = shared("circuit_eval.json")
    write_json_atomic(report, os.path.join(out, "report.json"))
    write_text_atomic(format_report(report) + "\n", os.path.join(out, "summary.md"))
    if recs:
        plot_report(report, recs, out)
    if tuning:  # the lr selection and the tuning runs' curves (line style: lr), before any seed has run

        lr_selection_plot(selection, os.path.join(out, "lr_selection.png"))
        curves_plot({(r["method"], f"lr {r['setting']['lr']:g}"): [r["log"]] for r in tuning},
                    os.path.join(out, "tuning_curves.png"),
                    title="tuning runs (never tested): colour = method, line style = lr; per-batch values faint")
    return report


def _pooled_test(rs_a: list[dict], rs_b: list[dict]) -> dict | None:
    """McNemar of two methods' runs pooled over their common seeds (paired prompt by prompt); None if none."""
    ref, other = {r["seed"]: r for r in rs_a}, {r["seed"]: r for r in rs_b}
    common = sorted(set(ref) & set(other))
    if not common:
        return None
    a = sum((correct_from_bits(ref[s]["correct"]) for s in common), [])
    b = sum((correct_from_bits(other[s]["correct"]) for s in common), [])
    return {"seeds": common, **mcnemar(a, b)}


def _name(method: str, rule, lam, est=None) -> str:
    extra = [x for x in (rule, None if lam is None else f"lam {lam}", "unbiased CKA" if est == "unbiased" else None)
             if x]
    return method + (f" ({', '.join(extra)})" if extra else "")


def _order(method: str) -> int:
    return ALL_METHODS.index(method) if method in ALL_METHODS else 99


def _fmt_ci(c: dict | None, digits: int = 3) -> str:
    if c is None:
        return "-"
    if c.get("lo") is None:
        return f"{c['mean']:.{digits}f}"
    return f"{c['mean']:.{digits}f} [{c['lo']:.{digits}f}, {c['hi']:.{digits}f}]"


def _boxes(c: dict) -> str:
    """The test set's box count (entity tracking), and the training prompts' when they differ."""
    test = c.get("test_boxes") or c["n_boxes"]
    return "" if c["task"] != "entity-tracking" else f", {test} boxes" + (
        "" if test == c["n_boxes"] else f"; training and validation prompts hold {c['n_boxes']}: out of distribution")


def format_report(report: dict) -> str:
    c = report["config"]
    lines = [f"# fastcd experiment: {c['teacher']} -> {c['student'] or c['teacher'] + ' (damaged copy)'}, "
             f"{c['task']}", "",
             f"{report['runs_done']} / {report['runs_total']} runs done. Test set: {report['n_test']} fixed prompts "
             f"(seed-independent{_boxes(c)}), the same for every run; accuracy is the mean over seeds with its 95% "
             "t-interval.", ""]
    if report.get("teacher_accuracy") is not None:
        lines.append(f"Teacher accuracy {report['teacher_accuracy']:.3f}; untrained student "
                     f"{report['base']['accuracy']:.3f}" + "".join(
                         f"; untrained circuit ({k[8:]}) {v:.3f} (faithfulness "
                         f"{v / report['base']['accuracy'] if report['base']['accuracy'] else float('nan'):.2f})"
                         for k, v in report["base"].items() if k.startswith("circuit_")) + ".")
        lines.append("")
    if report.get("lr_selection"):
        lines += lr_selection_lines(report["lr_selection"], c["tune_seeds"], c.get("n_val") or 0)
    groups = list(dict.fromkeys(r["setting"] for r in report["table"]))
    for g in groups:
        lines += [f"## {g}", "", "| Method | Matching | lambda | Accuracy (95% CI) | per seed | Circuit acc. | "
                  "Circuit faithfulness | Trainable params | Trained heads |", "|---|---|---|---|---|---|---|---|---|"]
        for r in report["table"]:
            if r["setting"] != g:
                continue
            lam = "-" if r["lam"] is None else (f"auto ({_mean_of(r['lam_effective']):.3g})" if r["lam"] == "auto"
                                                 else str(r["lam"]))
            th = "-" if r["trained_heads_fraction"] is None else f"{r['trained_heads_fraction']:.1%}"
            lines.append(f"| {r['label']} | {r['matching'] or '-'} | {lam} | {_fmt_ci(r['accuracy'])} | "
                         f"{' '.join(f'{x:.3f}' for x in r['per_seed'])} | {_fmt_ci(r.get('circuit_accuracy'))} | "
                         f"{_fmt_ci(r.get('circuit_faithfulness'), 2)} | {r['trainable_fraction']:.2%} | {th} |")
        lines.append("")
    if report["mcnemar"]:
        lines += seed_level_lines(report["mcnemar"], report.get("seeds_are_replications", True))
        lines += val_ce_lines(report["mcnemar"])
        lines += ["## McNemar (descriptive, secondary: exact, pooled over seeds prompt by prompt, Holm over all "
                  "comparisons; it leaves out the variance between replications, so it is no test of a claim)", "",
                  "| Setting | A | B | seeds | A right, B wrong | A wrong, B right | p | p (Holm) |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in report["mcnemar"]:
            lines.append(f"| {t['setting']} | {t['a']} | {t['b']} | {len(t['seeds'])} | {t['a_only']} | "
                         f"{t['b_only']} | {t['p_value']:.3g} | {t['p_holm']:.3g} |")
        lines.append("")
    tc = report.get("teacher_circuit")
    if tc:
        sd = f", SD {tc['random_circuit_sd']:.3f}" if tc.get("random_circuit_sd") is not None else ""
        proto = tc.get("protocol_text", tc["protocol"])
        lines += [f"Teacher circuit ({tc['circuit_size']} of {tc['n_heads_total']} heads; {proto}; "
                  f"{tc['n_prompts']} {tc['split']} prompts): full accuracy {tc['full_accuracy']:.3f}, circuit "
                  f"{tc['circuit_accuracy']:.3f}, faithfulness {tc['faithfulness']:.2f}; {tc['n_random']} random "
                  f"circuits of the same size and roles {tc['random_circuit_accuracy']:.3f}{sd}.", ""]
    pl = report.get("plan")
    if pl:
        lines += [f"Cost plan ({pl['made']}): {pl['planned_runs']} runs predicted at "
                  f"{pl['predicted_runs_seconds'] / 60:.1f} min of training and evaluation; measured "
                  f"{pl['measured_runs_seconds'] / 60:.1f} min for the {pl['planned_runs_done']} of them done.", ""]
    grads = [r for r in report["table"] if "grad_ratio" in r]
    if grads:
        lines += ["## Loss balance at the start (one batch per seed, lambda not applied) and the CKA reached", "",
                  "| Setting | Method | Matching | lambda | grad(align)/grad(CE) | cosine | mean CKA of the pairs at "
                  "the end |", "|---|---|---|---|---|---|---|"]
        for r in grads:
            g = " | ".join(_fmt_ci(r.get(k)) for k in ("grad_ratio", "grad_cosine", "final_mean_cka"))
            lines.append(f"| {r['setting']} | {r['method']} | {r['matching']} | {r.get('lam') or '-'} | {g} |")
        cka_only = [r for r in report["table"] if r["method"] == "cka" and "final_mean_cka" in r]
        for r in cka_only:
            lines.append(f"| {r['setting']} | cka (align only) | {r['matching']} | {r.get('lam') or '-'} | - | - | "
                         f"{_fmt_ci(r.get('final_mean_cka'))} |")
        lines.append("")
    if report.get("diagnostics"):
        lines += ["## Matched pairs at the start: CKA vs random student heads and a Gaussian null", "",
                  "| Matching | pairs | mean CKA | random heads (mean) | Gaussian null | pairs above random p95 |",
                  "|---|---|---|---|---|---|"]
        for rule, d in report["diagnostics"].items():
            ps = d["pairs"]
            above = sum(p["cka"] > p["random_heads_p95"] for p in ps)
            lines.append(f"| {rule} (m={d['m']}) | {len(ps)} | {_mean_of([p['cka'] for p in ps]):.3f} | "
                         f"{_mean_of([p['random_heads_mean'] for p in ps]):.3f} | "
                         f"{_mean_of([p['gaussian_null_mean'] for p in ps]):.3f} | {above} / {len(ps)} |")
        lines.append("")
    if report.get("recovery"):
        rec = report["recovery"]
        lines += [f"## Positive control: re-initialised heads {', '.join(rec['reinit'])}", "",
                  "| Rule | pairs that are the identity (all circuit units) | pairs whose teacher head was "
                  "re-initialised that chose that same head in the student |", "|---|---|---|"]
        for rule, d in rec.items():
            if rule == "reinit":
                continue
            lines.append(f"| {rule} | {d['identity_share']:.0%} | {d['reinit_identity']} / {d['reinit_paired']} |")
        lines.append("")
    for r in report.get("not_applicable", []):
        lines.append(f"Not applicable: {r['method']} seed {r['seed']} ({setting_label(r['setting'])}): "
                     f"{r['not_applicable']}")
    lines.append(f"torch {report['torch']}, {report['threads']} threads.")
    return "\n".join(lines)


def lr_selection_lines(selection: list[dict], tune_seeds: list, n_val: int = 0) -> list[str]:
    """The lr choice of every method: its final validation accuracy (and CE) at each lr of the grid, and the margin
    of the choice over the runner-up, in validation prompts, with the split's binomial noise beside it."""
    lines = [f"## Learning rates, chosen on the validation split by tuning seeds {tune_seeds} (never tested; "
             "highest final validation accuracy, ties: lower validation CE)", "",
             "| Method | Setting | final validation accuracy (CE) at each lr | chosen | margin over the runner-up |",
             "|---|---|---|---|---|"]
    se = []
    for row in selection:
        cells = "; ".join(f"{g['lr']:g}: " + ("pending" if g["val_accuracy"] is None else
                                              f"{g['val_accuracy']:.3f} ({g['val_ce']:.2f})") for g in row["grid"])
        chosen = "pending" if row["chosen"] is None else f"**{row['chosen']:g}**" + (
            f" ({row['edge']} of the grid)" if row.get("edge") else "")
        m = row.get("margin")
        margin = "-"
        if m is not None:
            margin = "tie: CE decided" if abs(m) < 1e-12 else f"{m:+.3f}" + (
                f" ({round(m * n_val, 1):g} of {n_val} prompts)" if n_val else "")
        if row["chosen"] is not None and n_val:
            p = next(g["val_accuracy"] for g in row["grid"] if g["lr"] == row["chosen"])
            se.append(_agresti_coull_se(p, n_val * len(tune_seeds)))
        lines.append(f"| {row['method']} | {setting_label(row['setting'])} | {cells} | {chosen} | {margin} |")
    if se:
        band = f"{min(se):.3f}" + (f"-{max(se):.3f}" if max(se) > min(se) else "")
        lines += ["", f"A validation accuracy on {n_val} prompts x {len(tune_seeds)} tuning seed(s) has a binomial "
                  f"standard error of {band} at the chosen lrs' accuracies (Agresti-Coull: two right and two wrong "
                  "answers added, so an accuracy of 1.0 does not read as noise-free): a margin within about twice "
                  "that is noise, and the choice between those lrs close to arbitrary (the same grid and budget "
                  "held for every method)."]
    edges = ", ".join(f"{row['method']} ({row['edge']})" for row in selection if row.get("edge"))
    return lines + (["", f"Chosen at an end of the grid: {edges}: the best lr may lie beyond it; the comparisons below "
                     "are at this grid's best lr, not the best there is (widen it to tell).", ""] if edges else [""])


def _agresti_coull_se(p: float, n: int) -> float:
    """The standard error of a proportion p of n after adding two successes and two failures (Agresti & Coull
    1998): close to the Wald SE in the middle, and above 0 at p = 0 or 1, where the Wald SE claims no noise."""
    q = (p * n + 2) / (n + 4)
    return (q * (1 - q) / (n + 4)) ** 0.5


def _mean_of(v) -> float:
    v = [x for x in v if x is not None]
    return sum(v) / len(v) if v else float("nan")


def plot_report(report: dict, recs: list[dict], out: str) -> list[str]:
    """``accuracy.png`` (per method, each seed a dot, mean with its CI), ``sample_efficiency.png`` and
    ``lambda.png`` (when those vary), ``curves.png`` (small multiples: one panel per loss part and validation
    accuracy, colour by method, every run)."""

    paths = [os.path.join(out, "accuracy.png")]
    accuracy_plot(report, paths[0])
    for var, fname, xlabel in (("n_train", "sample_efficiency.png", "training prompts (n_train)"),
                               ("lam", "lambda.png", "lambda")):
        if sweep_plot(report, recs, var, xlabel, os.path.join(out, fname)) is not None:
            paths.append(os.path.join(out, fname))
    rules = {variant(r["setting"]) for r in recs if r["setting"].get("matching")}
    logs: dict = {}
    for r in recs:  # with several matchings (or estimators), the line style tells them apart
        key = (r["method"], variant(r["setting"]) or "no matching") if len(rules) > 1 else r["method"]
        logs.setdefault(key, []).append(r["log"])
    if curves_plot(logs, os.path.join(out, "curves.png"),
                   title="training curves, every run and seed (colour = method, line style = matching/estimator; "
                         "each panel its own scale)" if len(rules) > 1 else
                   "training curves, every run and seed (colour = method; each panel its own scale)"):
        paths.append(os.path.join(out, "curves.png"))
    return paths

