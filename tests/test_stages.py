"""fastcd.stages: the plan's lines (with its warning for a long or large run) and each stage's measured time,
peak memory and prediction."""

import torch

from fastcd.stages import Stages, format_run_plan


def test_a_long_or_large_plan_says_so_before_the_work():
    st = [{"stage": "training", "what": "x", "cheaper": "--steps", "work": {"steps": 10}, "predicted_s": 7200.0}]
    lines = format_run_plan({"title": "t", "stages": st, "peak_gib": 30.0, "available_gib": 20.0})
    assert "predicted 120.0 min" in lines[0] and "(cheaper: --steps)" in lines[1]
    assert lines[-1].startswith("plan: warning:") and "2.0 h" in lines[-1] and "exceeds the free memory" in lines[-1]
    st[0]["predicted_s"] = 60.0
    assert "warning" not in format_run_plan({"title": "t", "stages": st, "peak_gib": 1.0, "available_gib": 20.0})[-1]


def test_stages_record_time_memory_and_the_prediction(capsys):
    s = Stages({"stages": [{"stage": "a", "what": "the a stage", "cheaper": "", "work": {"teacher": 1},
                            "predicted_s": 5.0}]})
    with s("a", s.what("a")):
        x = torch.ones(1 << 20)
    del x
    err = capsys.readouterr().err
    assert "fastcd: a: the a stage" in err and "done in 0 s (planned 5 s), peak memory" in err
    assert s.records["a"]["predicted_s"] == 5.0 and s.records["a"]["peak_rss_gib"] > 0
