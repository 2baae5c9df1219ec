"""A run's identity includes the data it uses: a resume onto changed prompts is refused, before any model loads,
in words a user can act on; an unchanged resume says so; the manifest never names a checkpoint that is not there."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import crash_after_first_save, make_tiny

import fastcd.pipeline as D
from fastcd.artifacts import Matching, Pair
from fastcd.config import DistillConfig
from fastcd.models import Head
from fastcd.resume import data_identity, describe_data_diff
from fastcd.tasks import EntityTracking, load_jsonl, save_jsonl
from fastcd.tokenizer import build_word_tokenizer


class FileTask(EntityTracking):
    """Entity tracking whose training prompts come from a JSONL file read when it generates (lazily), as a user's
    own task might: its attributes (the path) do not change when the file does."""

    def __init__(self, path):
        super().__init__(n_boxes=3)
        self.path = str(path)

    def generate(self, n, seed=0, split="train"):
        if split != "train":
            return super().generate(n, seed=seed, split=split)
        return load_jsonl(self.path)[:n]


def _run(task, out, steps, tok, teacher):
    m = Matching([Pair(Head(1, 2), Head(1, 1), "last", "g", {})], "given")
    cfg = DistillConfig(steps=steps, batch_size=8, n_train=16, n_eval=8, lr=1e-2, progress=False, save_every=2,
                        out=str(out))
    return D.distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), task, matching=m, config=cfg,
                     student_tokenizer=tok, teacher_tokenizer=tok)


def test_a_resume_onto_changed_prompts_is_refused_before_models_load(tmp_path, monkeypatch, capsys):
    tok = build_word_tokenizer()
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    data = tmp_path / "prompts.jsonl"
    save_jsonl(EntityTracking(n_boxes=3).generate(16, seed=0, split="train"), data)
    task = FileTask(data)
    crash_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):  # killed right after the step-2 checkpoint
        _run(task, tmp_path / "run", 6, tok, teacher)
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["step"] == 2 and (tmp_path / "run" / "ckpt.pt").is_file()
    # three prompts of the file change; the task object does not
    exs = load_jsonl(data)
    other = EntityTracking(n_boxes=3).generate(40, seed=9, split="train")
    exs[4], exs[7], exs[11] = other[0], other[1], other[2]
    save_jsonl(exs, data)

    def no_models(*a, **k):
        raise AssertionError("a model loaded before the resume identity was checked")

    monkeypatch.setattr(D, "load_model", no_models)
    with pytest.raises(ValueError, match=r"differs in \['data'\] \(training prompts differ: 3 of 16 changed "
                                         r"\(first: prompt 4\)\)"):
        _run(task, tmp_path / "run", 6, tok, teacher)


def test_an_unchanged_resume_says_where_it_resumes_from(tmp_path, monkeypatch, capsys):
    tok = build_word_tokenizer()
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    task = EntityTracking(n_boxes=3)
    crash_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _run(task, tmp_path / "r", 4, tok, teacher)
    capsys.readouterr()
    res = _run(task, tmp_path / "r", 4, tok, teacher)
    assert f"resuming from step 2 of 4 ({tmp_path / 'r' / 'ckpt.pt'})" in capsys.readouterr().err
    assert res.log[-1]["step"] == 4


def test_the_manifest_is_written_after_its_checkpoint(tmp_path, monkeypatch):
    """A kill between the two writes leaves no manifest naming a step whose checkpoint is missing."""
    import fastcd.resume as R

    def crash_in_manifest(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(R, "write_json_atomic", crash_in_manifest)
    with pytest.raises(KeyboardInterrupt):
        R.save_checkpoint({"step": 3}, str(tmp_path), {"config": {}}, 3)
    assert (tmp_path / "ckpt.pt").is_file() and not (tmp_path / "manifest.json").exists()
    assert torch.load(tmp_path / "ckpt.pt")["step"] == 3


def test_data_identity_describes_what_changed():
    a = EntityTracking(n_boxes=3).generate(10, seed=0)
    b = list(a)
    b[6] = EntityTracking(n_boxes=3).generate(10, seed=5)[0]
    old, new = data_identity({"train": a, "test": a}), data_identity({"train": b, "test": a[:9]})
    assert describe_data_diff(old, new) == ["training prompts differ: 1 of 10 changed (first: prompt 6)",
                                            "test prompts differ: 10 there, 9 now"]
    assert describe_data_diff(old, old) == []


def test_a_foreign_circuit_runs_only_when_allowed_and_the_manifest_says_so(tmp_path):
    from fastcd.artifacts import Circuit, CircuitHead

    tok = build_word_tokenizer()
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    circuit = Circuit([CircuitHead(Head(1, 2), "heads", "last", -1.0)], "tom", 2, 4, {"model": "tom-teacher"})
    m = Matching([Pair(Head(1, 2), Head(1, 1), "last", "g", {})], "given", {"task": "tom"})
    for art in ({"circuit": circuit}, {"matching": m}):
        cfg = DistillConfig(steps=1, batch_size=8, n_train=8, n_eval=4, progress=False, method="ce+cka")
        with pytest.raises(ValueError, match=r"made for task 'tom'.*this run's task is 'entity-tracking'"):
            D.distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), EntityTracking(n_boxes=3),
                      **art, **({} if "matching" in art else {"matching": Matching(m.pairs, "given")}),
                      config=cfg, student_tokenizer=tok, teacher_tokenizer=tok)
    cfg = DistillConfig(steps=2, batch_size=8, n_train=8, n_eval=4, progress=False, save_every=1,
                        allow_foreign_artifacts=True, out=str(tmp_path / "run"))
    D.distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), EntityTracking(n_boxes=3), circuit=circuit,
              matching=m, config=cfg, student_tokenizer=tok, teacher_tokenizer=tok)
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["identity"]["config"]["allow_foreign_artifacts"] is True
