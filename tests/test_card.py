"""A run's folder (fastcd.card): the model card beside a distilled student and :func:`save_result`'s files."""

import json
import sys

import torch
from conftest import make_tiny
from distill_helpers import given_matching

from fastcd.adapters import apply_adapter
from fastcd.artifacts import Circuit, CircuitHead
from fastcd.card import _command_line, model_card, save_result
from fastcd.config import DistillConfig
from fastcd.models import Head
from fastcd.pipeline import DistillResult

METRICS = {"teacher_accuracy": 0.9, "student_base_accuracy": 0.25, "student_accuracy": 0.625,
           "student_circuit_accuracy": 0.5, "trainable_params": 1234, "trainable_fraction": 0.0125,
           "trained_heads": 3, "trained_heads_fraction": 0.375, "lam_effective": 1.0, "steps_done": 4,
           "teacher_circuit": {"circuit_accuracy": 0.8, "faithfulness": 0.889, "circuit_size": 2, "n_heads_total": 8,
                               "protocol": "strict", "n_prompts": 32, "split": "test", "n_random": 10,
                               "random_circuit_accuracy": 0.05, "random_circuit_sd": 0.02}}
CIRCUIT = Circuit([CircuitHead(Head(1, 1), "mover", "last", -0.4)], "entity-tracking", 2, 4)


def test_the_card_states_what_was_distilled_and_how():
    cfg = DistillConfig(method="ce+cka", steps=4, batch_size=8, n_eval=32, seed=3)
    card = model_card(DistillResult(None, given_matching(), CIRCUIT, METRICS), cfg, teacher="big", student="small",
                      command="fastcd distill --teacher big")
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "# small distilled from big with fastcd" in card
    assert "| teacher | 0.900 | 0.800 (faithfulness 0.89) |" in card
    assert "| student before | 0.250 | - |" in card and "| student after | 0.625 | 0.500 |" in card
    assert "10 random circuits of its size and roles: 0.050 (SD 0.020)" in card
    assert "Trainable: 1,234 parameters (1.2% of the student), 3 heads (37.5%)." in card
    assert "4 of 4 steps, batch 8" in card and "seed 3" in card and "fastcd distill --teacher big" in card
    assert str(given_matching()) in card and str(CIRCUIT) in card
    assert json.loads(card.split("```json\n")[1].split("\n```")[0])["method"] == "ce+cka"  # the full config


def test_a_card_without_metrics_says_so_with_dashes():
    card = model_card(DistillResult(None, None, None, {}), DistillConfig())
    assert "# student distilled from a teacher cache with fastcd" in card
    assert "| teacher | - | - |" in card and "## Matching" not in card and "## Teacher circuit" not in card


def test_command_line_names_the_cli_or_the_script_never_a_path(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["venv/bin/fastcd", "distill", "--steps", "3"])
    assert _command_line() == "fastcd distill --steps 3"
    monkeypatch.setattr(sys, "argv", ["scripts/train.py", "--lr", "1e-4"])
    assert _command_line() == "python train.py --lr 1e-4   # calls fastcd.distill(...)"
    monkeypatch.setattr(sys, "argv", ["-c"])
    assert "interactive" in _command_line()


def test_save_result_writes_the_run_folder(tmp_path, tok):
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    base = make_tiny("llama", vocab_size=len(tok), seed=2)
    with torch.no_grad():
        student.model.layers[1].self_attn.q_proj.weight[8:16] += 1.0  # the matched head L1H1's q slice "trained"
    cfg = DistillConfig(method="ce+cka", steps=1, out=str(tmp_path / "run"))
    res = DistillResult(student, given_matching(), CIRCUIT, METRICS, log=[{"step": 1, "ce": 2.0}])
    out = save_result(res, cfg, tok, teacher="big", student="small")
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert names == {"student", "adapter", "matching.json", "circuit.json", "log.json", "curves.png"}
    assert (tmp_path / "run" / "student" / "README.md").read_text().startswith("---\n")
    assert json.load(open(tmp_path / "run" / "log.json"))["log"] == [{"step": 1, "ce": 2.0}]
    adapted = apply_adapter(base, f"{out}/adapter")  # the trained slices alone, applied onto the base
    x = torch.randint(0, len(tok), (2, 7))
    torch.testing.assert_close(adapted(input_ids=x).logits, student(input_ids=x).logits)


def test_a_full_model_run_has_no_adapter(tmp_path):
    res = DistillResult(make_tiny("llama"), given_matching(), None, {})
    save_result(res, DistillConfig(method="full-ce", steps=1, out=str(tmp_path / "run")))
    assert not (tmp_path / "run" / "adapter").exists() and (tmp_path / "run" / "student" / "README.md").exists()
