"""fastcd.distillation.CircuitDistiller: only the matched heads' slices train, the KV policy, the controls, the
gradient ratio and lambda=auto, the float32 master slices."""

import pytest
import torch
from conftest import make_tiny
from distill_helpers import TASK, given_matching, small_config

from fastcd.config import DistillConfig
from fastcd.distillation import CircuitDistiller, DistillBatch
from fastcd.models import Head
from fastcd.pipeline import distill
from fastcd.trainable import merge


# --- trainable slices ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, kv", [("llama", "frozen"), ("llama", "trainable"), ("gemma3", "frozen"),
                                      ("gpt2", "frozen")])
def test_only_matched_slices_train(arch, kv, tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny(arch, vocab_size=len(tok), seed=2)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    m = given_matching()
    res = distill(teacher, student, TASK, matching=m, config=small_config(method="ce+cka", kv=kv, weight_decay=0.1),
                  student_tokenizer=tok, teacher_tokenizer=tok)
    after = res.student.state_dict()
    assert set(after) == set(before)  # parametrisations removed: plain keys again
    changed = {k: (before[k] != after[k]) for k in before}
    d = 8
    allowed = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in before.items()}
    for s in (Head(1, 1), Head(0, 2)):
        if arch == "gpt2":
            a = f"transformer.h.{s.layer}.attn."
            allowed[a + "c_attn.weight"][:, s.head * d : (s.head + 1) * d] = True
            allowed[a + "c_attn.bias"][s.head * d : (s.head + 1) * d] = True
            allowed[a + "c_proj.weight"][s.head * d : (s.head + 1) * d] = True
        else:
            a = f"model.layers.{s.layer}.self_attn."
            allowed[a + "q_proj.weight"][s.head * d : (s.head + 1) * d] = True
            allowed[a + "o_proj.weight"][:, s.head * d : (s.head + 1) * d] = True
            if kv == "trainable":
                g = s.head // 2
                allowed[a + "k_proj.weight"][g * d : (g + 1) * d] = True
                allowed[a + "v_proj.weight"][g * d : (g + 1) * d] = True
    for k in before:
        assert not (changed[k] & ~allowed[k]).any(), f"frozen elements of {k} changed"
    for s in (Head(1, 1), Head(0, 2)):
        key = f"model.layers.{s.layer}.self_attn.q_proj.weight" if arch != "gpt2" else \
            f"transformer.h.{s.layer}.attn.c_attn.weight"
        assert changed[key].any(), f"{key}: the trained slice did not change"
    if kv == "trainable":
        assert changed["model.layers.1.self_attn.k_proj.weight"].any()
    assert res.metrics["trainable_fraction"] < 0.2


def test_optimizer_state_only_for_slices(tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    cd = CircuitDistiller(student, given_matching(), teacher=teacher, config=small_config())
    opt = torch.optim.AdamW(cd.trainable_parameters(), lr=1e-3, weight_decay=0.1)
    enc = TASK.encode(TASK.generate(8), tok)
    batch = DistillBatch(enc.input_ids, enc.positions, enc.answer_ids, enc.input_ids, enc.positions)
    loss, parts = cd(batch)
    loss.backward()
    opt.step()
    slice_bytes = sum(p.numel() * p.element_size() for p in cd.trainable_parameters())
    state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                      if torch.is_tensor(v) and v.dim() > 0)
    assert state_bytes <= 2 * slice_bytes
    assert slice_bytes == 4 * (2 * 8 * 32 * 2)  # 2 heads x (q rows + o cols) x d_head x d_model, fp32
    assert {"ce", "cka_loss", "mean_cka", "loss"} <= set(parts)


def test_cka_term_alone_trains_the_matched_heads(tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    cd = CircuitDistiller(student, given_matching(), teacher=teacher, config=small_config(method="cka"))
    enc = TASK.encode(TASK.generate(16), tok)
    batch = DistillBatch(enc.input_ids, enc.positions, enc.answer_ids, enc.input_ids, enc.positions)
    loss, parts = cd(batch)
    assert "ce" not in parts
    loss.backward()
    # the q rows of both matched heads get gradient from the CKA term (the capture keeps the graph); the
    # o columns of L1H1 cannot (o_proj sits after the captured z and no later pair reads its output)
    q_params = [mod.parametrizations["weight"][0].params[0] for mod, _ in cd.slices.modules
                if mod is student.model.layers[0].self_attn.q_proj or mod is student.model.layers[1].self_attn.q_proj]
    assert len(q_params) == 2
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in q_params)
    o0 = student.model.layers[0].self_attn.o_proj.parametrizations["weight"][0].params[0]
    assert o0.grad is not None and float(o0.grad.abs().sum()) > 0  # reaches L1H1's z through the residual


