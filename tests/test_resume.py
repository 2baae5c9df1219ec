"""A run's identity includes the data it uses: a resume onto changed prompts is refused, before any model loads,
in words a user can act on; an unchanged resume says so; the manifest never names a checkpoint that is not there."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import crash_after_first_save, make_tiny
from distill_helpers import TASK, given_matching, small_config

import fastcd.pipeline as D
from fastcd.artifacts import Matching, Pair
from fastcd.config import DistillConfig
from fastcd.models import Head
from fastcd.pipeline import distill
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


@pytest.mark.parametrize("sched", [{}, {"lr_scheduler": "linear", "warmup_steps": 2, "max_grad_norm": 0.5}])
def test_resume_reaches_the_same_weights(tmp_path, tok, monkeypatch, sched):
    """A run killed after its first checkpoint and resumed ends bit-identical to a straight run (with a warmup +
    linear schedule and clipping too: the scheduler state is checkpointed)."""
    import fastcd.pipeline as D

    m = given_matching()
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    straight = distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=m,
                       config=small_config(steps=6, **sched), student_tokenizer=tok, teacher_tokenizer=tok)
    real = D.save_checkpoint
    calls = {"n": 0}

    def crash(*args):
        real(*args)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(D, "save_checkpoint", crash)
    cfg = small_config(steps=6, save_every=3, out=str(tmp_path / "r"), **sched)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=m, config=cfg,
                student_tokenizer=tok, teacher_tokenizer=tok)
    monkeypatch.setattr(D, "save_checkpoint", real)
    resumed = distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=m, config=cfg,
                      student_tokenizer=tok, teacher_tokenizer=tok)
    a, b = straight.student.state_dict(), resumed.student.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["lr"] for r in resumed.log] == [r["lr"] for r in straight.log]


def _crash_after_first_save(monkeypatch):
    crash_after_first_save(monkeypatch)


def test_resume_refuses_another_run_by_name(tmp_path, tok, monkeypatch):
    """A checkpoint resumes only the run that wrote it: another student, task, matching or lr is named."""
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    out = str(tmp_path / "r")
    cfg = small_config(steps=6, save_every=2, out=out)
    _crash_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=given_matching(), config=cfg,
                student_tokenizer=tok, teacher_tokenizer=tok)
    other_student = make_tiny("llama", vocab_size=len(tok), seed=3)
    with pytest.raises(ValueError, match=r"differs in \['student'\]"):
        distill(teacher, other_student, TASK, matching=given_matching(), config=cfg, student_tokenizer=tok,
                teacher_tokenizer=tok)
    with pytest.raises(ValueError, match=r"differs in \['data', 'task'\] \(training prompts differ: 64 of 64 changed"):
        distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), EntityTracking(n_boxes=4),
                matching=given_matching(), config=cfg, student_tokenizer=tok, teacher_tokenizer=tok)
    with pytest.raises(ValueError, match=r"differs in \['matching'\]"):
        distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK,
                matching=given_matching(((Head(1, 2), Head(1, 3), "last"),)), config=cfg, student_tokenizer=tok,
                teacher_tokenizer=tok)
    with pytest.raises(ValueError, match=r"differs in \['lr'\] \(lr: 0.01 there, 0.02 now\)"):
        distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=given_matching(),
                config=small_config(steps=6, save_every=2, out=out, lr=2e-2), student_tokenizer=tok,
                teacher_tokenizer=tok)
    # the same run under another spelling of its directory, and with more steps: resumes
    res = distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=given_matching(),
                  config=small_config(steps=8, save_every=2, out=out + "/../r"), student_tokenizer=tok,
                  teacher_tokenizer=tok)
    assert res.log[-1]["step"] == 8
    with pytest.raises(ValueError, match="is at step 8, past steps=4"):
        distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=given_matching(),
                config=small_config(steps=4, save_every=2, out=out), student_tokenizer=tok, teacher_tokenizer=tok)
    # overwrite starts over
    res = distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=3), TASK, matching=given_matching(),
                  config=small_config(steps=2, save_every=2, out=out, overwrite=True), student_tokenizer=tok,
                  teacher_tokenizer=tok)
    assert [r["step"] for r in res.log] == [1, 2]


def test_corrupt_checkpoint_and_out_file_are_one_line_errors(tmp_path, tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    out = tmp_path / "r"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=given_matching(),
                config=small_config(save_every=2, out=str(out)), student_tokenizer=tok, teacher_tokenizer=tok)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=given_matching(),
                config=small_config(out=str(f)), student_tokenizer=tok, teacher_tokenizer=tok)


def test_resume_with_dropout_is_bit_identical(tmp_path, tok, monkeypatch):
    """The global RNG (dropout) is checkpointed: a killed and resumed run equals a straight one."""
    def student():
        m = make_tiny("llama", vocab_size=len(tok), seed=2)
        m.config.attention_dropout = 0.3
        for layer in m.model.layers:
            layer.self_attn.attention_dropout = 0.3
        return m

    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    straight = distill(teacher, student(), TASK, matching=given_matching(), config=small_config(steps=4),
                       student_tokenizer=tok,
                       teacher_tokenizer=tok)
    cfg = small_config(steps=4, save_every=2, out=str(tmp_path / "d"))
    _crash_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, student(), TASK, matching=given_matching(), config=cfg, student_tokenizer=tok,
                teacher_tokenizer=tok)
    torch.manual_seed(12345)  # whatever ran in between
    torch.rand(7)
    resumed = distill(teacher, student(), TASK, matching=given_matching(), config=cfg, student_tokenizer=tok,
                      teacher_tokenizer=tok)
    for k, v in straight.student.state_dict().items():
        assert torch.equal(v, resumed.student.state_dict()[k]), k


def test_resume_flag_needs_a_checkpoint_and_manifest_is_written(tmp_path, tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    out = tmp_path / "r"
    with pytest.raises(ValueError, match="resume: there is no checkpoint to resume"):
        distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=given_matching(),
                config=small_config(steps=2, save_every=1, out=str(out), resume=True), student_tokenizer=tok,
                teacher_tokenizer=tok)
    distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=given_matching(),
            config=small_config(steps=2, save_every=1, out=str(out)), student_tokenizer=tok, teacher_tokenizer=tok)
    man = json.loads((out / "manifest.json").read_text())
    assert man["step"] == 2 and man["identity"]["config"]["lr"] == 0.01 and man["identity"]["matching"]
    res = distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=given_matching(),
                  config=small_config(steps=3, save_every=1, out=str(out), resume=True), student_tokenizer=tok,
                  teacher_tokenizer=tok)
    assert res.log[-1]["step"] == 3
