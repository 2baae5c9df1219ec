import json
import math

import pytest
import torch
from conftest import crash_after_first_save, make_tiny

from fastcd.artifacts import Matching, Pair
from fastcd.config import DistillConfig
from fastcd.distillation import CircuitDistiller, DistillBatch, check_vocabularies
from fastcd.models import Head
from fastcd.pipeline import distill
from fastcd.reference import cka_loss_ref
from fastcd.stats import mcnemar
from fastcd.tasks import EntityTracking
from fastcd.teacher_cache import build_teacher_cache
from fastcd.trainable import merge


@pytest.fixture(scope="module")
def tok():
    from fastcd.tokenizer import build_word_tokenizer

    return build_word_tokenizer()


TASK = EntityTracking(n_boxes=3)


DEFAULT_PAIRS = ((Head(1, 2), Head(1, 1), "last"), (Head(0, 3), Head(0, 2), "query_label"))


def _matching(pairs=DEFAULT_PAIRS):
    return Matching([Pair(t, s, r, "g", {}) for t, s, r in pairs], "given")


def _cfg(**kw):
    base = dict(steps=6, batch_size=8, n_train=64, n_eval=16, lr=1e-2, progress=False, log_every=1)
    base.update(kw)
    return DistillConfig(**base)


# --- the loss ------------------------------------------------------------------------------------------
def test_cka_loss_reference_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 8, generator=g, dtype=torch.float64)
    loss, cka = cka_loss_ref(x, x.clone(), eps=0.0)
    assert torch.allclose(cka, torch.ones(3, dtype=torch.float64)) and abs(float(loss)) < 1e-12
    y = torch.randn(3, 20, 5, generator=g, dtype=torch.float64)
    loss, cka = cka_loss_ref(x, y)
    assert float(loss) == pytest.approx(float((1 - cka).sum()))  # summed over pairs (Eq. 7)
    assert torch.all((cka > 0) & (cka < 1))
    x1 = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: cka_loss_ref(a, y)[0], (x1,))


def test_cka_loss_never_nan():
    x = torch.ones(2, 2, 4, requires_grad=True)  # constant activations, m = 2
    y = torch.randn(2, 2, 3)
    loss, cka = cka_loss_ref(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.all(cka == 0)
    with pytest.raises(ValueError, match="m >= 2"):
        cka_loss_ref(torch.randn(1, 1, 4), torch.randn(1, 1, 4))
    with pytest.raises(ValueError, match="share P and m"):
        cka_loss_ref(torch.randn(2, 5, 4), torch.randn(3, 5, 4))


def test_cka_loss_bf16_upcast():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 64, 16, generator=g), torch.randn(2, 64, 16, generator=g)
    ref = cka_loss_ref(x.double(), y.double())[0]
    low = cka_loss_ref(x.bfloat16(), y.bfloat16())[0]
    assert low.dtype == torch.float32 and abs(float(low) - float(ref)) < 2e-2


# --- trainable slices ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, kv", [("llama", "frozen"), ("llama", "trainable"), ("gemma3", "frozen"),
                                      ("gpt2", "frozen")])
