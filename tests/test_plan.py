"""The experiment's cost plan (fastcd.plan): the work left counted from the config and OUT, the prediction from a
calibration, its printed lines, and the plan set beside the measured run time."""

from __future__ import annotations

import json
import os

import pytest
from experiment_helpers import _cfg

from fastcd.experiment import run_experiment
from fastcd.experiment_config import ExperimentConfig
from fastcd.plan import CIRCUIT_EVAL_PASSES, count_work, format_plan, plan_vs_measured, predict
from fastcd.report import read_runs

ALL = {"cache": True, "teacher_eval": True, "circuit_eval": True, "circuit": True, "matchings": True}


def test_count_work_follows_the_config_and_skips_what_is_done():
    cfg = ExperimentConfig.from_dict(_cfg(methods=["circuit-ce", "full-ce"], seeds=[0, 1], steps=[2, 4],
                                          batch_size=[4, 8], n_test=16, n_val=8, eval_every=2))
    specs = cfg.run_specs()
    assert len(specs) == 2 * 2 * 2 * 2  # methods x seeds x steps x batch sizes
    w = count_work(cfg, set(), ALL, n_pool=64)
    assert w["runs"] == 16 and w["steps"] == 8 * (2 + 4)
    assert w["steps_by_batch_size"] == {4: 4 * 6, 8: 4 * 6}
    # every run's test accuracy, circuit runs' circuit accuracy too, validation every 2 steps, the base model twice
    assert w["student_forward_prompts"] == 16 * (16 + 8) + 8 * 8 * (1 + 2) + 2 * 16  # 8 runs per step count
    assert w["teacher_forward_prompts"] == 64 + 16 + CIRCUIT_EVAL_PASSES * 16
    assert (w["discovery_prompts"], w["matching_prompts"]) == (16, 16)
    done = {s["key"] for s in specs[:10]}
    left = count_work(cfg, done, {}, n_pool=64)  # resumed: shared records made, 10 runs done
    assert left["runs"] == 6 and left["teacher_forward_prompts"] == 0 and left["discovery_prompts"] == 0
    assert left["steps"] == sum(s["setting"]["steps"] for s in specs[10:])
    assert count_work(cfg, {s["key"] for s in specs}, {}, n_pool=64)["student_forward_prompts"] == 0


def test_predict_is_count_times_unit_time_and_the_lines_say_it():
    work = {"runs": 3, "steps": 30, "steps_by_batch_size": {4: 10, 8: 20}, "teacher_forward_prompts": 100,
            "student_forward_prompts": 200, "discovery_prompts": 16, "matching_prompts": 0}
    cal = {"step_s": {4: 0.5, 8: 1.0}, "teacher_s_per_prompt": 0.3, "student_s_per_prompt": 0.1, "peak_rss_gib": 2.0}
    p = predict(work, cal, cache_gib=0.5)
    assert list(p["seconds"].values()) == [30.0, 20.0, 25.0]
    assert p["total_seconds"] == 75.0 and p["peak_gib"] == 2.5
    lines = format_plan({"work": work, "predicted": p, "precision": "bf16"})
    assert lines[0] == ("plan: 3 runs to do, 30 optimizer steps, 100 teacher and 200 student forward prompts "
                        "(precision bf16); predicted 1.2 min, peak 2.5 GiB")
    assert lines[3] == "plan:   training steps: 0.4 min"
    assert lines[-1] == "plan:   not timed: discovery on 16 and matching on 0 prompt pairs"
    # a calibration that ran beside other work (it got well under its threads' CPU time) says its times are high
    idle = format_plan({"work": work, "predicted": p, "precision": "bf16", "calibration": {"cpu_share": 0.87}})
    loaded = format_plan({"work": work, "predicted": p, "precision": "bf16", "calibration": {"cpu_share": 0.45}})
    assert idle == lines and loaded[:-1] == lines and "got 45% of the CPU time" in loaded[-1]


