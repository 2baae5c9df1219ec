"""``select_lr``: each method's learning rate chosen on the validation split by tuning seeds that are never tested."""

from __future__ import annotations

import json
import os

import pytest
from test_experiment import _cfg

from fastcd.experiment import run_experiment
from fastcd.experiment_config import ExperimentConfig, chosen_lrs, lr_choices, tuning_key
from fastcd.report import lr_selection_lines, read_runs


def _sel(**kw) -> dict:
    return _cfg(**{"select_lr": True, "tune_seeds": [7], "lr": [1e-9, 3e-2], "n_val": 16, "eval_every": 2, **kw})


@pytest.mark.parametrize("kw,message", [
    ({"lr": 3e-3}, "select_lr needs lr to be a grid of at least 2 values"),
    ({"tune_seeds": [0]}, r"tune_seeds must not be among seeds .* both hold \[0\]"),
    ({"tune_seeds": []}, "tune_seeds must be a non-empty list"),
    ({"tune_seeds": [7, 7]}, "tune_seeds must be a non-empty list of distinct"),
    ({"n_val": 0, "eval_every": 0}, "select_lr chooses on the validation split"),
    ({"full_lr": [1e-5]}, "full_lr must hold as many values as lr"),
    ({"select_lr": "yes"}, "select_lr must be true or false"),
])
def test_selection_config_errors_name_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        ExperimentConfig.from_dict(_sel(**kw))


def test_tune_seeds_and_lr_lists_need_select_lr():
    with pytest.raises(ValueError, match="tune_seeds are for select_lr"):
        ExperimentConfig.from_dict(_cfg(tune_seeds=[7]))
    with pytest.raises(ValueError, match="full_lr may be a list only with select_lr"):
        ExperimentConfig.from_dict(_cfg(full_lr=[1e-5, 1e-4]))


def test_tuning_runs_first_then_the_seeds_at_the_chosen_lr_only():
    cfg = ExperimentConfig.from_dict(_sel(methods=["circuit-ce", "ce+cka", "full-ce"], full_lr=[1e-6, 1e-5]))
    tune = cfg.run_specs()
    assert {s["seed"] for s in tune} == {7} and len(tune) == 3 * 2  # every method at every lr of its grid
    assert sorted(s["setting"]["lr"] for s in tune if s["method"] == "full-ce") == [1e-6, 1e-5]
    assert sorted(s["setting"]["lr"] for s in tune if s["method"] == "ce+cka") == [1e-9, 3e-2]
    assert cfg.n_planned_runs() == 6 + 3 * 2  # the seeds' runs, counted before any lr is chosen
    chosen = {tuning_key(s["method"], s["setting"]): s["setting"]["lr"] for s in tune
              if s["setting"]["lr"] in (3e-2, 1e-6)}
    runs = cfg.run_specs(chosen)
    main = [s for s in runs if s["seed"] != 7]
    assert len(main) == 6 and {s["seed"] for s in main} == {0, 1}
    assert {(s["method"], s["setting"]["lr"]) for s in main} == {("circuit-ce", 3e-2), ("ce+cka", 3e-2),
                                                                  ("full-ce", 1e-6)}
    # a method whose choice is still pending has no seed runs yet
    del chosen[tuning_key("ce+cka", next(s for s in tune if s["method"] == "ce+cka")["setting"])]
    assert {s["method"] for s in cfg.run_specs(chosen) if s["seed"] != 7} == {"circuit-ce", "full-ce"}


def _record(spec, acc, ce):
    return {"key": spec["key"], "method": spec["method"], "seed": spec["seed"], "setting": spec["setting"],
            "log": [{"step": 2, "val_accuracy": 0.0, "val_ce": 9.0}, {"step": 4, "val_accuracy": acc, "val_ce": ce}]}


