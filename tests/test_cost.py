"""The run's plan before the work and every stage measured in a real run (fastcd.cost; the stage lines alone:
test_stages.py), the CPU defaults for real LMs (DistillConfig.cpu_defaults), and the run folder the API writes."""

import contextlib
import json
import os

import pytest
import torch
from conftest import make_tiny

from fastcd.config import CPU_REAL_DEFAULTS, DistillConfig
from fastcd.cost import (
    MIN_ROW_SHARE,
    ROW_COST,
    discovery_roles,
    discovery_rows,
    predict_stages,
    row_share,
    stage,
    weight_bytes,
)
from fastcd.pipeline import distill
from fastcd.tasks import EntityTracking

TASK = EntityTracking(n_boxes=3)
STAGES = ["load", "discovery", "matching", "teacher evaluation", "teacher cache", "base evaluation", "training",
          "evaluation"]


@pytest.fixture(scope="module")
def tok():
    from fastcd.tokenizer import build_word_tokenizer

    return build_word_tokenizer()


def _cfg(**kw):
    base = dict(steps=4, batch_size=8, n_train=32, n_eval=16, n_discovery=12, lr=1e-2, progress=False,
                discovery="path", path_k=[2, 1, 1, 1], eval_every=2, n_val=8)
    base.update(kw)
    return DistillConfig(**base)


def _pair(tok):
    return make_tiny("llama", vocab_size=len(tok), seed=1, n_layers=3), make_tiny("llama", vocab_size=len(tok), seed=2)


