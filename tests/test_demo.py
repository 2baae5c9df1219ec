"""A shortened `fastcd demo` on the shipped checkpoints (the full run is the README's main job): a thin experiment
over a shipped config, plus its three circuit figures."""

import json
import os
import re

import pytest
import yaml

from fastcd.cli import main
from fastcd.cli_args import DemoArgs
from fastcd.demo import FIGURES, TASKS, demo_config, demo_config_path, run_demo
from fastcd.pretrain import shipped_checkpoint

SHORT = dict(steps=4, batch_size=16, n_train=256, n_test=60, n_discovery=48)


def test_demo_checkpoints_and_configs_ship():
    for task in TASKS:
        cfg = demo_config(task)
        assert os.path.isdir(cfg.teacher) and os.path.isdir(cfg.student)  # names resolved to the shipped folders
        assert cfg.teacher == shipped_checkpoint(f"{'et' if task == 'entity-tracking' else 'tom'}-teacher")


def test_the_demo_flags_say_the_shipped_values():
    """Each flag's help names the shipped config's value ("config: 150"): the two cannot drift apart."""
    shipped = yaml.safe_load(open(demo_config_path("entity-tracking")))
    from dataclasses import fields

    for f in fields(DemoArgs):
        m = re.search(r"\(config: ([^)]*)\)", f.metadata.get("help", ""))
        if m and f.name != "methods":
            v = shipped[f.name]
            assert m.group(1) == (", ".join(map(str, v)) if isinstance(v, list) else str(v)), f.name
    assert shipped["methods"] == ["full-ce", "kd", "circuit-ce", "cka", "ce+rand-cka", "ce+cka"]  # distill()'s six


@pytest.mark.slow
def test_short_demo_writes_the_report_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    report = run_demo("entity-tracking", out=str(out), methods=["circuit-ce", "ce+cka", "ce+rand-cka"],
                      progress=False, **SHORT)
    for f in ("report.json", "summary.md", "accuracy.png", "curves.png", *FIGURES):
        assert (out / f).stat().st_size > 0, f
    rows = {r["method"]: r for r in report["table"]}
    assert report["teacher_accuracy"] > 0.9  # the shipped teacher
    assert set(rows) == {"circuit-ce", "ce+cka", "ce+rand-cka"} and report["runs_done"] == 3
    assert rows["ce+cka"]["trainable_fraction"] < 0.2 and rows["ce+cka"]["circuit_accuracy"]["n"] == 1
    assert any(t["a"].startswith("ce+cka") and t["b"].startswith("circuit-ce") for t in report["mcnemar"])
    assert json.loads((out / "report.json").read_text())["config"]["n_test"] == 60
    assert "| Circuit, CE + Align CKA |" in (out / "summary.md").read_text()
    capsys.readouterr()
    run_demo("entity-tracking", out=str(out), methods=["circuit-ce", "ce+cka", "ce+rand-cka"], progress=False,
             **SHORT)
    assert "3 runs, 3 done, 0 to run" in capsys.readouterr().out  # the same demo again: nothing retrained


def test_demo_bad_input_fails_before_any_work(tmp_path, capsys):
    with pytest.raises(ValueError, match="methods"):
        run_demo("entity-tracking", out=str(tmp_path / "a"), methods=["lora"])
    with pytest.raises(ValueError, match="task must be one of"):
        run_demo("sorting", out=str(tmp_path / "a"))
    assert not os.path.exists(tmp_path / "a")
    rc = main(["demo", "--task", "tom", "--teacher", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert rc == 2 and "nowhere" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x" / "report.json")


@pytest.mark.slow
def test_short_tom_demo_from_the_cli(tmp_path, capsys):
    out = tmp_path / "tom"
    rc = main(["demo", "--task", "tom", "--out", str(out), "--steps", "3", "--batch-size", "8", "--n-train", "64",
               "--n-test", "60", "--n-discovery", "32", "--methods", "circuit-ce,ce+cka", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0 and "| Circuit, CE + Align CKA |" in printed and f"report: {out}/" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["teacher_accuracy"] > report["base"]["accuracy"]  # the shipped ToM teacher beats its student
    assert all(h["position"] == "last" for h in report["circuit"]["heads"])  # ToM's policy: the last token
    assert 0 < next(r for r in report["table"] if r["method"] == "ce+cka")["trained_heads_fraction"] <= 0.5