def test_the_choice_is_the_best_final_validation_accuracy_then_the_lower_ce():
    cfg = ExperimentConfig.from_dict(_sel(methods=["circuit-ce", "ce+cka"], tune_seeds=[7, 8]))
    specs = cfg.run_specs()
    score = {("circuit-ce", 1e-9): (0.5, 1.0), ("circuit-ce", 3e-2): (0.6, 2.0),  # accuracy decides
             ("ce+cka", 1e-9): (0.5, 1.0), ("ce+cka", 3e-2): (0.5, 0.8)}  # a tie: the lower CE decides
    recs = {s["key"]: _record(s, *score[(s["method"], s["setting"]["lr"])]) for s in specs}
    rows = {r["method"]: r for r in lr_choices(cfg, recs)}
    assert rows["circuit-ce"]["chosen"] == 3e-2 and rows["ce+cka"]["chosen"] == 3e-2
    assert rows["circuit-ce"]["grid"][0] == {"lr": 1e-9, "val_accuracy": 0.5, "val_ce": 1.0, "seeds": [7, 8]}
    # the margin of each choice over the runner-up: its size in validation prompts, a tie named, the noise beside
    assert rows["circuit-ce"]["margin"] == pytest.approx(0.1) and rows["ce+cka"]["margin"] == 0
    text = "\n".join(lr_selection_lines(list(rows.values()), [7, 8], n_val=50))
    assert "| **0.03** (highest of the grid) | +0.100 (5 of 50 prompts) |" in text
    assert "| **0.03** (highest of the grid) | tie: CE decided |" in text
    # a choice at an end of the grid is flagged: the best lr may lie beyond it
    assert rows["circuit-ce"]["edge"] == "highest"
    assert "Chosen at an end of the grid: circuit-ce (highest), ce+cka (highest): the best lr may lie beyond" in text
    q = (0.6 * 100 + 2) / 104, (0.5 * 100 + 2) / 104  # 50 prompts x 2 tuning seeds, Agresti-Coull
    se = [(x * (1 - x) / 104) ** 0.5 for x in q]
    assert f"50 prompts x 2 tuning seed(s) has a binomial standard error of {min(se):.3f}-{max(se):.3f}" in text
    # a perfect validation accuracy is not noise-free: 64 of 64 right still has an SE of about 0.02
    perfect = {**rows["circuit-ce"], "grid": [{**g, "val_accuracy": 1.0} for g in rows["circuit-ce"]["grid"]]}
    text = "\n".join(lr_selection_lines([perfect], [7], n_val=64))
    assert f"standard error of {((66 / 68) * (2 / 68) / 68) ** 0.5:.3f} at" in text
    # the mean over tuning seeds: one bad seed can turn the choice
    bad = next(s for s in specs if s["method"] == "circuit-ce" and s["seed"] == 8 and s["setting"]["lr"] == 3e-2)
    recs[bad["key"]] = _record(bad, 0.3, 2.0)
    assert {r["method"]: r["chosen"] for r in lr_choices(cfg, recs)}["circuit-ce"] == 1e-9
    # an lr not finished on every tuning seed: the choice waits
    del recs[bad["key"]]
    pending = {r["method"]: r for r in lr_choices(cfg, recs)}["circuit-ce"]
    assert pending["chosen"] is None and pending["margin"] is None
    assert "| pending | - |" in "\n".join(lr_selection_lines([pending], [7, 8], n_val=50))
    assert pending["edge"] is None
    assert len(chosen_lrs(cfg, recs)) == 1
    # a run without validation rows cannot choose
    recs[bad["key"]] = {**_record(bad, 0.3, 2.0), "log": [{"step": 4, "ce": 1.0}]}
    with pytest.raises(ValueError, match="has no validation accuracy in its log"):
        lr_choices(cfg, recs)


@pytest.mark.slow
def test_a_choice_inside_the_grid_is_not_flagged_and_one_at_its_bottom_is():
    cfg = ExperimentConfig.from_dict(_sel(methods=["circuit-ce", "ce+cka"], lr=[1e-9, 1e-3, 3e-2]))
    acc = {("circuit-ce", 1e-9): 0.5, ("circuit-ce", 1e-3): 0.7, ("circuit-ce", 3e-2): 0.6,
           ("ce+cka", 1e-9): 0.8, ("ce+cka", 1e-3): 0.7, ("ce+cka", 3e-2): 0.6}
    recs = {s["key"]: _record(s, acc[(s["method"], s["setting"]["lr"])], 1.0) for s in cfg.run_specs()}
    rows = {r["method"]: r for r in lr_choices(cfg, recs)}
    assert (rows["circuit-ce"]["chosen"], rows["circuit-ce"]["edge"]) == (1e-3, None)
    assert (rows["ce+cka"]["chosen"], rows["ce+cka"]["edge"]) == (1e-9, "lowest")
    text = "\n".join(lr_selection_lines(list(rows.values()), [7], n_val=16))
    assert "| **0.001** | +0.100" in text and "| **1e-09** (lowest of the grid) |" in text
    assert "Chosen at an end of the grid: ce+cka (lowest):" in text


def test_a_selecting_experiment_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "run")
    report = run_experiment(_sel(), out, progress=False)
    recs = read_runs(os.path.join(out, "runs.jsonl"))
    tune = [r for r in recs.values() if r["seed"] == 7]
    main = [r for r in recs.values() if r["seed"] != 7]
    assert len(tune) == 4 and len(main) == 4 and report["runs_done"] == report["runs_total"] == 8
    for row in report["lr_selection"]:  # the choice is what the recorded validation rows say
        finals = {r["setting"]["lr"]: [x for x in r["log"] if "val_accuracy" in x][-1] for r in tune
                  if r["method"] == row["method"]}
        best = min(finals, key=lambda lr: (-finals[lr]["val_accuracy"], finals[lr]["val_ce"], lr))
        assert row["chosen"] == best
        assert {r["setting"]["lr"] for r in main if r["method"] == row["method"]} == {best}
    # the tables and the tests hold the seeds only, each method labelled with its lr, in one group
    assert {tuple(r["seeds"]) for r in report["table"]} == {(0, 1)}
    assert {r["setting"] for r in report["table"]} == {next(iter({r["setting"] for r in report["table"]}))}
    assert "lr=chosen on validation" in report["table"][0]["setting"]
    assert all("(lr " in r["label"] for r in report["table"])
    assert all(t["seeds"] == [0, 1] for t in report["mcnemar"])
    summary = open(os.path.join(out, "summary.md")).read()
    assert "## Learning rates, chosen on the validation split by tuning seeds [7]" in summary
    assert os.path.isfile(os.path.join(out, "lr_selection.png"))
    with open(os.path.join(out, "experiment.json")) as f:
        assert json.load(f)["shared"].get("select_lr") is None  # a run's identity holds no selection field
    # a rerun has nothing left to do; one more tuning seed reruns only its own runs, then the seeds at the choice
    capsys.readouterr()
    run_experiment(_sel(), out, progress=False)
    assert "8 runs, 8 done, 0 to run" in capsys.readouterr().out