def test_only_matched_slices_train(arch, kv, tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny(arch, vocab_size=len(tok), seed=2)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    m = _matching()
    res = distill(teacher, student, TASK, matching=m, config=_cfg(method="ce+cka", kv=kv, weight_decay=0.1),
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
    cd = CircuitDistiller(student, _matching(), teacher=teacher, config=_cfg())
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
    cd = CircuitDistiller(student, _matching(), teacher=teacher, config=_cfg(method="cka"))
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


def test_loss_decreases_and_student_loads_with_transformers(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    res = distill(teacher, student, TASK, matching=_matching(),
                  config=_cfg(steps=40, lr=3e-2, out=str(tmp_path / "run"), log_every=1),
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
    res = distill(teacher, student, TASK, matching=_matching(), config=_cfg(steps=2),
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


def test_offline_teacher_cache_matches_online(tmp_path, tok):
    cfg = _cfg(method="ce+cka", kd_weight=0.5)
    m = _matching()
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    online = distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=m, config=cfg,
                     student_tokenizer=tok, teacher_tokenizer=tok)
    train = TASK.encode(TASK.generate(cfg.n_train, seed=cfg.seed, split="train"), tok)
    build_teacher_cache(teacher, train, m, str(tmp_path / "cache"), shard_size=20, logits=True)
    assert len(list((tmp_path / "cache").glob("shard_*.safetensors"))) == 4
    offline = distill(None, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=m, config=cfg,
                      student_tokenizer=tok, teacher_cache=str(tmp_path / "cache"))
    a, b = online.student.state_dict(), offline.student.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert [r["loss"] for r in online.log] == pytest.approx([r["loss"] for r in offline.log], rel=1e-5)


@pytest.mark.parametrize("sched", [{}, {"lr_scheduler": "linear", "warmup_steps": 2, "max_grad_norm": 0.5}])
def test_resume_reaches_the_same_weights(tmp_path, tok, monkeypatch, sched):
    """A run killed after its first checkpoint and resumed ends bit-identical to a straight run (with a warmup +
    linear schedule and clipping too: the scheduler state is checkpointed)."""
    import fastcd.pipeline as D

    m = _matching()
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    straight = distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=m,
                       config=_cfg(steps=6, **sched), student_tokenizer=tok, teacher_tokenizer=tok)
    real = D.save_checkpoint
    calls = {"n": 0}

    def crash(*args):
        real(*args)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(D, "save_checkpoint", crash)
    cfg = _cfg(steps=6, save_every=3, out=str(tmp_path / "r"), **sched)
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


@pytest.mark.parametrize("method", ["full-ce", "circuit-ce", "cka", "ce+rand-cka", "kd"])
def test_every_method_runs(method, tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    res = distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=_matching(),
                  config=_cfg(method=method, steps=3), student_tokenizer=tok, teacher_tokenizer=tok)
    assert 0 <= res.metrics["student_accuracy"] <= 1
    if method in ("full-ce", "kd"):
        assert res.metrics["trainable_fraction"] == 1.0
    if method == "ce+rand-cka":
        assert res.matching.method == "random"
        assert [p.teacher for p in res.matching.pairs] == [Head(1, 2), Head(0, 3)]


def test_distill_discovers_and_matches_when_not_given(tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1, n_layers=3)
    res = distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK,
                  config=_cfg(steps=2, n_discovery=12, discovery="path", path_k=[2, 1, 1, 1]),
                  student_tokenizer=tok, teacher_tokenizer=tok)
    assert res.circuit is not None and len(res.matching) >= 1
    assert "student_circuit_accuracy" in res.metrics and "teacher_accuracy" in res.metrics
    tc = res.metrics["teacher_circuit"]  # the discovered circuit's faithfulness, also in its JSON
    assert tc["n_random"] == 10 and tc["split"] == "test" and tc["protocol"] == "strict"
    assert res.circuit.meta["evaluation"] is tc and tc["circuit_size"] == len(res.circuit.unique_heads())
    if tc["full_accuracy"] > 0:
        assert tc["faithfulness"] == pytest.approx(tc["circuit_accuracy"] / tc["full_accuracy"])
    from fastcd.card import model_card

    assert "faithfulness" in model_card(res, _cfg(steps=2))


def test_bad_input(tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    kw = dict(student_tokenizer=tok, teacher_tokenizer=tok)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        distill(teacher, student, TASK, matching=_matching(), config=_cfg(lam=-1.0), **kw)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 2, got 1"):
        distill(teacher, student, TASK, matching=_matching(), config=_cfg(batch_size=1), **kw)
    with pytest.raises(ValueError, match="at least one pair"):
        distill(teacher, student, TASK, matching=Matching([], "x"), config=_cfg(), **kw)
    with pytest.raises(ValueError, match="matching student head L5H0 is out of range"):
        distill(teacher, student, TASK, matching=_matching(((Head(0, 0), Head(5, 0), "last"),)), config=_cfg(), **kw)
    with pytest.raises(ValueError, match="vocabularies differ: vocab_size"):
        check_vocabularies(teacher, make_tiny("llama", vocab_size=len(tok) + 1))
    from fastcd.tokenizer import build_word_tokenizer

    other = build_word_tokenizer(["apple", "Box"])
    with pytest.raises(ValueError, match="teacher and student vocabularies differ"):
        check_vocabularies(teacher, student, tok, other)
    with pytest.raises(ValueError, match="method must be one of"):
        DistillConfig(method="lora").validate()
    with pytest.raises(TypeError, match="task_or_dataset must be"):
        distill(teacher, student, 42, matching=_matching(), config=_cfg(), **kw)


@pytest.mark.parametrize("field, value, message", [
    ("log_every", 0, r"log_every must be an integer >= 1, got 0"),
    ("lam", float("nan"), r"lam must be a finite number, got nan"),
    ("steps", 2.5, r"steps must be an integer >= 1, got 2.5"),
    ("lr", float("inf"), r"lr must be a finite number, got inf"),
    ("save_every", -1, r"save_every must be an integer >= 0, got -1"),
    ("eval_every", -5, r"eval_every must be an integer >= 0, got -5"),
    ("n_discovery", 1, r"n_discovery must be an integer >= 2, got 1"),
    ("eps", 0.0, r"eps must be > 0"),
    ("batch_size", 2, r"batch_size must be >= 3 for 'ce\+cka'.*CKA is identically 1"),
])
def test_config_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**{field: value}).validate()
    assert DistillConfig(method="circuit-ce", batch_size=2).validate()  # no CKA term: m=2 is fine


def test_eval_every_need_not_be_a_multiple_of_log_every(tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    res = distill(teacher, student, TASK, matching=_matching(), config=_cfg(steps=5, log_every=2, eval_every=3),
                  student_tokenizer=tok, teacher_tokenizer=tok)
    assert [r["step"] for r in res.log] == [2, 3, 4, 5]
    assert "val_accuracy" in res.log[1] and res.log[1]["step"] == 3


def test_rand_cka_and_kd_train_from_a_teacher_cache(tmp_path, tok):
    """The cache holds the teacher side only: the random-pairing control (other student heads, same teacher
    heads) and KD (logits) both train from it."""
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    cfg = _cfg(steps=2, n_train=32)
    enc = TASK.encode(TASK.generate(cfg.n_train, seed=cfg.seed, split="train"), tok)
    path = build_teacher_cache(teacher, enc, _matching(), str(tmp_path / "c"), logits=True)
    for method in ("ce+rand-cka", "kd"):
        res = distill(None, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=_matching(),
                      config=_cfg(steps=2, n_train=32, method=method), student_tokenizer=tok, teacher_cache=path)
        assert len(res.log) == 2 and all(math.isfinite(r["loss"]) for r in res.log)


def test_mcnemar():
    a = [True] * 30 + [False] * 10
    b = [True] * 20 + [False] * 20
    r = mcnemar(a, b)
    assert (r["a_only"], r["b_only"], r["n"]) == (10, 0, len(a)) and r["p_value"] < 0.01
    assert mcnemar(a, a)["p_value"] == 1.0
    with pytest.raises(ValueError, match="one length"):
        mcnemar([True], [True, False])


def test_random_control_keeps_the_matching_shape(tok):
    from fastcd.match import match_random

    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    m = _matching(((Head(1, 2), Head(1, 1), "last"), (Head(1, 0), Head(1, 1), "last"),
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


def test_tom_default_discovery_keeps_the_most_harmful_share_at_the_last_token(tok):
    """One default policy (distill and `fastcd discover` share it): ToM = mean-ablation patching at the last token,
    keeping the most harmful 15% of the heads (those whose patch lowers p(answer))."""
    from fastcd import discover as D
    from fastcd.discover_policy import default_circuit
    from fastcd.tasks import TheoryOfMind

    task = TheoryOfMind()
    model = make_tiny("llama", vocab_size=len(tok))
    pairs = task.pairs(16, seed=0, split="val")
    clean, corrupt = task.encode([p.clean for p in pairs], tok), task.encode([p.corrupt for p in pairs], tok)
    circuit, panels, marked = default_circuit(model, task, clean, corrupt)
    src = D.make_source(model, clean, "mean", corrupt=corrupt)
    res = D.patch_heads_batched(model, clean, src, metric="prob", position="last")
    scores, k = res.scores, max(1, round(D.CIRCUIT_SHARE * res.scores.numel()))
    want = [h for h, _ in res.top(k, strict=True)]
    assert [c.head for c in circuit.heads] == want and len(want) <= k
    assert list(marked.values())[0] == want and torch.equal(list(panels.values())[0], scores)
    assert all(c.position == "last" for c in circuit.heads)
    assert all(float(scores[c.head.layer, c.head.head]) < 0 for c in circuit.heads)


def test_non_finite_loss_stops_without_saving(tmp_path, tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    with torch.no_grad():
        student.model.layers[1].self_attn.q_proj.weight[8:16] = float("nan")  # inside the matched head L1H1
    with pytest.raises(FloatingPointError, match=r"non-finite loss term 'ce' \(nan\) at step 1 .*without saving"):
        distill(teacher, student, TASK, matching=_matching(), config=_cfg(out=str(tmp_path / "run")),
                student_tokenizer=tok, teacher_tokenizer=tok)
    assert not (tmp_path / "run" / "student").exists()
    with pytest.raises(FloatingPointError, match="steps skipped, more than 10% of the run"):
        distill(teacher, student, TASK, matching=_matching(), config=_cfg(on_nonfinite="skip"),
                student_tokenizer=tok, teacher_tokenizer=tok)
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        DistillConfig(on_nonfinite="ignore").validate()


def test_second_distiller_on_one_student_is_a_clear_error(tok):
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    CircuitDistiller(student, _matching(), config=_cfg())
    with pytest.raises(ValueError, match="already parametrised.*merge"):
        CircuitDistiller(student, _matching(), config=_cfg())


def test_saving_the_student_from_your_own_loop_keeps_the_trained_weights(tmp_path, tok):
    """README's own-loop pattern: student.save_pretrained() while the distiller's slices are attached writes plain
    keys with the current (trained) weights; transformers reloads them with identical logits."""
    from transformers import AutoModelForCausalLM

    from fastcd.distillation import make_batch

    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    cd = CircuitDistiller(student, _matching(), teacher=teacher, config=_cfg())
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


def test_teacher_cache_vocabulary_is_checked(tmp_path, tok):
    """Labels in a cache are teacher token ids: another student vocabulary fails in one line, before training."""
    from fastcd.tokenizer import build_word_tokenizer

    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    cfg = _cfg(steps=2, n_train=32)
    enc = TASK.encode(TASK.generate(cfg.n_train, seed=cfg.seed, split="train"), tok)
    other = build_word_tokenizer(["apple", "Box"])  # recorded as the teacher's: its ids mean other tokens
    wrong = build_teacher_cache(teacher, enc, _matching(), str(tmp_path / "w"), tokenizer=other)
    with pytest.raises(ValueError, match="built with a tokenizer whose vocabulary differs from the student's"):
        distill(None, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=_matching(), config=cfg,
                student_tokenizer=tok, teacher_cache=wrong)
    path = build_teacher_cache(teacher, enc, _matching(), str(tmp_path / "c"), tokenizer=tok)
    from fastcd.teacher_cache import check_cache_vocabulary

    small = make_tiny("llama", vocab_size=20, seed=2)  # same tokenizer, too small an embedding
    with pytest.raises(ValueError, match=r"student_tokenizer has token ids up to \d+, the student's embedding has 20"):
        distill(None, small, TASK, matching=_matching(), config=cfg, student_tokenizer=tok, teacher_cache=path)
    with pytest.raises(ValueError, match=r"holds label id \d+, outside the student's vocabulary of 1"):
        check_cache_vocabulary(path, tok, vocab_size=1)
    check_cache_vocabulary(path, tok, vocab_size=len(tok))


def test_every_seed_is_tested_on_the_same_prompts(tok):
    """The test set does not depend on the training seed: the untrained student's accuracy (measured on it before
    training) is identical across seeds, so methods and seeds compare paired on one set."""
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    base = []
    for seed in (0, 1, 2):
        student = make_tiny("llama", vocab_size=len(tok), seed=2)
        res = distill(teacher, student, TASK, matching=_matching(), config=_cfg(steps=1, seed=seed, n_eval=40),
                      student_tokenizer=tok, teacher_tokenizer=tok)
        base.append(res.metrics["student_base_accuracy"])
    assert base[0] == base[1] == base[2]


def test_gradient_ratio_and_auto_lambda(tok):
    from fastcd.distillation import make_batch

    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    cd = CircuitDistiller(student, _matching(), teacher=teacher, config=_cfg(lam="auto", lam_ratio=0.5))
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


def test_auto_lambda_is_recorded_by_distill(tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    res = distill(teacher, student, TASK, matching=_matching(), config=_cfg(steps=2, lam="auto"),
                  student_tokenizer=tok, teacher_tokenizer=tok)
    assert res.metrics["lam_effective"] > 0 and math.isfinite(res.metrics["lam_effective"])


def _crash_after_first_save(monkeypatch):
    crash_after_first_save(monkeypatch)


def test_resume_refuses_another_run_by_name(tmp_path, tok, monkeypatch):
    """A checkpoint resumes only the run that wrote it: another student, task, matching or lr is named."""
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    out = str(tmp_path / "r")
    cfg = _cfg(steps=6, save_every=2, out=out)
    _crash_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=_matching(), config=cfg,
                student_tokenizer=tok, teacher_tokenizer=tok)
    other_student = make_tiny("llama", vocab_size=len(tok), seed=3)
    with pytest.raises(ValueError, match=r"differs in \['student'\]"):
        distill(teacher, other_student, TASK, matching=_matching(), config=cfg, student_tokenizer=tok,
                teacher_tokenizer=tok)
    with pytest.raises(ValueError, match=r"differs in \['data', 'task'\] \(training prompts differ: 64 of 64 changed"):
        distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), EntityTracking(n_boxes=4),
                matching=_matching(), config=cfg, student_tokenizer=tok, teacher_tokenizer=tok)
    with pytest.raises(ValueError, match=r"differs in \['matching'\]"):
        distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK,
                matching=_matching(((Head(1, 2), Head(1, 3), "last"),)), config=cfg, student_tokenizer=tok,
                teacher_tokenizer=tok)
    with pytest.raises(ValueError, match=r"differs in \['lr'\] \(lr: 0.01 there, 0.02 now\)"):
        distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=_matching(),
                config=_cfg(steps=6, save_every=2, out=out, lr=2e-2), student_tokenizer=tok, teacher_tokenizer=tok)
    # the same run under another spelling of its directory, and with more steps: resumes
    res = distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=_matching(),
                  config=_cfg(steps=8, save_every=2, out=out + "/../r"), student_tokenizer=tok,
                  teacher_tokenizer=tok)
    assert res.log[-1]["step"] == 8
    with pytest.raises(ValueError, match="is at step 8, past steps=4"):
        distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=_matching(),
                config=_cfg(steps=4, save_every=2, out=out), student_tokenizer=tok, teacher_tokenizer=tok)
    # overwrite starts over
    res = distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=3), TASK, matching=_matching(),
                  config=_cfg(steps=2, save_every=2, out=out, overwrite=True), student_tokenizer=tok,
                  teacher_tokenizer=tok)
    assert [r["step"] for r in res.log] == [1, 2]


