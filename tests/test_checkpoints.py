"""The shipped checkpoints load with plain transformers and keep their documented accuracy."""

import json
import os

import pytest

import fastcd
from fastcd.loading import load_model, load_tokenizer
from fastcd.pretrain import evaluate, shipped_checkpoint
from fastcd.tasks import EntityTracking, TheoryOfMind

ROOT = os.path.join(os.path.dirname(fastcd.__file__), "checkpoints")
SHIPPED = sorted(os.listdir(ROOT)) if os.path.isdir(ROOT) else []


def test_every_demo_checkpoint_is_shipped():
    assert {"et-teacher", "et-student", "tom-teacher", "tom-student"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_checkpoint_accuracy(name):
    path = shipped_checkpoint(name)
    info = json.load(open(os.path.join(path, "fastcd_checkpoint.json")))
    model, tok = load_model(path), load_tokenizer(path)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    assert size < 4 * 2**20, f"{name} is {size} bytes; shipped checkpoints stay a few MB at most"
    if info["task"] == "entity-tracking":
        res = evaluate(model, tok, EntityTracking(n_boxes=7), 500, split="test")
        lo, hi = (0.95, 1.0) if info["role"] == "teacher" else (0.3, 0.9)
    else:
        res = evaluate(model, tok, TheoryOfMind(), 600, split="test")
        lo, hi = (res["heuristic_accuracy"] + 0.05, 1.0) if info["role"] == "teacher" else (0.3, 0.95)
        if info["role"] == "teacher":  # above the "true content" heuristic on the false-belief cases too
            assert res["accuracy_unobserved"] >= 0.5, (name, res)
    assert lo <= res["accuracy"] <= hi, (name, res)


def test_shipped_checkpoint_error():
    with pytest.raises(FileNotFoundError, match="no shipped checkpoint 'gpt5'"):
        shipped_checkpoint("gpt5")
