"""The experiment report (fastcd.report) rebuilt from run records alone: the run log's kill safety, the table's
means and intervals over seeds, McNemar pooled over seeds with Holm, and the files it writes."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import pytest
from experiment_helpers import _cfg
from scipy.stats import binomtest

from fastcd.experiment_config import ExperimentConfig
from fastcd.io import correct_as_bits
from fastcd.report import append_record, read_runs, setting_label, write_report


def test_append_and_read_survive_a_killed_write(tmp_path):
    path = str(tmp_path / "runs.jsonl")
    assert read_runs(path) == {}
    append_record(path, {"key": "a", "x": 1})
    with open(path, "a") as f:
        f.write('{"key": "b", "x"')  # a kill mid-line
    append_record(path, {"key": "c", "x": 3})  # closes the cut line first: c is not swallowed
    assert read_runs(path) == {"a": {"key": "a", "x": 1}, "c": {"key": "c", "x": 3}}  # b reruns
    append_record(path, {"key": "a", "x": 9})  # a rerun of a key: the last record wins
    assert read_runs(path)["a"]["x"] == 9


def test_setting_label_leaves_out_unset_fields():
    assert setting_label({"lr": 0.001, "lam": None, "steps": 200}) == "lr=0.001, steps=200"


# the per-prompt answers of two methods on one 10-prompt test set, seed by seed
CORRECT = {("circuit-ce", 0): [1, 1, 0, 0, 1, 0, 1, 0, 0, 0], ("circuit-ce", 1): [1, 0, 0, 1, 1, 0, 1, 1, 0, 0],
           ("ce+cka", 0): [1, 1, 1, 1, 1, 0, 1, 0, 1, 0], ("ce+cka", 1): [1, 1, 1, 0, 1, 1, 1, 1, 1, 0]}


@pytest.fixture
def records_only(tmp_path):
    """An experiment directory with its manifest and run records, and no model anywhere."""
    cfg = ExperimentConfig.from_dict(_cfg(n_test=10))
    with open(tmp_path / "experiment.json", "w") as f:
        json.dump({"config": asdict(cfg),
                   "shared": {"pool": "per-seed"}}, f)
    for s in cfg.run_specs():
        c = CORRECT[(s["method"], s["seed"])]
        append_record(str(tmp_path / "runs.jsonl"),
                      {**s, "accuracy": sum(c) / len(c), "correct": correct_as_bits(c), "trainable_fraction": 0.01,
                       "log": [{"step": 2, "loss": 1.0}], "seconds": 1.0})
    return str(tmp_path), cfg


def test_report_from_records_alone(records_only):
    out, cfg = records_only
    rep = write_report(out, cfg)
    assert rep["runs_done"] == rep["runs_total"] == 4 and rep["seeds_are_replications"]
    rows = {r["method"]: r for r in rep["table"]}
    assert rows["circuit-ce"]["per_seed"] == [0.4, 0.5] and rows["ce+cka"]["per_seed"] == [0.7, 0.8]
    assert rows["ce+cka"]["accuracy"]["mean"] == pytest.approx(0.75)
    (t,) = rep["mcnemar"]  # one comparison: CE + Align CKA against circuit CE
    # pooled over both seeds, prompt by prompt: ce+cka alone right on 3 + 4 prompts, circuit-ce alone on 0 + 1
    a_only, b_only = 7, 1
    assert (t["a"], t["b"], t["a_only"], t["b_only"], t["n"]) == ("ce+cka (cka, lam 1.0)", "circuit-ce (cka)",
                                                                 a_only, b_only, 20)
    assert t["p_value"] == pytest.approx(binomtest(b_only, a_only + b_only, 0.5).pvalue)
    assert t["p_holm"] == pytest.approx(t["p_value"])  # a family of one
    assert t["seeds"] == [0, 1]
    assert os.path.isfile(os.path.join(out, "summary.md")) and os.path.isfile(os.path.join(out, "report.json"))
    assert json.load(open(os.path.join(out, "report.json")))["table"] == json.loads(json.dumps(rep["table"]))


def test_validation_ce_is_compared_at_the_seed_level(tmp_path):
    """The paper's Fig. 5 question: per seed, A - B of the final validation CE and of its mean over the logged
    evaluations, paired over seeds (t-test, Holm over the comparisons), beside the accuracy comparison."""
    from scipy.stats import ttest_1samp

    cfg = ExperimentConfig.from_dict(_cfg(n_test=10, seeds=[0, 1, 2]))
    with open(tmp_path / "experiment.json", "w") as f:
        json.dump({"config": asdict(cfg), "shared": {"pool": "per-seed"}}, f)
    val = {("circuit-ce", s): [0.9, 0.8 + 0.01 * s, 0.7 + 0.02 * s] for s in range(3)}
    val |= {("ce+cka", s): [0.6, 0.5 - 0.01 * s, 0.4 + 0.03 * s] for s in range(3)}
    for s in cfg.run_specs():
        c = CORRECT.get((s["method"], s["seed"]), CORRECT[(s["method"], 0)])
        log = [{"step": 10 * (i + 1), "ce": 1.0, "val_ce": v} for i, v in enumerate(val[(s["method"], s["seed"])])]
        append_record(str(tmp_path / "runs.jsonl"),
                      {**s, "accuracy": sum(c) / len(c), "correct": correct_as_bits(c), "trainable_fraction": 0.01,
                       "log": log, "seconds": 1.0})
    (t,) = write_report(str(tmp_path), cfg)["mcnemar"]
    final = [val[("ce+cka", s)][-1] - val[("circuit-ce", s)][-1] for s in range(3)]
    mean = [sum(val[("ce+cka", s)]) / 3 - sum(val[("circuit-ce", s)]) / 3 for s in range(3)]
    v = t["val_ce"]
    assert v["final"]["mean_diff"] == pytest.approx(sum(final) / 3) and v["final"]["n_seeds"] == 3
    assert v["final"]["p_t"] == pytest.approx(ttest_1samp(final, 0).pvalue)
    assert v["mean"]["mean_diff"] == pytest.approx(sum(mean) / 3)
    assert v["mean"]["p_t"] == pytest.approx(ttest_1samp(mean, 0).pvalue) == v["mean"]["p_t_holm"]  # one comparison
    summary = open(tmp_path / "summary.md").read()
    assert "## Validation CE (the paper's Fig. 5" in summary
    assert f"| {v['final']['mean_diff']:+.3f} [" in summary and "3 (too few)" in summary