def test_corrupt_checkpoint_and_out_file_are_one_line_errors(tmp_path, tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    out = tmp_path / "r"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=_matching(),
                config=_cfg(save_every=2, out=str(out)), student_tokenizer=tok, teacher_tokenizer=tok)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=_matching(),
                config=_cfg(out=str(f)), student_tokenizer=tok, teacher_tokenizer=tok)


def test_resume_with_dropout_is_bit_identical(tmp_path, tok, monkeypatch):
    """The global RNG (dropout) is checkpointed: a killed and resumed run equals a straight one."""
    def student():
        m = make_tiny("llama", vocab_size=len(tok), seed=2)
        m.config.attention_dropout = 0.3
        for layer in m.model.layers:
            layer.self_attn.attention_dropout = 0.3
        return m

    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    straight = distill(teacher, student(), TASK, matching=_matching(), config=_cfg(steps=4), student_tokenizer=tok,
                       teacher_tokenizer=tok)
    cfg = _cfg(steps=4, save_every=2, out=str(tmp_path / "d"))
    _crash_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, student(), TASK, matching=_matching(), config=cfg, student_tokenizer=tok,
                teacher_tokenizer=tok)
    torch.manual_seed(12345)  # whatever ran in between
    torch.rand(7)
    resumed = distill(teacher, student(), TASK, matching=_matching(), config=cfg, student_tokenizer=tok,
                      teacher_tokenizer=tok)
    for k, v in straight.student.state_dict().items():
        assert torch.equal(v, resumed.student.state_dict()[k]), k


