"""The training loop's features: LR schedule with warmup, gradient clipping, autocast, validation-based early
stopping, log.jsonl streamed during training, TensorBoard, and the model card beside the saved student."""

import json
import math
import os

import pytest
import torch
from conftest import make_tiny

from fastcd.artifacts import Matching, Pair
from fastcd.config import DistillConfig
from fastcd.distillation import CircuitDistiller
from fastcd.models import Head
from fastcd.pipeline import distill
from fastcd.tasks import EntityTracking
from fastcd.training import make_optimizer, train_loop

TASK = EntityTracking(n_boxes=3)


@pytest.fixture(scope="module")
def tok():
    from fastcd.tokenizer import build_word_tokenizer

    return build_word_tokenizer()


def _matching():
    return Matching([Pair(Head(1, 2), Head(1, 1), "last", "g", {}), Pair(Head(0, 3), Head(0, 2), "query_label", "g",
                                                                        {})], "given")


def _run(tok, **kw):
    base = dict(steps=6, batch_size=8, n_train=64, n_eval=16, lr=1e-2, progress=False, log_every=1)
    base.update(kw)
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    return distill(teacher, student, TASK, matching=_matching(), config=DistillConfig(**base),
                   student_tokenizer=tok, teacher_tokenizer=tok)


@pytest.mark.parametrize("name", ["linear", "cosine", "constant"])
def test_lr_schedule_with_warmup_is_transformers_schedule(tok, name):
    from transformers import get_scheduler

    res = _run(tok, lr_scheduler=name, warmup_steps=2, steps=6)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1e-2)
    sched = get_scheduler("constant_with_warmup" if name == "constant" else name, opt, num_warmup_steps=2,
                          num_training_steps=6)
    want = []
    for _ in range(6):  # the row of step k holds the lr after k scheduler steps (the next step's lr)
        opt.step()
        sched.step()
        want.append(opt.param_groups[0]["lr"])
    assert [r["lr"] for r in res.log] == pytest.approx(want)
    assert want[0] == pytest.approx(0.5e-2) and want[1] == pytest.approx(1e-2)  # warmup: 1/2, then the peak
    assert name == "constant" or want[-1] < 1e-2


def test_warmup_ratio_and_validation(tok):
    from fastcd.training import warmup_steps

    assert warmup_steps(DistillConfig(steps=10, warmup_ratio=0.25)) == 3
    assert warmup_steps(DistillConfig(steps=10, warmup_ratio=0.25, warmup_steps=1)) == 1
    for field, value, msg in (("warmup_ratio", 1.0, "warmup_ratio must be < 1"),
                              ("lr_scheduler", "step", "lr_scheduler must be one of"),
                              ("max_grad_norm", -1.0, "max_grad_norm must be >= 0"),
                              ("early_stopping_patience", 2, "early_stopping_patience needs eval_every"),
                              ("mixed_precision", "fp16", "mixed_precision='fp16' needs a CUDA device")):
        with pytest.raises(ValueError, match=msg):
            DistillConfig(**{field: value}).validate()


def test_a_config_is_validated_once_where_it_is_built_and_again_only_after_a_change(tok, monkeypatch):
    with pytest.raises(ValueError, match="lr must be > 0"):  # at construction, before any model is touched
        DistillConfig(lr=-1.0)
    calls = []
    real = DistillConfig.validate
    monkeypatch.setattr(DistillConfig, "validate", lambda self: calls.append(1) or real(self))
    cfg = DistillConfig(method="ce+cka", steps=1, batch_size=8, n_train=16, progress=False)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    CircuitDistiller(student, _matching(), config=cfg)
    assert len(calls) == 1  # built once, not re-checked by the distiller
    cfg.lr = -1.0  # changed in place: checked again where it is used
    with pytest.raises(ValueError, match="lr must be > 0"):
        CircuitDistiller(student, _matching(), config=cfg)
    assert len(calls) == 2


