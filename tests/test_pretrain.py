import json
import random

import pytest
import torch
from safetensors.torch import load_file

from fastcd import pretrain as pt
from fastcd.pretrain import PretrainArgs, SequenceMaker, pretrain
from fastcd.tokenizer import build_word_tokenizer


def _cfg(out, task="entity-tracking"):
    return PretrainArgs(task=task, role="teacher", out=str(out), n_layers=1, d_model=16, n_heads=2, d_ff=32,
                          steps=6, batch_size=4, warmup=2, eval_every=3, eval_n=8, save_every=3, max_boxes=3,
                          start_boxes=2)


def test_sequences_supervise_every_answer():
    tok = build_word_tokenizer()
    for task in ("entity-tracking", "tom"):
        cfg = _cfg("x", task)
        ids, attn, labels, sizes = SequenceMaker(cfg, tok).batch(random.Random(0), 3)
        for i in range(ids.shape[0]):
            toks = tok.convert_ids_to_tokens(ids[i].tolist())
            sup = (labels[i] != -100).nonzero().flatten().tolist()
            assert len(sup) >= 2
            for p in sup:
                if task == "entity-tracking":
                    assert toks[p - 1 : p + 1] == ["contains", "the"]
                else:
                    assert toks[p - 1 : p + 1] == ["Answer", ":"]
                assert labels[i, p] == ids[i, p + 1]
        if task == "entity-tracking":
            assert set(sizes.tolist()) <= {2, 3}