def test_plan_only_counts_every_stage_and_times_it(tok):
    """``plan_only`` returns the plan after a calibration, before any work: every stage with its work (the counts
    follow the config) and a prediction, the peak memory, and nothing written."""
    teacher, student = _pair(tok)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = _cfg()
    plan = distill(teacher, student, TASK, config=cfg, student_tokenizer=tok, teacher_tokenizer=tok, plan_only=True)
    by = {st["stage"]: st for st in plan["stages"]}
    assert list(by) == STAGES
    heads = 3 * 4  # the tiny teacher: 3 layers x 4 heads
    rows, fw = discovery_rows("path", cfg.n_discovery, heads, len(discovery_roles(TASK, "path")))
    assert rows == 7 * heads * cfg.n_discovery  # a sender row: 1 pass into the logits, 2 into each later group
    assert by["discovery"]["work"] == {"teacher_rows": rows, "teacher": fw}
    assert by["teacher cache"]["work"] == {"teacher": cfg.n_train}
    assert by["teacher evaluation"]["work"] == {"teacher": cfg.n_eval + 13 * cfg.n_eval}
    assert by["training"]["work"] == {"steps": cfg.steps, "student": cfg.n_val * (cfg.steps // cfg.eval_every)}
    assert by["evaluation"]["work"] == {"student": 3 * cfg.n_eval}
    assert all(st["predicted_s"] >= 0 for st in plan["stages"] if st["work"])
    assert "predicted_s" not in by["load"] and plan["peak_gib"] > 0 and plan["predicted_s"] >= 0
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # the calibration undone


def test_every_stage_prints_a_status_line_and_is_measured_in_the_log(tok, tmp_path, capsys):
    teacher, student = _pair(tok)
    out = tmp_path / "run"
    res = distill(teacher, student, TASK, config=_cfg(out=str(out)), student_tokenizer=tok, teacher_tokenizer=tok)
    err = capsys.readouterr().err
    assert err.index("plan: ce+cka") < err.index("fastcd: load:")  # the plan comes before the work
    for name in STAGES + ["tokenisation", "saving"]:
        assert f"fastcd: {name}: " in err and f"fastcd: {name}: done in " in err, name
    with open(out / "log.json") as f:
        logged = json.load(f)["metrics"]["stages"]
    for name in STAGES:
        rec = res.metrics["stages"][name]
        assert rec["seconds"] >= 0 and rec["peak_rss_gib"] > 0
        assert logged[name]["seconds"] == rec["seconds"]


def test_the_api_run_folder_has_the_cli_files(tok, tmp_path):
    """``distill(config=DistillConfig(out=...))`` writes what ``fastcd distill --out`` lists, curves included."""
    teacher, student = _pair(tok)
    out = tmp_path / "run"
    distill(teacher, student, TASK, config=_cfg(out=str(out), circuit_eval=False), student_tokenizer=tok,
            teacher_tokenizer=tok)
    assert {"student", "adapter", "matching.json", "circuit.json", "log.json", "log.jsonl", "curves.png"} <= set(
        os.listdir(out))
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_cpu_defaults_scale_only_what_was_left_at_its_default():
    cfg, notes = DistillConfig().scaled_for(896, "cpu")
    assert {k: getattr(cfg, k) for k in CPU_REAL_DEFAULTS} == CPU_REAL_DEFAULTS and "n_train 4096 -> 512" in notes[0]
    cfg, notes = DistillConfig(steps=7, n_train=64).scaled_for(896, "cpu")
    assert cfg.steps == 7 and cfg.n_train == 64 and cfg.n_discovery == CPU_REAL_DEFAULTS["n_discovery"]
    for kw, width, dev in (({"cpu_defaults": False}, 896, "cpu"), ({}, 896, "cuda"), ({}, 128, "cpu")):
        cfg, notes = DistillConfig(**kw).scaled_for(width, dev)
        assert cfg == DistillConfig(**kw) and notes == []


def test_a_real_width_run_plans_with_the_cpu_defaults(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    def wide(seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2))

    plan = distill(wide(1), wide(2), TASK, config=DistillConfig(progress=False, discovery="attribution"),
                   student_tokenizer=tok, teacher_tokenizer=tok, plan_only=True)
    assert plan["scaled"] and "n_discovery 256 -> 32" in plan["scaled"][0]
    by = {st["stage"]: st for st in plan["stages"]}
    assert by["teacher cache"]["work"]["teacher"] == CPU_REAL_DEFAULTS["n_train"]
    assert by["training"]["work"]["steps"] == CPU_REAL_DEFAULTS["steps"]
    assert "calibrated" in plan["timing"]


def test_weight_bytes_reads_the_safetensors_headers(tmp_path, tok):
    model = make_tiny("llama", vocab_size=len(tok))
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    got_n, got_b = weight_bytes(str(tmp_path / "m"))
    assert got_n == n and got_b == 4 * n and weight_bytes(model) == (n, 4 * n)
    assert 0 < ROW_COST <= 1


def test_a_patching_row_costs_the_share_of_the_prompt_after_its_role(tok):
    """Batched patching reuses the clean prefix before a row's position of its role: a row at the last token costs
    about one token's share of a forward, a row at every position the whole prompt, a row at box_label the tokens
    from its own prompt's queried box label on; the plan times rows so."""
    enc = TASK.encode([p.clean for p in TASK.pairs(8, seed=1, split="val")], tok)
    t = enc.input_ids.shape[1]
    pos = enc.positions["box_label"].tolist()
    assert len(set(pos)) > 1
    assert row_share(enc, ["box_label"]) == pytest.approx(sum(t - p for p in pos) / len(pos) / t)
    assert row_share(enc, ["last"]) == pytest.approx(max(MIN_ROW_SHARE, 1 / t))
    assert row_share(enc, [None]) == row_share(enc, ["all"]) == 1.0
    assert row_share(enc, ["last", None]) == pytest.approx((row_share(enc, ["last"]) + 1.0) / 2)
    st = [stage("discovery", "x", teacher_rows=1000), stage("matching", "y", teacher_rows=1000)]
    st[0]["row_share"] = {"teacher": 0.5}
    predict_stages(st, {"teacher_s_per_prompt": 0.2, "student_s_per_prompt": 0.1, "step_s": {}})
    assert st[0]["predicted_s"] == pytest.approx(1000 * 0.2 * ROW_COST * 0.5)
    assert st[1]["predicted_s"] == pytest.approx(1000 * 0.2 * ROW_COST)


def test_weight_bytes_of_a_damaged_file_is_its_size(tmp_path):
    """A truncated safetensors file does not stop the plan (its size stands in); loading names the damage."""
    (tmp_path / "m").mkdir()
    data = b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": {\"dtype\""
    (tmp_path / "m" / "model.safetensors").write_bytes(data)
    assert weight_bytes(str(tmp_path / "m")) == (len(data) // 4, len(data))


def test_the_teacher_leaves_memory_before_training(tok, tmp_path, monkeypatch):
    """On the cheap path the teacher (loaded from disk by distill) is gone before the first training step: no object
    of its class is alive when training starts (the student is of another architecture)."""
    import gc

    import fastcd.pipeline as P

    teacher = make_tiny("qwen2", vocab_size=len(tok), seed=1, n_layers=3)
    teacher.save_pretrained(tmp_path / "teacher")
    del teacher
    seen = []
    real = P.train_run

    def spy(*a, **k):
        gc.collect()
        seen.append(sum(type(o).__name__ == "Qwen2ForCausalLM" for o in gc.get_objects()))
        return real(*a, **k)

    monkeypatch.setattr(P, "train_run", spy)
    distill(str(tmp_path / "teacher"), make_tiny("llama", vocab_size=len(tok), seed=2), TASK,
            config=_cfg(matching_method="ablation", discovery="path"), student_tokenizer=tok, teacher_tokenizer=tok)
    assert seen == [0]


def test_a_calibration_forward_counts_its_fastest_repeat_after_a_warm_up(monkeypatch):
    """The first forward at a shape pays one-time costs and a tiny model's call is easily preempted: neither may
    pass for the model's cost (a toy experiment was once planned at 18 min and ran in 2)."""
    import time as _time

    from fastcd import cost

    calls = []

    def fake_forward(model, batch, batch_size=None):
        calls.append(len(batch))
        _time.sleep({1: 0.3, 3: 0.15}.get(len(calls), 0.02))  # warm-up slow, one repeat preempted
        return [True] * len(batch)

    monkeypatch.setattr(cost, "accuracy_per_example", fake_forward)
    sec = cost._per_prompt(None, list(range(8)), contextlib.nullcontext)  # only len() of the batch is read here
    assert 0.02 / 8 <= sec < 0.05 / 8  # the fastest repeat, neither the warm-up nor the preempted one
    assert 3 <= len(calls) <= cost.MAX_REPEATS + 1