def test_gradient_clipping_bounds_the_update(tok):
    """With SGD at lr 1 the update is the clipped gradient: its norm is max_grad_norm when the raw one is above."""
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    cfg = DistillConfig(method="ce+cka", steps=1, batch_size=8, n_train=16, max_grad_norm=1e-3, progress=False,
                        log_every=1).validate()
    cd = CircuitDistiller(student, _matching(), teacher=teacher, config=cfg)
    enc = TASK.encode(TASK.generate(16, seed=0), tok)
    before = [p.detach().clone() for p in cd.trainable_parameters()]
    opt = torch.optim.SGD(cd.trainable_parameters(), lr=1.0)
    log = train_loop(cd, opt, 0, cfg, enc, enc)
    delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(cd.trainable_parameters(), before)])
    assert log[0]["grad_norm"] > 1e-3  # the raw norm, above the threshold
    assert float(delta.norm()) == pytest.approx(1e-3, rel=1e-4)


def test_bf16_autocast_trains_on_cpu(tok):
    res = _run(tok, mixed_precision="bf16", steps=3)
    assert all(math.isfinite(r["loss"]) for r in res.log)
    assert 0 <= res.metrics["student_accuracy"] <= 1


def test_early_stopping_on_validation_accuracy(tok):
    res = _run(tok, lr=1e-12, eval_every=1, early_stopping_patience=2, steps=20)  # nothing improves
    assert res.metrics["stopped_early"] == 3 and res.metrics["steps_done"] == 3
    assert [r["step"] for r in res.log] == [1, 2, 3] and all("val_accuracy" in r for r in res.log)
    assert all(math.isfinite(r["val_ce"]) and r["val_ce"] > 0 for r in res.log)


def test_accuracy_and_ce_is_one_forward_of_the_two_metrics(tok):
    from fastcd.metrics import accuracy_and_ce, accuracy_per_example, clean_metric

    model = make_tiny("llama", vocab_size=len(tok), seed=3)
    task = EntityTracking(n_boxes=3)
    enc = task.encode(task.generate(20, seed=5), tok)
    correct, ce = accuracy_and_ce(model, enc, batch_size=7)  # uneven chunks
    assert correct == accuracy_per_example(model, enc)
    logprob, _ = clean_metric(model, enc, "logprob", None, 20)
    assert ce == pytest.approx(float(-logprob.mean()), rel=1e-5)