def test_plan_vs_measured_reads_the_last_plan(tmp_path):
    assert plan_vs_measured(str(tmp_path), []) is None  # no plan made
    pred = {"seconds": {"teacher forwards (...)": 5.0, "student evaluation": 7.0, "training steps": 11.0},
            "total_seconds": 23.0, "peak_gib": 1.0}
    (tmp_path / "plan.json").write_text(json.dumps({"made": "t", "work": {"runs": 3}, "predicted": pred,
                                                    "planned_runs": ["a", "b", "c"]}))
    recs = [{"key": "a", "seconds": 4.0}, {"key": "b", "seconds": 6.5}, {"key": "x", "seconds": 100.0}]
    got = plan_vs_measured(str(tmp_path), recs)
    assert got["predicted_runs_seconds"] == 18.0  # the runs' stages, not the teacher's shared forwards
    assert (got["measured_runs_seconds"], got["planned_runs_done"], got["planned_runs"]) == (10.5, 2, 3)


def test_plan_vs_measured_counts_every_run_finished_since_the_plan(tmp_path):
    """With select_lr the plan knows only the tuning runs' keys, yet counts the seeds' runs at the lrs still to be
    chosen: the measured time is every run finished after the plan was made, whatever its key."""
    pred = {"seconds": {"teacher forwards (...)": 5.0, "training steps": 40.0}, "total_seconds": 45.0, "peak_gib": 1.0}
    (tmp_path / "plan.json").write_text(json.dumps({"made": "t", "work": {"runs": 4}, "predicted": pred,
                                                    "planned_runs": ["tune-a", "tune-b"], "done_before": ["old"]}))
    recs = [{"key": "old", "seconds": 100.0}, {"key": "tune-a", "seconds": 4.0}, {"key": "tune-b", "seconds": 6.0},
            {"key": "seed0-at-chosen-lr", "seconds": 5.0}, {"key": "not-applicable"}]
    got = plan_vs_measured(str(tmp_path), recs)
    assert (got["measured_runs_seconds"], got["planned_runs_done"], got["planned_runs"]) == (15.0, 4, 4)


@pytest.mark.slow
def test_plan_counts_the_work_left_calibrates_and_the_report_sets_it_beside_the_measured(tmp_path):
    """`fastcd experiment CONFIG --plan`: counts that follow from the config, a calibration on this machine,
    predicted seconds per stage; a run writes the plan first and its report puts the measured run time beside it."""
    import subprocess
    import sys

    import yaml

    d = _cfg(methods=["circuit-ce", "ce+cka", "full-ce"], seeds=[0, 1], steps=[2, 3], n_test=16, n_val=8,
             eval_every=2)
    conf = tmp_path / "exp.yaml"
    conf.write_text(yaml.safe_dump(d))
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "fastcd", "experiment", str(conf), "--out", str(out), "--plan"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    plan = json.load(open(out / "plan.json"))
    specs = ExperimentConfig.from_dict(d).run_specs()
    w = plan["work"]
    assert w["runs"] == len(specs) == 12  # 3 methods x 2 seeds x 2 step counts
    assert w["steps"] == sum(s["setting"]["steps"] for s in specs) == 2 * 3 * (2 + 3)
    circuit_runs = sum(1 for s in specs if s["method"] != "full-ce")
    val = sum(8 * (s["setting"]["steps"] // 2) for s in specs)
    assert w["student_forward_prompts"] == 16 * (len(specs) + circuit_runs) + val + 2 * 16
    # the cache over both seeds' pools, the teacher's test accuracy, its circuit's faithfulness (12 passes)
    assert w["teacher_forward_prompts"] == 2 * 32 + 16 + 12 * 16
    cal = plan["calibration"]
    assert cal["teacher_s_per_prompt"] > 0 and cal["student_s_per_prompt"] > 0 and set(cal["step_s"]) == {"8"}
    assert 0 < cal["cpu_share"] <= 1.5  # process CPU time over wall time x threads (a little over 1: helper threads)
    assert plan["predicted"]["total_seconds"] == pytest.approx(sum(plan["predicted"]["seconds"].values()), abs=0.2)
    assert "runs to do" in p.stdout and not os.path.exists(out / "runs.jsonl")  # --plan runs nothing
    report = run_experiment(d, str(out), progress=False)
    pl = report["plan"]
    assert pl["planned_runs"] == pl["planned_runs_done"] == 12
    recs = read_runs(os.path.join(out, "runs.jsonl")).values()
    assert pl["measured_runs_seconds"] == pytest.approx(sum(r["seconds"] for r in recs), abs=0.05)
    assert "Cost plan" in open(out / "summary.md").read()
