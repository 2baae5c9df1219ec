"""Circuits, matchings and teacher caches record what they were made from; a run with other models or prompts
refuses them before any model loads, naming both sides (unless allow_foreign_artifacts)."""

from __future__ import annotations

import shutil

import pytest
from conftest import crash_after_first_save, make_tiny

from fastcd.artifacts import Circuit, CircuitHead, Matching, Pair, provenance
from fastcd.config import DistillConfig
from fastcd.loading import model_identity
from fastcd.models import Head
from fastcd.pipeline import distill
from fastcd.tasks import EntityTracking
from fastcd.teacher_cache import build_teacher_cache
from fastcd.tokenizer import build_word_tokenizer

TASK = EntityTracking(n_boxes=3)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prov")
    tok = build_word_tokenizer()
    for name, seed in (("teacher", 1), ("student", 2), ("other", 3)):
        make_tiny("llama", vocab_size=len(tok), seed=seed).save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name)
    shutil.copytree(tmp / "teacher", tmp / "teacher_copy")
    return tmp, tok


def test_model_identity_follows_the_weights_not_the_path(dirs):
    tmp, _ = dirs
    t = model_identity(str(tmp / "teacher"))
    assert t.startswith("model:") and t == model_identity(str(tmp / "teacher_copy"))
    assert t != model_identity(str(tmp / "other"))  # same config and shapes, other weights
    assert model_identity(make_tiny("llama")) is None


def _run(tmp, tok, **kw):
    cfg = DistillConfig(steps=1, batch_size=8, n_train=8, n_eval=4, progress=False, circuit_eval=False,
                        **kw.pop("cfg", {}))
    return distill(str(tmp / kw.pop("teacher", "teacher")), str(tmp / "student"), TASK, config=cfg,
                   student_tokenizer=tok, teacher_tokenizer=tok, **kw)


def test_a_circuit_or_matching_of_other_models_is_refused_by_name(dirs):
    tmp, tok = dirs
    ex = TASK.generate(8, seed=0, split="val")
    circuit = Circuit([CircuitHead(Head(1, 2), "heads", "last", -1.0)], TASK.name, 2, 4,
                      {"provenance": provenance(TASK, {"model": model_identity(str(tmp / "other"))}, ex)})
    m = Matching([Pair(Head(1, 2), Head(1, 1), "last", "g", {})], "given",
                 {"task": TASK.name, "provenance": provenance(TASK, {"teacher": model_identity(str(tmp / "teacher")),
                                                                     "student": model_identity(str(tmp / "other"))},
                                                              ex)})
    with pytest.raises(ValueError, match=r"circuit: made with another model \(model:\w+\) than this run's \(model:"):
        _run(tmp, tok, circuit=circuit, matching=Matching(m.pairs, "given"))
    with pytest.raises(ValueError, match=r"matching: made with another student \(model:\w+\) than this run's"):
        _run(tmp, tok, matching=m)
    _run(tmp, tok, matching=m, cfg={"allow_foreign_artifacts": True})  # deliberate: allowed
    _run(tmp, tok, matching=m, teacher="teacher_copy", cfg={"allow_foreign_artifacts": True})


def test_a_teacher_cache_of_other_prompts_is_refused(dirs):
    from fastcd.loading import load_model

    tmp, tok = dirs
    m = Matching([Pair(Head(1, 2), Head(1, 1), "last", "g", {})], "given")
    teacher = load_model(str(tmp / "teacher"))
    other = TASK.generate(8, seed=5, split="train")  # not the run's seed-0 prompts
    build_teacher_cache(teacher, TASK.encode(other, tok), m, str(tmp / "cache"),
                        provenance=provenance(TASK, {"teacher": model_identity(str(tmp / "teacher"))}, other))
    cfg = DistillConfig(steps=1, batch_size=8, n_train=8, n_eval=4, progress=False, circuit_eval=False)
    with pytest.raises(ValueError, match=r"teacher_cache: made from other training prompts than this run's"):
        distill(None, str(tmp / "student"), TASK, matching=m, teacher_cache=str(tmp / "cache"), config=cfg,
                student_tokenizer=tok)
    mine = TASK.generate(8, seed=0, split="train")
    build_teacher_cache(teacher, TASK.encode(mine, tok), m, str(tmp / "cache2"),
                        provenance=provenance(TASK, {"teacher": model_identity(str(tmp / "teacher"))}, mine))
    distill(None, str(tmp / "student"), TASK, matching=m, teacher_cache=str(tmp / "cache2"), config=cfg,
            student_tokenizer=tok)


def test_a_resume_with_another_model_directory_is_refused_before_it_loads(dirs, monkeypatch):
    import fastcd.pipeline as D

    tmp, tok = dirs
    m = Matching([Pair(Head(1, 2), Head(1, 1), "last", "g", {})], "given")
    cfg = DistillConfig(steps=3, batch_size=8, n_train=8, n_eval=4, progress=False, circuit_eval=False, save_every=1,
                        out=str(tmp / "run"))
    crash_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        distill(str(tmp / "teacher"), str(tmp / "student"), TASK, matching=m, config=cfg, student_tokenizer=tok,
                teacher_tokenizer=tok)

    def no_models(*a, **k):
        raise AssertionError("a model loaded before the resume identity was checked")

    monkeypatch.setattr(D, "load_model", no_models)
    with pytest.raises(ValueError, match=r"differs in \['student'\] \(student: 'model:\w+' there, 'model:\w+' now\)"):
        distill(str(tmp / "teacher"), str(tmp / "other"), TASK, matching=m, config=cfg, student_tokenizer=tok,
                teacher_tokenizer=tok)