def test_log_jsonl_is_streamed_during_training(tmp_path, tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    out = tmp_path / "run"
    cfg = DistillConfig(steps=4, batch_size=8, n_train=32, progress=False, log_every=2, out=str(out)).validate()
    cd = CircuitDistiller(student, _matching(), teacher=teacher, config=cfg)
    enc = TASK.encode(TASK.generate(32, seed=0), tok)
    opt, sched = make_optimizer(cd, cfg)
    seen = []

    def on_step(step, log):  # what a reader of log.jsonl sees while the run goes on
        with open(out / "log.jsonl") as f:
            seen.append((step, [json.loads(line)["step"] for line in f]))

    log = train_loop(cd, opt, 0, cfg, enc, enc, on_step=on_step, scheduler=sched)
    assert seen == [(1, []), (2, [2]), (3, [2]), (4, [2, 4])]
    assert [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()] == log


def test_tensorboard_logging(tmp_path, tok):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (pip install tensorboard)")
    _run(tok, steps=2, out=str(tmp_path / "run"), report_to="tensorboard")
    events = [f for f in os.listdir(tmp_path / "run" / "tensorboard") if f.startswith("events.out.tfevents")]
    assert events and os.path.getsize(tmp_path / "run" / "tensorboard" / events[0]) > 0


def test_model_card_beside_the_saved_student(tmp_path, tok):
    res = _run(tok, steps=2, out=str(tmp_path / "run"))
    card = (tmp_path / "run" / "student" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    for needle in ("method `ce+cka`", "entity-tracking", "L1H2", "L1H1", f"{res.metrics['student_accuracy']:.3f}",
                   "Trainable:", "2 of 2 steps", "Command:"):
        assert needle in card, needle


def test_teacher_cache_reads_rows_lazily_across_shards(tmp_path, tok):
    """Shards of 5 rows, any row order: the lazily read rows equal the in-memory teacher signals."""
    from fastcd.teacher_cache import MemoryCache, TeacherCache, build_teacher_cache, teacher_signals

    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    enc = TASK.encode(TASK.generate(23, seed=0), tok)
    build_teacher_cache(teacher, enc, _matching(), str(tmp_path / "c"), shard_size=5, logits=True)
    lazy, mem = TeacherCache(str(tmp_path / "c"), _matching()), MemoryCache(teacher_signals(teacher, enc, _matching(),
                                                                                             logits=True))
    assert len(lazy.index["shards"]) == 5 and len(lazy) == len(mem) == 23
    idx = torch.tensor([22, 0, 7, 6, 13, 0, 19, 4])
    for a, b in zip(lazy.get(idx), mem.get(idx)):
        assert torch.equal(a, b)
    with pytest.raises(IndexError, match="holds rows 0..22"):
        lazy.get(torch.tensor([23]))


def test_batches_hold_no_duplicate_prompt_and_epochs_cover_the_prompts():
    from fastcd.training import batch_rows

    n, bs = 10, 4
    rows = [batch_rows(n, bs, step, seed=3) for step in range(12)]  # 6 epochs of 2 batches (drop-last)
    assert all(len(set(r.tolist())) == bs for r in rows)
    for e in range(6):
        epoch = torch.cat(rows[2 * e:2 * e + 2]).tolist()
        assert len(set(epoch)) == 8  # no prompt twice within an epoch
    assert set(torch.cat(rows).tolist()) == set(range(n))  # the left-out rows change from epoch to epoch
    assert torch.equal(batch_rows(n, bs, 7, seed=3), rows[7])  # a resumed run draws the same batch
    assert not torch.equal(batch_rows(n, bs, 0, seed=4), rows[0])
    with pytest.raises(ValueError, match=r"batch_size must be <= the number of training prompts \(3\)"):
        batch_rows(3, 4, 0, seed=0)


def test_batch_size_above_n_train_is_refused_before_any_work():
    from fastcd.config import DistillConfig

    with pytest.raises(ValueError, match="batch_size must be <= n_train"):
        DistillConfig(method="ce+cka", batch_size=32, n_train=16).validate()


def test_a_checkpoint_from_the_with_replacement_sampler_is_refused(tmp_path):
    from fastcd.config import DistillConfig
    from fastcd.resume import check_checkpoint, read_checkpoint

    identity = {"config": {"seed": 0}}
    path = str(tmp_path / "ckpt.pt")
    torch.save({"identity": identity, "step": 1, "generator": torch.Generator().get_state()}, path)
    with pytest.raises(ValueError, match="drew batches with replacement"):
        check_checkpoint(read_checkpoint(path), path, identity, DistillConfig(steps=2))


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_cka_loss_is_float32_under_bf16_autocast(estimator):
    """Training under autocast bf16 (mixed_precision='bf16', the CPU default for real models) must not compute the
    CKA Gram matrices in bf16: the loss and its gradient equal the float32 ones."""
    from fastcd.cka import cka_loss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 32, 16, generator=g, requires_grad=True)
    y = x.detach() @ torch.randn(16, 24, generator=g) + 0.3 * torch.randn(3, 32, 24, generator=g)
    ref, ref_cka = cka_loss(x, y, estimator=estimator, impl="torch")
    (gx,) = torch.autograd.grad(ref, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_cka = cka_loss(x, y, estimator=estimator, impl="torch")
    (gx2,) = torch.autograd.grad(got, x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got_cka, ref_cka, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx2, gx, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen2-tied"])
def test_frozen_weights_held_in_bf16_train_bit_identically_to_autocasts_own_cast(tok, arch):
    """FrozenCast (the frozen linear weights held in bf16 for the steps) against its plain twin, autocast casting the
    float32 weights on every call: the same log (losses, gradient norms, validation every 2 steps), the same trained
    slices, bit for bit; the float32 originals back afterwards, untouched; bf16 while the steps ran."""
    from fastcd.trainable import FrozenCast, merge

    def tiny(seed):
        m = make_tiny(arch.removesuffix("-tied"), vocab_size=len(tok), seed=seed)
        if arch.endswith("-tied"):  # Qwen2.5-0.5B ties its lm_head to the embedding
            m.lm_head.weight = m.model.embed_tokens.weight
        return m

    teacher = tiny(1)
    train = TASK.encode(TASK.generate(32, seed=0, split="train"), tok)
    val = TASK.encode(TASK.generate(8, seed=1, split="val"), tok)
    got = {}
    for fc in (False, True):
        student = tiny(2)
        before = {k: v.clone() for k, v in student.state_dict().items()}
        cfg = DistillConfig(method="ce+cka", steps=5, batch_size=8, n_train=32, lr=1e-2, mixed_precision="bf16",
                            progress=False, log_every=1, eval_every=2, n_val=8)
        cd = CircuitDistiller(student, _matching(), teacher=teacher, config=cfg)
        assert len(FrozenCast(student, torch.bfloat16).held) > 0
        opt, _ = make_optimizer(cd, cfg)
        down = student.model.layers[1].mlp.down_proj.weight  # frozen: no head slice in an MLP
        seen = []
        log = train_loop(cd, opt, 0, cfg, train, train, None, eval_batch=val, frozen_cast=fc,
                         on_step=lambda step, log, seen=seen, down=down: seen.append(down.dtype))
        assert seen == [torch.bfloat16 if fc else torch.float32] * 5
        slices = [p.detach().clone() for p in cd.slices.params]
        merge(cd.slices)
        after = student.state_dict()
        assert all(v.dtype == before[k].dtype for k, v in after.items())
        untouched = [k for k in before if "q_proj" not in k and "o_proj" not in k]
        assert untouched and all(torch.equal(after[k], before[k]) for k in untouched)
        assert (student.lm_head.weight is student.model.embed_tokens.weight) == arch.endswith("-tied")
        got[fc] = ([{k: v for k, v in r.items() if k != "elapsed_s"} for r in log], slices, after)
    assert got[True][0] == got[False][0] and any("val_ce" in r for r in got[True][0])
    assert all(torch.equal(a, b) for a, b in zip(got[True][1], got[False][1]))
    assert all(torch.equal(got[True][2][k], got[False][2][k]) for k in got[True][2])


def test_frozen_cast_holds_only_frozen_untied_linear_weights_and_restores_them():
    """What FrozenCast converts: frozen nn.Linear weights and biases, the frozen original under a trainable splice,
    a tied lm_head (its own copy: the embedding keeps float32); not the trainable slices, norms or embeddings. On
    exit (and inside originals()) every parameter holds its own float32 tensor again, the lm_head tied again."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fastcd.trainable import FrozenCast, make_trainable, merge

    torch.manual_seed(0)
    m = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    assert m.lm_head.weight is m.model.embed_tokens.weight
    slices = make_trainable(m, [Head(0, 1)])
    q0 = m.model.layers[0].self_attn.q_proj
    data = {id(p): (p.data_ptr(), p.dtype) for p in m.parameters()}
    with FrozenCast(m, torch.bfloat16) as fc:
        low = {id(p) for p, _, _ in fc.held}
        assert m.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
        assert m.model.layers[1].self_attn.q_proj.bias.dtype == torch.bfloat16
        assert q0.parametrizations["weight"].original.dtype == torch.bfloat16  # the frozen rest of a spliced weight
        assert all(p.dtype == torch.float32 for p in slices.params)  # float32 masters
        assert q0.weight.dtype == torch.bfloat16  # the splice casts its slices to the weight's dtype
        assert m.model.embed_tokens.weight.dtype == torch.float32  # feeds the float32 residual stream: stays
        assert m.lm_head.weight.dtype == torch.bfloat16 and m.lm_head.weight is not m.model.embed_tokens.weight
        assert m.model.norm.weight.dtype == torch.float32
        with fc.originals():
            assert m.model.layers[1].mlp.up_proj.weight.dtype == torch.float32
        assert m.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
    assert not any(id(p) in low for p in slices.params)
    assert all((p.data_ptr(), p.dtype) == data[id(p)] for p in m.parameters())  # the very float32 tensors, back
    assert m.lm_head.weight is m.model.embed_tokens.weight  # tied again
    merge(slices)
