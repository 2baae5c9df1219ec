"""A shortened `fastcd demo` on the shipped checkpoints (the full run is the README's main job)."""

import json
import os

import pytest

from fastcd.cli import main
from fastcd.demo import CHECKPOINTS, run_demo
from fastcd.pretrain import shipped_checkpoint


def _have(task):
    try:
        for name in CHECKPOINTS[task]:
            shipped_checkpoint(name)
        return True
    except FileNotFoundError:
        return False


def test_demo_checkpoints_ship():
    assert _have("entity-tracking") and _have("tom")


def test_short_demo_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    report = run_demo("entity-tracking", out=str(out), steps=4, batch_size=16, n_train=256, n_eval=60,
                      n_discovery=48, methods=("circuit-ce", "ce+cka", "ce+rand-cka"), progress=False)
    for f in ("report.json", "summary.md", "teacher_circuit.png", "student_heads.png", "matching.png", "curves.png"):
        assert (out / f).exists(), f
    rows = report["rows"]
    assert rows["teacher"]["full"] > 0.9  # the shipped teacher
    assert set(rows) == {"teacher", "base", "circuit-ce", "ce+cka", "ce+rand-cka"}
    assert rows["ce+cka"]["trainable_fraction"] < 0.2
    assert "ce+cka vs circuit-ce" in report["mcnemar"]
    assert json.loads((out / "report.json").read_text())["task"] == "entity-tracking"
    assert "| Circuit, CE + Align CKA |" in (out / "summary.md").read_text()


def test_demo_bad_input(tmp_path, capsys):
    with pytest.raises(ValueError, match="methods must be among"):
        run_demo("entity-tracking", out=str(tmp_path), methods=("lora",))
    rc = main(["demo", "--task", "tom", "--teacher", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert rc == 2 and "nowhere" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x" / "report.json")


def test_short_tom_demo(tmp_path):
    report = run_demo("tom", out=str(tmp_path), steps=3, batch_size=8, n_train=64, n_eval=60, n_discovery=32,
                      methods=("circuit-ce", "ce+cka"), progress=False)
    rows = report["rows"]
    assert rows["teacher"]["full"] > rows["base"]["full"]  # the shipped ToM teacher beats its student base
    assert all(h["position"] == "last" for h in report["circuit"]["heads"])
    assert 0 < rows["ce+cka"]["trained_heads_fraction"] <= 0.5
    assert "| Circuit, CE + Align CKA |" in (tmp_path / "summary.md").read_text()
