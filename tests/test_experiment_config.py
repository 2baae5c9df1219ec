"""fastcd.experiment_config: every bad field is one line naming it; YAML numbers; the run plan (which runs share a
setting, the estimator sweep)."""

from __future__ import annotations

import pytest
from experiment_helpers import STUDENT, TEACHER, _cfg

from fastcd.experiment_config import ExperimentConfig


@pytest.mark.parametrize("field,value,message", [
    ("methods", ["ce+kca"], "methods must be"),
    ("seeds", [0, 0], "seeds must not repeat"),
    ("seeds", [], "seeds must be"),
    ("test_boxes", 1, "test_boxes must be an integer >= 2, got 1"),
    ("test_boxes", "7", "test_boxes must be an integer >= 2, got '7'"),
    ("matching", "nearest", "matching must be among"),
    ("matching", "identity", "needs positive_control"),
    ("lr", "fast", "lr must be a number"),
    ("lr", -1.0, "lr must be > 0"),
    ("steps", [2, 2], "steps must not repeat"),
    ("steps", 0, "steps must be an integer >= 1"),
    ("n_val", 10, "n_val and eval_every go together"),
    ("positive_control", {"reinit": 0}, "positive_control.reinit"),
    ("task", "sorting", "task must be"),
    ("circuit", "/nonexistent/circuit.json", "circuit: no such file"),
    ("positions", ["last", "nowhere"], "positions must be a non-empty list of the task's roles"),
    ("cka_estimator", "debiased", "cka_estimator must be among"),
    ("cka_estimator", ["unbiased", "unbiased"], "cka_estimator must not repeat"),
    ("batch_size", [8, 48], "batch_size must be <= n_train in every setting"),
    ("precision", "half", "precision must be one of"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ExperimentConfig.from_dict(_cfg(**{field: value}))


def test_test_boxes_is_for_entity_tracking_only():
    with pytest.raises(ValueError, match="test_boxes is for entity tracking .*; tom has no boxes"):
        ExperimentConfig.from_dict(_cfg(task="tom", discovery="attribution", test_boxes=7))
    assert ExperimentConfig.from_dict(_cfg(test_boxes=7)).test_boxes == 7


def test_config_unknown_field_and_missing_teacher():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['stpes'\]"):
        ExperimentConfig.from_dict(_cfg(stpes=3))
    d = _cfg()
    del d["teacher"]
    with pytest.raises(ValueError, match="'teacher' is required"):
        ExperimentConfig.from_dict(d)


def test_yaml_file_with_yaml11_numbers(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(f"teacher: {TEACHER}\nstudent: {STUDENT}\nlr: 3e-3\nlam: [1e-1, 1]\n")
    cfg = ExperimentConfig.from_file(str(p))
    assert cfg.lr == 3e-3 and cfg.lam == [0.1, 1.0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        ExperimentConfig.from_file(str(bad))


def test_run_plan_shares_rule_free_methods_and_drops_unused_lambda():
    cfg = ExperimentConfig.from_dict(_cfg(methods=["full-ce", "circuit-ce", "ce+cka"], matching=["ablation", "cka"],
                                          lam=[0.5, 2.0], seeds=[0]))
    specs = cfg.run_specs()
    by = {}
    for s in specs:
        by.setdefault(s["method"], []).append(s["setting"])
    assert len(by["full-ce"]) == 1 and by["full-ce"][0]["matching"] is None and by["full-ce"][0]["lam"] is None
    assert len(by["circuit-ce"]) == 2 and all(s["lam"] is None for s in by["circuit-ce"])
    assert len(by["ce+cka"]) == 4
    assert len({s["key"] for s in specs}) == len(specs) == 7


def test_run_plan_sweeps_the_estimator_and_keeps_the_biased_keys():
    from fastcd.experiment_config import _run_key

    cfg = ExperimentConfig.from_dict(_cfg(methods=["circuit-ce", "cka", "ce+cka"], cka_estimator=["biased", "unbiased"],
                                          seeds=[0]))
    specs = cfg.run_specs()
    est = sorted((s["method"], str(s["setting"]["cka_estimator"])) for s in specs)
    assert est == [("ce+cka", "biased"), ("ce+cka", "unbiased"), ("circuit-ce", "None"), ("cka", "biased"),
                   ("cka", "unbiased")]  # a run without a CKA term serves both estimators
    for s in specs:  # a run recorded before the estimator was a grid field keeps its key when biased
        without = {k: v for k, v in s["setting"].items() if k != "cka_estimator"}
        assert (s["key"] == _run_key(s["method"], 0, without)) == (s["setting"]["cka_estimator"] != "unbiased")
    by_est = {s["setting"]["cka_estimator"]: s for s in specs if s["method"] == "ce+cka"}
    from fastcd.experiment_config import distill_config_for

    assert distill_config_for(cfg, by_est["unbiased"]).cka_estimator == "unbiased"
    assert distill_config_for(cfg, by_est["biased"]).cka_estimator == "biased"


def test_every_shipped_config_validates_and_run_all_runs_it():
    """configs/*.yaml are what docs/RESULTS.md cites: each one parses and validates (no model is read), and
    configs/run_all.sh, the reproduction script, names every one of them."""
    import os

    root = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
    names = sorted(f[:-5] for f in os.listdir(root) if f.endswith(".yaml"))
    assert "real_paper_regime_all" in names
    with open(os.path.join(root, "run_all.sh"), encoding="utf-8") as f:
        script = f.read()
    for name in names:
        cfg = ExperimentConfig.from_file(os.path.join(root, f"{name}.yaml"))
        assert cfg.methods and cfg.teacher, name
        assert name in script, f"configs/run_all.sh does not run {name}"


def test_every_registered_task_is_an_experiment_task_with_its_own_roles():
    """tom-causaltom (tom behind the instruction and 3 shots) is a task name like entity-tracking and tom; its
    positions are checked against its roles, and a bad name lists the registered ones."""
    cfg = ExperimentConfig.from_dict(_cfg(task="tom-causaltom", positions=["last", "question_character"],
                                          discovery="attribution"))
    assert cfg.task_name() == "tom-causaltom"
    with pytest.raises(ValueError, match=r"positions must be .*'question_container'.*got \['object'\]"):
        ExperimentConfig.from_dict(_cfg(task="tom-causaltom", positions=["object"], discovery="attribution"))
    with pytest.raises(ValueError, match=r"task must be one of \['entity-tracking', 'tom', 'tom-causaltom'\]"):
        ExperimentConfig.from_dict(_cfg(task="tom-3shot"))
