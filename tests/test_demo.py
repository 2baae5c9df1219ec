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


def test_demo_runs_equal_distill_runs(tmp_path):
    """The demo's shared-work path (models loaded once, teacher signals in memory, one training loop) trains the
    same student as fastcd.distill() with the same circuit, matching and settings: equal test predictions."""
    from fastcd.artifacts import Circuit, Matching
    from fastcd.config import DistillConfig
    from fastcd.loading import load_tokenizer
    from fastcd.pipeline import distill
    from fastcd.tasks import EntityTracking

    kw = dict(steps=5, batch_size=16, n_train=128, n_eval=60)
    report = run_demo("entity-tracking", out=str(tmp_path / "d"), n_discovery=32, seeds=(1,),
                      methods=("ce+cka", "ce+rand-cka"), progress=False, **kw)
    tok = load_tokenizer(shipped_checkpoint("et-student"))
    for method in ("ce+cka", "ce+rand-cka"):
        res = distill(shipped_checkpoint("et-teacher"), shipped_checkpoint("et-student"), EntityTracking(n_boxes=7),
                      circuit=Circuit.from_json(report["circuit"]), matching=Matching.from_json(report["matching"]),
                      config=DistillConfig(method=method, seed=1, lr=3e-3, progress=False, **kw),
                      student_tokenizer=tok, teacher_tokenizer=tok)
        assert res.metrics["student_accuracy"] == report["rows"][method]["full"], method