def test_resume_flag_needs_a_checkpoint_and_manifest_is_written(tmp_path, tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    out = tmp_path / "r"
    with pytest.raises(ValueError, match="resume: there is no checkpoint to resume"):
        distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=_matching(),
                config=_cfg(steps=2, save_every=1, out=str(out), resume=True), student_tokenizer=tok,
                teacher_tokenizer=tok)
    distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=_matching(),
            config=_cfg(steps=2, save_every=1, out=str(out)), student_tokenizer=tok, teacher_tokenizer=tok)
    man = json.loads((out / "manifest.json").read_text())
    assert man["step"] == 2 and man["identity"]["config"]["lr"] == 0.01 and man["identity"]["matching"]
    res = distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=_matching(),
                  config=_cfg(steps=3, save_every=1, out=str(out), resume=True), student_tokenizer=tok,
                  teacher_tokenizer=tok)
    assert res.log[-1]["step"] == 3


def test_small_cka_batch_warns_with_the_biased_estimator(tok):
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    with pytest.warns(UserWarning, match=r"CKA batch m=8 with d_head=\d+: two unrelated heads already score"):
        cd = CircuitDistiller(student, _matching(), config=_cfg(method="ce+cka", batch_size=8))
    from fastcd.trainable import merge

    merge(cd.slices)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cd = CircuitDistiller(student, _matching(), config=_cfg(method="ce+cka", batch_size=8,
                                                                cka_estimator="unbiased"))
    merge(cd.slices)


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
    res = distill(teacher, student, TASK, matching=_matching(pairs),
                  config=_cfg(steps=2, n_train=8, n_eval=8, lr=1e-3), student_tokenizer=tok, teacher_tokenizer=tok)
    assert seen == ({torch.bfloat16} if wide else {torch.float32})
    assert all(p.dtype == torch.float32 for p in res.student.parameters())
    assert math.isfinite(res.log[-1]["loss"])


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
        cfg = _cfg(steps=4, lr=1e-5, batch_size=8, n_train=8)
        cd = CircuitDistiller(student, _matching(), teacher=teacher, config=cfg)
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


def test_the_teacher_runs_once_over_the_training_prompts_not_on_every_step(tok):
    """The cheap path: a frozen teacher's labels and matched z are computed once (in memory) and the teacher is
    released before training, so its forwards do not grow with the steps (KD, which needs its logits, keeps it)."""
    calls = {}
    for steps in (2, 6):
        teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
        n = {"forwards": 0}
        teacher.register_forward_hook(lambda *a, n=n: n.__setitem__("forwards", n["forwards"] + 1))
        distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=_matching(),
                config=_cfg(steps=steps, circuit_eval=False), student_tokenizer=tok, teacher_tokenizer=tok)
        calls[steps] = n["forwards"]
    assert calls[2] == calls[6] <= 3  # test-set accuracy and one pass over the 64 training prompts
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    n = {"forwards": 0}
    teacher.register_forward_hook(lambda *a: n.__setitem__("forwards", n["forwards"] + 1))
    distill(teacher, make_tiny("llama", vocab_size=len(tok), seed=2), TASK, matching=_matching(),
            config=_cfg(steps=6, method="kd", circuit_eval=False), student_tokenizer=tok, teacher_tokenizer=tok)
    assert n["forwards"] >= 6  # KD reads the teacher's logits on every step
