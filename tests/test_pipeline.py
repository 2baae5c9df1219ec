"""fastcd.pipeline.distill(): discovery, matching, training and evaluation end to end on tiny models."""

import json
import math

import pytest
import torch
from conftest import make_tiny
from distill_helpers import TASK, given_matching, small_config

from fastcd.artifacts import Matching
from fastcd.config import DistillConfig
from fastcd.distillation import CircuitDistiller, check_vocabularies
from fastcd.models import Head
from fastcd.pipeline import distill


def test_loss_decreases_and_student_loads_with_transformers(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    res = distill(teacher, student, TASK, matching=given_matching(),
                  config=small_config(steps=40, lr=3e-2, out=str(tmp_path / "run"), log_every=1),
                  student_tokenizer=tok, teacher_tokenizer=tok)
    first = sum(r["loss"] for r in res.log[:5]) / 5
    last = sum(r["loss"] for r in res.log[-5:]) / 5
    assert last < first
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student", local_files_only=True)
    ids = torch.randint(0, len(tok), (2, 7))
    torch.testing.assert_close(loaded(ids).logits, res.student(ids).logits)
    saved = json.loads((tmp_path / "run" / "log.json").read_text())
    assert saved["metrics"]["method"] == "ce+cka" and len(saved["log"]) == 40
    assert Matching.load(tmp_path / "run" / "matching.json").to_json() == res.matching.to_json()


def test_the_result_saves_a_complete_student_with_its_tokenizer(tmp_path, tok):
    """``res.save_pretrained(dir)`` (README's line) writes the tokenizer beside the weights: the folder reloads with
    AutoTokenizer (every token) and AutoModelForCausalLM, and greedy generation gives the student's own answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    res = distill(teacher, student, TASK, matching=given_matching(), config=small_config(steps=2),
                  student_tokenizer=tok, teacher_tokenizer=tok)
    res.save_pretrained(tmp_path / "distilled")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "distilled", local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "distilled", local_files_only=True)
    assert len(tok2) == len(tok) and tok2.get_vocab() == tok.get_vocab()
    prompt = TASK.generate(1, seed=3)[0].prompt
    ids = tok2(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == tok(prompt, return_tensors="pt").input_ids.tolist()
    out = model.generate(ids, max_new_tokens=1, do_sample=False)
    with torch.no_grad():
        want = res.student(ids).logits[0, -1].argmax()
    assert int(out[0, -1]) == int(want)


@pytest.mark.parametrize("method", ["full-ce", "circuit-ce", "cka", "ce+rand-cka", "kd"])
def test_every_method_runs(method, tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    res = distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=given_matching(),
                  config=small_config(method=method, steps=3), student_tokenizer=tok, teacher_tokenizer=tok)
    assert 0 <= res.metrics["student_accuracy"] <= 1
    if method in ("full-ce", "kd"):
        assert res.metrics["trainable_fraction"] == 1.0
    if method == "ce+rand-cka":
        assert res.matching.method == "random"
        assert [p.teacher for p in res.matching.pairs] == [Head(1, 2), Head(0, 3)]


def test_distill_discovers_and_matches_when_not_given(tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1, n_layers=3)
    res = distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK,
                  config=small_config(steps=2, n_discovery=12, discovery="path", path_k=[2, 1, 1, 1]),
                  student_tokenizer=tok, teacher_tokenizer=tok)
    assert res.circuit is not None and len(res.matching) >= 1
    assert "student_circuit_accuracy" in res.metrics and "teacher_accuracy" in res.metrics
    tc = res.metrics["teacher_circuit"]  # the discovered circuit's faithfulness, also in its JSON
    assert tc["n_random"] == 10 and tc["split"] == "test" and tc["protocol"] == "strict"
    assert res.circuit.meta["evaluation"] is tc and tc["circuit_size"] == len(res.circuit.unique_heads())
    if tc["full_accuracy"] > 0:
        assert tc["faithfulness"] == pytest.approx(tc["circuit_accuracy"] / tc["full_accuracy"])
    from fastcd.card import model_card

    assert "faithfulness" in model_card(res, small_config(steps=2))


def test_bad_input(tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    kw = dict(student_tokenizer=tok, teacher_tokenizer=tok)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        distill(teacher, student, TASK, matching=given_matching(), config=small_config(lam=-1.0), **kw)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 2, got 1"):
        distill(teacher, student, TASK, matching=given_matching(), config=small_config(batch_size=1), **kw)
    with pytest.raises(ValueError, match="at least one pair"):
        distill(teacher, student, TASK, matching=Matching([], "x"), config=small_config(), **kw)
    with pytest.raises(ValueError, match="matching student head L5H0 is out of range"):
        distill(teacher, student, TASK, matching=given_matching(((Head(0, 0), Head(5, 0), "last"),)),
                config=small_config(), **kw)
    with pytest.raises(ValueError, match="vocabularies differ: vocab_size"):
        check_vocabularies(teacher, make_tiny("llama", vocab_size=len(tok) + 1))
    from fastcd.tokenizer import build_word_tokenizer

    other = build_word_tokenizer(["apple", "Box"])
    with pytest.raises(ValueError, match="teacher and student vocabularies differ"):
        check_vocabularies(teacher, student, tok, other)
    with pytest.raises(ValueError, match="method must be one of"):
        DistillConfig(method="lora").validate()
    with pytest.raises(TypeError, match="task_or_dataset must be"):
        distill(teacher, student, 42, matching=given_matching(), config=small_config(), **kw)


def test_eval_every_need_not_be_a_multiple_of_log_every(tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    res = distill(teacher, student, TASK, matching=given_matching(), config=small_config(steps=5, log_every=2,
                  eval_every=3),
                  student_tokenizer=tok, teacher_tokenizer=tok)
    assert [r["step"] for r in res.log] == [2, 3, 4, 5]
    assert "val_accuracy" in res.log[1] and res.log[1]["step"] == 3


def test_non_finite_loss_stops_without_saving(tmp_path, tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    with torch.no_grad():
        student.model.layers[1].self_attn.q_proj.weight[8:16] = float("nan")  # inside the matched head L1H1
    with pytest.raises(FloatingPointError, match=r"non-finite loss term 'ce' \(nan\) at step 1 .*without saving"):
        distill(teacher, student, TASK, matching=given_matching(), config=small_config(out=str(tmp_path / "run")),
                student_tokenizer=tok, teacher_tokenizer=tok)
    assert not (tmp_path / "run" / "student").exists()
    with pytest.raises(FloatingPointError, match="steps skipped, more than 10% of the run"):
        distill(teacher, student, TASK, matching=given_matching(), config=small_config(on_nonfinite="skip"),
                student_tokenizer=tok, teacher_tokenizer=tok)
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        DistillConfig(on_nonfinite="ignore").validate()


def test_saving_the_student_from_your_own_loop_keeps_the_trained_weights(tmp_path, tok):
    """README's own-loop pattern: student.save_pretrained() while the distiller's slices are attached writes plain
    keys with the current (trained) weights; transformers reloads them with identical logits."""
    from transformers import AutoModelForCausalLM

    from fastcd.distillation import make_batch

    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    cd = CircuitDistiller(student, given_matching(), teacher=teacher, config=small_config())
    opt = torch.optim.AdamW(cd.trainable_parameters(), lr=1e-2)
    enc = TASK.encode(TASK.generate(16, split="train"), tok)
    for _ in range(2):
        loss, _ = cd(make_batch(torch.arange(8), enc, enc, None))
        opt.zero_grad()
        loss.backward()
        opt.step()
    keys = student.state_dict().keys()
    assert not any("parametrizations" in k for k in keys)
    student.save_pretrained(tmp_path / "s")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s", local_files_only=True).eval()
    student.eval()
    ids = enc.input_ids[:2]
    sd = student.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k  # bit-identical weights, the trained slices included
    with torch.no_grad():  # (eager vs sdpa attention: equal to float rounding)
        torch.testing.assert_close(loaded(ids).logits, student(ids).logits, rtol=1e-5, atol=1e-5)
        fresh = make_tiny("llama", vocab_size=len(tok), seed=2)
        assert (loaded(ids).logits - fresh(ids).logits).abs().max() > 1e-3  # the trained weights, not the base


def test_every_seed_is_tested_on_the_same_prompts(tok):
    """The test set does not depend on the training seed: the untrained student's accuracy (measured on it before
    training) is identical across seeds, so methods and seeds compare paired on one set."""
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    base = []
    for seed in (0, 1, 2):
        student = make_tiny("llama", vocab_size=len(tok), seed=2)
        res = distill(teacher, student, TASK, matching=given_matching(), config=small_config(steps=1, seed=seed,
                      n_eval=40),
                      student_tokenizer=tok, teacher_tokenizer=tok)
        base.append(res.metrics["student_base_accuracy"])
    assert base[0] == base[1] == base[2]


def test_auto_lambda_is_recorded_by_distill(tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    res = distill(teacher, student, TASK, matching=given_matching(), config=small_config(steps=2, lam="auto"),
                  student_tokenizer=tok, teacher_tokenizer=tok)
    assert res.metrics["lam_effective"] > 0 and math.isfinite(res.metrics["lam_effective"])


def _wide(vocab, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128))


@pytest.mark.parametrize("width", ["wide", "toy"])
def test_mixed_precision_auto_is_bf16_on_the_cpu_for_real_widths_only(tok, width):
    """The default ``mixed_precision="auto"`` trains and evaluates a model at least 512 wide under bf16 autocast on
    the CPU (float32 master weights), and a toy-width one in float32."""
    wide = width == "wide"
    teacher = _wide(len(tok), 1) if wide else make_tiny("llama", vocab_size=len(tok), seed=1)
    student = _wide(len(tok), 2) if wide else make_tiny("llama", vocab_size=len(tok), seed=2)
    seen = set()
    student.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    pairs = [(Head(0, 1), Head(0, 2), "last")]
    res = distill(teacher, student, TASK, matching=given_matching(pairs),
                  config=small_config(steps=2, n_train=8, n_eval=8, lr=1e-3), student_tokenizer=tok,
                  teacher_tokenizer=tok)
    assert seen == ({torch.bfloat16} if wide else {torch.float32})
    assert all(p.dtype == torch.float32 for p in res.student.parameters())
    assert math.isfinite(res.log[-1]["loss"])


def test_the_teacher_runs_once_over_the_training_prompts_not_on_every_step(tok):
    """The cheap path: a frozen teacher's labels and matched z are computed once (in memory) and the teacher is
    released before training, so its forwards do not grow with the steps (KD, which needs its logits, keeps it)."""
    calls = {}
    for steps in (2, 6):
        teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
        n = {"forwards": 0}
        teacher.register_forward_hook(lambda *a, n=n: n.__setitem__("forwards", n["forwards"] + 1))
        distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=given_matching(),
                config=small_config(steps=steps, circuit_eval=False), student_tokenizer=tok, teacher_tokenizer=tok)
        calls[steps] = n["forwards"]
    assert calls[2] == calls[6] <= 3  # test-set accuracy and one pass over the 64 training prompts
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    n = {"forwards": 0}
    teacher.register_forward_hook(lambda *a: n.__setitem__("forwards", n["forwards"] + 1))
    distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=given_matching(),
            config=small_config(steps=6, method="kd", circuit_eval=False), student_tokenizer=tok, teacher_tokenizer=tok)
    assert n["forwards"] >= 6  # KD reads the teacher's logits on every step