def test_resume_reaches_the_same_weights(tmp_path, monkeypatch):
    straight = pretrain(_cfg(tmp_path / "a"), progress=False)
    real_save = pt._save_atomic
    calls = {"n": 0}

    def crash_after_first_checkpoint(model, tok, state, path):
        real_save(model, tok, state, path)
        if path.endswith("ckpt"):
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyboardInterrupt

    monkeypatch.setattr(pt, "_save_atomic", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        pretrain(_cfg(tmp_path / "b"), progress=False)
    monkeypatch.setattr(pt, "_save_atomic", real_save)
    assert torch.load(tmp_path / "b" / "ckpt" / "state.pt", weights_only=False)["step"] == 3
    resumed = pretrain(_cfg(tmp_path / "b"), progress=False)
    wa = load_file(tmp_path / "a" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert straight == resumed
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 6]


def test_resume_refuses_a_different_config(tmp_path):
    pretrain(_cfg(tmp_path), progress=False)
    cfg = _cfg(tmp_path)
    cfg.lr = 5e-3
    with pytest.raises(ValueError, match="different configuration.*lr"):
        pretrain(cfg, progress=False)


def test_tom_eval_reports_question_types(tmp_path):
    res = pretrain(_cfg(tmp_path, "tom"), progress=False)
    for k in ("accuracy", "accuracy_own", "accuracy_observed", "accuracy_unobserved", "heuristic_accuracy"):
        assert 0.0 <= res[k] <= 1.0


def test_config_validation():
    with pytest.raises(ValueError, match="task must be"):
        PretrainArgs(task="x").validate()
    with pytest.raises(ValueError, match="boxes must satisfy"):
        PretrainArgs(start_boxes=9).validate()
    with pytest.raises(ValueError, match="lr must be > 0"):
        PretrainArgs(lr=0).validate()


def test_warm_start_begins_from_the_given_weights(tmp_path):
    pretrain(_cfg(tmp_path / "a"), progress=False)
    src = tmp_path / "a" / "final"
    cfg = _cfg(tmp_path / "b", "tom")
    cfg.init_from, cfg.steps, cfg.lr = str(src), 1, 1e-12  # one step at a negligible lr: weights barely move
    pretrain(cfg, progress=False)
    wa = load_file(src / "model.safetensors")
    wb = load_file(tmp_path / "b" / "final" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    fresh = _cfg(tmp_path / "c", "tom")
    fresh.steps, fresh.lr = 1, 1e-12
    pretrain(fresh, progress=False)
    wc = load_file(tmp_path / "c" / "final" / "model.safetensors")
    assert any(not torch.allclose(wa[k], wc[k]) for k in wa)  # without init_from the weights differ


def test_warm_start_refuses_another_architecture(tmp_path):
    pretrain(_cfg(tmp_path / "a"), progress=False)
    cfg = _cfg(tmp_path / "b")
    cfg.init_from, cfg.d_model, cfg.d_ff = str(tmp_path / "a" / "final"), 32, 64
    with pytest.raises(ValueError, match=r"init_from: .*d_model.*\(16, 32\)"):
        pretrain(cfg, progress=False)
    with pytest.raises(ValueError, match="init_from must be a model directory"):
        PretrainArgs(init_from=str(tmp_path / "nowhere")).validate()


def test_tom_curriculum_levels():
    tok = build_word_tokenizer()
    maker = SequenceMaker(_cfg("x", "tom"), tok)
    rng = random.Random(0)
    for level in (0, 1, 2):
        for _ in range(20):
            text, _ = maker._tom_text(rng, level)
            assert ("working in a busy restaurant" in text) == (level > 0)
            assert "unknown" not in text  # no unobserved question below level 3
            story, *qa = text.split(" Question: ")
            for q in qa:  # every answer is the drink the question's container holds
                cont = q.split(" believe the ")[1].split()[0]
                drink = q.split("Answer: ")[1].strip()
                assert f"{cont} and fills it with {drink}." in story
    texts = [maker._tom_text(rng, 3)[0] for _ in range(60)]
    assert any("unknown" in t for t in texts)
    with pytest.raises(ValueError, match="tom_start_level must be 0, 1, 2 or 3"):
        PretrainArgs(tom_start_level=4).validate()


@pytest.mark.parametrize("form", ["what", "mirror"])
def test_tom_reverse_questions_answer_the_container(form):
    tok = build_word_tokenizer()
    cfg = _cfg("x", "tom")
    cfg.tom_reverse, cfg.tom_reverse_form, cfg.queries = 0.5, form, 8
    maker = SequenceMaker(cfg, tok)
    rng = random.Random(1)
    n_rev = 0
    for _ in range(20):
        text, _ = maker._tom_text(rng, 0)
        story, *qa = text.split(" Question: ")
        for q in qa:
            asked, answer = q.split(" Answer: ")
            word = asked.split(" the ")[-1].split()[0].rstrip("?")
            if word in maker.tom.drinks:  # a reverse question: the container holding that drink
                n_rev += 1
                assert f"{answer} and fills it with {word}." in story
                assert asked.startswith("What contains" if form == "what" else "What does")
            else:
                assert f"{word} and fills it with {answer}." in story
    assert 40 <= n_rev <= 100  # about half of the 7 x 20 follow-ups
    with pytest.raises(ValueError, match="tom_reverse must be in"):
        PretrainArgs(tom_reverse=1.0).validate()
    with pytest.raises(ValueError, match="tom_reverse_form must be"):
        PretrainArgs(tom_reverse_form="x").validate()


def test_stop_at_step_keeps_the_schedule(tmp_path):
    full = _cfg(tmp_path / "a")
    pretrain(full, progress=False)
    cut = _cfg(tmp_path / "b")
    cut.stop_at_step = 3
    pretrain(cut, progress=False)
    assert torch.load(tmp_path / "b" / "ckpt" / "state.pt", weights_only=False)["step"] == 3
    # the first 3 steps of both runs are the same (same schedule), so the step-3 checkpoints match
    log_a = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b] == [3] and log_a[0]["loss"] == log_b[0]["loss"]
    with pytest.raises(ValueError, match=r"stop_at_step must be in \[1, steps=6\]"):
        PretrainArgs(steps=6, stop_at_step=7).validate()