def test_random_control_keeps_the_matching_shape(tok):
    from fastcd.match import match_random

    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    m = given_matching(((Head(1, 2), Head(1, 1), "last"), (Head(1, 0), Head(1, 1), "last"),
                   (Head(0, 3), Head(0, 2), "box_label")))
    r = match_random(m, student, seed=3)
    assert r.method == "random" and len(r) == len(m)
    assert [(p.teacher, p.position) for p in r.pairs] == [(p.teacher, p.position) for p in m.pairs]
    assert len(r.student_heads()) == len(m.student_heads()) == 2
    assert r.pairs[0].student == r.pairs[1].student  # a shared student head stays shared
    assert match_random(m, student, seed=3).to_json() == r.to_json()


def test_kv_auto_policy(tok):
    from fastcd.trainable import make_trainable

    gqa = make_tiny("llama", vocab_size=len(tok))  # 4 query heads, 2 KV heads
    ts = make_trainable(gqa, [Head(0, 1)])
    assert ts.n_trainable == 2 * 8 * 32  # q rows + o columns only: the KV group is shared
    from transformers import LlamaConfig, LlamaForCausalLM

    mha = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=4))
    ts = make_trainable(mha, [Head(0, 1)])
    assert ts.n_trainable == 4 * 8 * 32  # q, k, v rows and o columns: the k/v slices are the head's own
    with pytest.raises(ValueError, match="kv must be one of"):
        make_trainable(mha, [Head(0, 1)], kv="shared")


def test_second_distiller_on_one_student_is_a_clear_error(tok):
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    CircuitDistiller(student, given_matching(), config=small_config())
    with pytest.raises(ValueError, match="already parametrised.*merge"):
        CircuitDistiller(student, given_matching(), config=small_config())


def test_gradient_ratio_and_auto_lambda(tok):
    from fastcd.distillation import make_batch

    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    cd = CircuitDistiller(student, given_matching(), teacher=teacher, config=small_config(lam="auto", lam_ratio=0.5))
    enc = TASK.encode(TASK.generate(32, seed=0, split="train"), tok)
    batches = [make_batch(torch.arange(i, i + 8), enc, enc, None) for i in (0, 8, 16)]
    r = [cd.gradient_ratio(b) for b in batches]
    assert all(x["grad_ce"] > 0 and x["grad_align"] > 0 and -1 <= x["cosine"] <= 1 for x in r)
    assert all(p.grad is None for p in cd.trainable_parameters())  # measuring leaves no gradient behind
    lam = cd.calibrate_lambda(batches)
    assert lam == pytest.approx(0.5 / (sum(x["ratio"] for x in r) / 3), rel=1e-5)
    # the gradient of lam * align over that of CE is the chosen ratio, on average over the calibration batches
    assert sum(lam * x["ratio"] for x in r) / 3 == pytest.approx(0.5, rel=1e-5)
    with pytest.raises(ValueError, match="lam=\"auto\" balances"):
        DistillConfig(method="cka", lam="auto").validate()
    with pytest.raises(ValueError, match="lam_ratio must be > 0"):
        DistillConfig(lam="auto", lam_ratio=0).validate()


def test_small_cka_batch_warns_with_the_biased_estimator(tok):
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    with pytest.warns(UserWarning, match=r"CKA batch m=8 with d_head=\d+: two unrelated heads already score up to"):
        cd = CircuitDistiller(student, given_matching(), config=small_config(method="ce+cka", batch_size=8))
    from fastcd.trainable import merge

    merge(cd.slices)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cd = CircuitDistiller(student, given_matching(), config=small_config(method="ce+cka", batch_size=8,
                                                                cka_estimator="unbiased"))
    merge(cd.slices)


def test_a_bf16_student_trains_float32_master_slices(tok):
    """The slices of a bf16 student are float32 master copies: Adam updates of 1e-5 (below bf16's resolution at the
    weights' scale, so a bf16 parameter would not move) accumulate, and the trajectory follows the float32
    student's from the same starting values (its forward in bf16 changes the gradients a little)."""
    from fastcd.training import train_loop

    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
        student = make_tiny("llama", vocab_size=len(tok), seed=2)
        with torch.no_grad():  # one starting point: the bf16-rounded weights, in either dtype
            for p in student.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        student = student.to(dtype)
        cfg = small_config(steps=4, lr=1e-5, batch_size=8, n_train=8)
        cd = CircuitDistiller(student, given_matching(), teacher=teacher, config=cfg)
        assert all(p.dtype == torch.float32 for p in cd.trainable_parameters())
        start = [p.detach().clone() for p in cd.trainable_parameters()]
        enc = TASK.encode(TASK.generate(8, seed=0), tok)
        train_loop(cd, torch.optim.Adam(cd.trainable_parameters(), lr=1e-5), 0, cfg, enc, enc)
        runs[dtype] = torch.cat([(p.detach() - s).flatten() for p, s in zip(cd.trainable_parameters(), start)])
        merge(cd.slices)
        assert all(p.dtype == dtype for p in student.parameters())  # merged back in the student's own dtype
    d32, d16 = runs[torch.float32], runs[torch.bfloat16]
    assert 0.5 < float(d16.norm() / d32.norm()) < 2.0  # the bf16 student's slices moved as far
    assert float(torch.nn.functional.cosine_similarity(d16, d32, dim=0)) > 0.8
