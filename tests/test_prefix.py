"""Shared-prefix reuse in fastcd.models.logits_at: exact against the full forward, and used only where it is."""

import warnings

import pytest
import torch
from conftest import ARCHS, make_tiny

from fastcd.hooks import capture_z
from fastcd.models import PREFIX_MIN, logits_at, shared_prefix_length
from fastcd.tasks import TheoryOfMind


@pytest.fixture(scope="module")
def tok():
    from fastcd.tokenizer import build_word_tokenizer

    return build_word_tokenizer()


def _batch(n=6, prefix=40, suffix=9, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randint(3, vocab, (1, prefix), generator=g).repeat(n, 1)
    return torch.cat([pre, torch.randint(3, vocab, (n, suffix), generator=g)], 1)


def test_shared_prefix_length():
    ids = _batch(prefix=40)
    assert shared_prefix_length(ids) >= 40  # random suffixes may share a first token by chance
    assert shared_prefix_length(ids[:1]) == 0
    ids[2, 5] = (ids[0, 5] + 1) % 50
    assert shared_prefix_length(ids) == 5


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_reuse_equals_the_full_forward(arch, monkeypatch):
    model = make_tiny(arch, vocab_size=64).eval()
    ids = _batch(vocab=64)
    last = torch.full((ids.shape[0],), ids.shape[1] - 1)
    mid = torch.tensor([42, 45, 48, 44, 43, 47])  # several read positions, all after the prefix
    calls = []
    orig = model.forward

    def spy(*a, **kw):
        calls.append(kw["input_ids"].shape)
        return orig(*a, **kw)

    monkeypatch.setattr(model, "forward", spy)
    with torch.no_grad():
        for pos in (last, mid):
            calls.clear()
            got, _ = logits_at(model, pos, input_ids=ids)
            assert calls[0] == (1, shared_prefix_length(ids)) and calls[1][1] == ids.shape[1] - calls[0][1]
            monkeypatch.setenv("FASTCD_PREFIX_REUSE", "0")
            calls.clear()
            ref, _ = logits_at(model, pos, input_ids=ids)
            monkeypatch.delenv("FASTCD_PREFIX_REUSE")
            assert calls == [ids.shape]  # one full forward
            assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), (got - ref).abs().max()


def test_no_reuse_with_hooks_grad_short_prefixes_or_early_positions(monkeypatch):
    model = make_tiny("llama", vocab_size=64).eval()
    ids = _batch(vocab=64)
    shapes = _forward_shapes(model, monkeypatch)
    last = torch.full((ids.shape[0],), ids.shape[1] - 1)
    with torch.no_grad(), capture_z(model, detach=True) as cache:  # a capture sees whole sequences
        logits_at(model, last, input_ids=ids)
    assert shapes == [ids.shape] and cache.stack().shape[1] == ids.shape[1]
    shapes.clear()
    logits_at(model, last, input_ids=ids)  # grad enabled: training never reuses
    short = _batch(prefix=PREFIX_MIN - 8, vocab=64)
    with torch.no_grad():
        logits_at(model, torch.full((6,), short.shape[1] - 1), input_ids=short)
        logits_at(model, torch.full((6,), 10), input_ids=ids)  # a read position inside the prefix
    assert shapes == [ids.shape, short.shape, ids.shape]


def test_theory_of_mind_few_shot_evaluation_reuses_its_prefix(tok):
    """Few-shot ToM prompts share the instruction and the shots: accuracy is the same with and without reuse."""
    from fastcd.metrics import accuracy_per_example

    task = TheoryOfMind(instruction="causaltom", few_shot=3)
    b = task.encode(task.generate(12, seed=0, split="test"), tok)
    assert shared_prefix_length(b.input_ids) >= PREFIX_MIN
    model = make_tiny("llama", vocab_size=len(tok)).eval()
    import os

    with_reuse = accuracy_per_example(model, b)
    os.environ["FASTCD_PREFIX_REUSE"] = "0"
    try:
        without = accuracy_per_example(model, b)
    finally:
        del os.environ["FASTCD_PREFIX_REUSE"]
    assert with_reuse == without


def _tom_matching(tok):
    from fastcd.artifacts import Matching, Pair
    from fastcd.models import Head
    from fastcd.tasks import TheoryOfMind

    task = TheoryOfMind(instruction="causaltom", few_shot=3)
    b = task.encode(task.generate(10, seed=0, split="test"), tok)
    roles = [r for r in b.positions if int(b.positions[r].min()) >= shared_prefix_length(b.input_ids)]
    assert len(roles) >= 2  # the question's roles lie after the shots
    pairs = [Pair(Head(1, 2), Head(1, 1), roles[0], "g", {}), Pair(Head(0, 3), Head(0, 2), roles[1], "g", {}),
             Pair(Head(1, 0), Head(1, 3), "last", "g", {})]
    return b, Matching(pairs, "given")


def _forward_shapes(model, monkeypatch):
    shapes = []
    orig = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **kw: shapes.append(tuple(kw["input_ids"].shape))
                        or orig(*a, **kw))
    return shapes


def test_teacher_signals_with_the_prefix_once_equal_the_full_forward(tok, monkeypatch):
    """The teacher cache (and the online teacher: the same teacher_forward) captures z at the roles after the
    prefix: the prefix runs once before the capture's hooks, the capture sees the suffixes, positions shifted."""
    from fastcd.teacher_cache import teacher_signals

    b, matching = _tom_matching(tok)
    model = make_tiny("llama", vocab_size=len(tok)).eval()
    shapes = _forward_shapes(model, monkeypatch)
    got = teacher_signals(model, b, matching, logits=True, batch_size=4)  # 3 chunks: a prefix forward each
    p = shared_prefix_length(b.input_ids)
    assert shapes[:2] == [(1, p), (4, b.input_ids.shape[1] - p)] and len(shapes) == 6
    monkeypatch.setenv("FASTCD_PREFIX_REUSE", "0")
    shapes.clear()
    ref = teacher_signals(model, b, matching, logits=True, batch_size=4)
    assert shapes == [(4, b.input_ids.shape[1]), (4, b.input_ids.shape[1]), (2, b.input_ids.shape[1])]
    assert torch.equal(got["labels"], ref["labels"]) and got["z"].shape == ref["z"].shape == (3, 10, 8)
    torch.testing.assert_close(got["z"], ref["z"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["logits"], ref["logits"], atol=1e-5, rtol=1e-4)


def test_matching_activations_with_the_prefix_once_equal_the_full_forward(tok, monkeypatch):
    from fastcd.match import head_activations
    from fastcd.models import Head

    b, matching = _tom_matching(tok)
    model = make_tiny("llama", vocab_size=len(tok)).eval()
    role = matching.pairs[0].position
    shapes = _forward_shapes(model, monkeypatch)
    got = head_activations(model, b, [Head(0, 1), Head(1, 3)], role)
    assert shapes[0] == (1, shared_prefix_length(b.input_ids))
    monkeypatch.setenv("FASTCD_PREFIX_REUSE", "0")
    ref = head_activations(model, b, [Head(0, 1), Head(1, 3)], role)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    every = head_activations(model, b, [Head(0, 1)], "all")  # every position read: no reuse possible
    assert every.shape == (1, 10 * b.input_ids.shape[1], 8)


@pytest.mark.parametrize("mode", ["mean", "corrupt"])
def test_attribution_patching_at_a_role_runs_the_prefix_once(tok, monkeypatch, mode):
    """Attribution scores at a role after the shots: the prefix runs once per chunk (its keys and values constants),
    the gradients at the suffixes are the full forward's, so the scores are the same; at every position no reuse."""
    from fastcd.attribution import attribution_patching
    from fastcd.discover import make_source
    from fastcd.tasks import TheoryOfMind

    task = TheoryOfMind(instruction="causaltom", few_shot=3)
    pairs = task.pairs(10, seed=0, split="test")
    clean, corrupt = (task.encode([getattr(x, k) for x in pairs], tok) for k in ("clean", "corrupt"))
    model = make_tiny("llama", vocab_size=len(tok)).eval()
    src = make_source(model, clean, mode, corrupt=corrupt)
    role = "last"
    shapes = _forward_shapes(model, monkeypatch)
    got = attribution_patching(model, clean, src, position=role, batch_size=4)
    p, t = shared_prefix_length(clean.input_ids), clean.input_ids.shape[1]
    chunks = [(4, t - p), (4, t - p), (2, t - p)]  # the clean metric (no grad), then the graph's forwards
    assert shapes == [x for c in chunks * 2 for x in ((1, p), c)]
    monkeypatch.setenv("FASTCD_PREFIX_REUSE", "0")
    shapes.clear()
    ref = attribution_patching(model, clean, src, position=role, batch_size=4)
    assert shapes == [(4, t), (4, t), (2, t)] * 2 and got.forwards == ref.forwards
    torch.testing.assert_close(got.scores, ref.scores, atol=1e-6, rtol=1e-4)
    assert ref.scores.abs().max() > 1e-5  # scores that say something (a tiny random model: small)
    monkeypatch.delenv("FASTCD_PREFIX_REUSE")
    shapes.clear()
    attribution_patching(model, clean, src, position=None, batch_size=4)  # every position scored: full forwards
    assert shapes[-3:] == [(4, t), (4, t), (2, t)]  # the graph's forwards run whole prompts


def test_a_shared_prefix_serves_one_forward_read_after_it():
    from fastcd.models import shared_prefix

    model = make_tiny("llama", vocab_size=64).eval()
    ids = _batch(vocab=64)
    last = torch.full((ids.shape[0],), ids.shape[1] - 1)
    with torch.no_grad():
        assert shared_prefix(model, ids, [last, torch.tensor([3])]) is None  # a read inside the prefix
        pre = shared_prefix(model, ids, [last])
        with pytest.raises(ValueError, match="read after the prefix"):
            logits_at(model, torch.full((ids.shape[0],), 5), input_ids=ids, prefix=pre)
        pre = shared_prefix(model, ids, [last])
        logits_at(model, last, input_ids=ids, prefix=pre)
        with pytest.raises(ValueError, match="serves one forward"):
            logits_at(model, last, input_ids=ids, prefix=pre)  # its cache now holds the suffixes too
    assert shared_prefix(model, ids, [last]) is None  # grad enabled: training never reuses


@pytest.mark.parametrize("protocol,dtype", [("strict", torch.float32), ("lenient", torch.float32),
                                            ("strict", torch.bfloat16)])
def test_circuit_evaluation_runs_the_clean_prefix_once(tok, monkeypatch, protocol, dtype):
    """Circuit evaluation (the search, faithfulness) on few-shot prompts: the ablation leaves the shared prefix
    clean (lenient keeps it; strict writes means that equal its clean z when the reference prompts share it), so it
    runs once without hooks and only the suffixes run ablated: the logits equal the full ablated forward's. A
    reference set whose prefix differs gives other means there: no reuse. In bf16 the check allows the dtype's
    rounding (the two paths differ by about 1%)."""
    import fastcd.metrics as M
    from fastcd.hooks import mean_z
    from fastcd.models import Head

    task = TheoryOfMind(instruction="causaltom", few_shot=3)
    pairs = task.pairs(10, seed=0, split="test")
    clean = task.encode([p.clean for p in pairs], tok)
    ref = task.encode([p.corrupt for p in pairs], tok)
    p = shared_prefix_length(clean.input_ids)
    assert p >= PREFIX_MIN and shared_prefix_length(torch.cat([clean.input_ids, ref.input_ids])) >= p
    model = make_tiny("llama", vocab_size=len(tok)).eval().to(dtype)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    roles = [r for r in clean.positions if int(clean.positions[r].min()) >= p]
    live = [(Head(1, 2), roles[0]), (Head(0, 3), "last"), (Head(1, 0), "last")]
    logits = []
    real_metric = M.metric_values
    monkeypatch.setattr(M, "metric_values", lambda lg, *a, **k: logits.append(lg.clone()) or real_metric(lg, *a, **k))
    shapes = _forward_shapes(model, monkeypatch)

    def run(means, reuse: bool):
        logits.clear(), shapes.clear()
        monkeypatch.setenv("FASTCD_PREFIX_REUSE", "1" if reuse else "0")
        hits = M.circuit_correct(model, clean, means, live, batch_size=4, protocol=protocol)
        return hits, torch.cat(logits), list(shapes)

    means = mean_z(model, ref.input_ids)
    hits, got, seen = run(means, True)
    assert (1, p) in seen and (4, clean.input_ids.shape[1] - p) in seen  # the prefix once per chunk, then suffixes
    ref_hits, want, seen_full = run(means, False)
    assert all(s[1] == clean.input_ids.shape[1] for s in seen_full)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    if dtype == torch.float32:
        assert hits == ref_hits
    other = means.clone()
    other[:, :p] += 0.5  # a reference that does not share the prefix
    _, got_other, seen_other = run(other, True)
    if protocol == "strict":  # the ablation changes the prefix: it is not reused, and the result is the full one
        assert all(s[1] == clean.input_ids.shape[1] for s in seen_other if s[0] > 1)
        torch.testing.assert_close(got_other.float(), run(other, False)[1].float(), **tol)


@pytest.mark.parametrize("dtype,rel,kept", [(torch.float32, 1e-2, False), (torch.bfloat16, 1e-2, True),
                                            (torch.bfloat16, 0.5, False), (torch.float32, 1e-5, True)])
def test_the_strict_prefix_check_allows_the_dtypes_rounding_only(tok, dtype, rel, kept):
    """Means that differ from the clean prefix z by ``rel`` (relative, per layer): within bf16's rounding (the two
    computation orders differ by ~1.5% on the 0.5B) the prefix is reused in bf16, not in float32; a different
    prefix (50%) never; lenient needs no means."""
    from fastcd.hooks import run_with_z
    from fastcd.metrics import ablated_prefix_length

    task = TheoryOfMind(instruction="causaltom", few_shot=3)
    clean = task.encode(task.generate(6, seed=0, split="test"), tok)
    p = shared_prefix_length(clean.input_ids)
    model = make_tiny("llama", vocab_size=len(tok)).eval().to(dtype)
    with torch.no_grad():
        _, z = run_with_z(model, clean.input_ids, logits=False)
    means = z.float().mean(1)  # [L, T, H, D]: the prefix positions hold the clean z
    noise = torch.randn(means[:, :p].shape, generator=torch.Generator().manual_seed(0))
    layer_norm = means[:, :p].flatten(1).norm(dim=1)[:, None, None, None]
    means[:, :p] += rel * noise / noise.flatten(1).norm(dim=1)[:, None, None, None] * layer_norm
    assert ablated_prefix_length(model, clean, means, "strict") == (p if kept else 0)
    assert ablated_prefix_length(model, clean, means, "lenient") == p


@pytest.mark.parametrize("arch,method,micro", [("llama", "ce+cka", None), ("qwen2", "ce+cka", None),
                                               ("llama", "kd", None),
                                               ("llama", "ce+cka", 4)])
def test_a_training_step_runs_the_shared_prefix_once_with_the_full_forwards_gradients(tok, monkeypatch, arch, method,
                                                                                       micro):
    """A training step on few-shot prompts (ToM behind the instruction and shots) runs the shared prefix once,
    batch 1, on the graph, then the suffixes over the batch: the loss terms and the gradient of every trainable
    slice equal the full forward's (FASTCD_PREFIX_REUSE=0), also through gradient caching's micro-batches; the
    frozen weights get no gradient either way."""
    from distill_helpers import small_config

    from fastcd.distillation import CircuitDistiller, make_batch

    b, matching = _tom_matching(tok)
    p = shared_prefix_length(b.input_ids)
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1).eval()
    results = []
    for reuse in (True, False):
        if not reuse:
            monkeypatch.setenv("FASTCD_PREFIX_REUSE", "0")
        student = make_tiny(arch, vocab_size=len(tok), seed=2)
        cd = CircuitDistiller(student, matching, teacher=teacher, config=small_config(method=method))
        shapes = _forward_shapes(student, monkeypatch)
        batch = make_batch(torch.arange(10), b, b)
        if micro:
            _, parts = cd.backward_micro(batch, micro)
        else:
            loss, parts = cd(batch)
            loss.backward()
        grads = [q.grad.clone() for q in cd.trainable_parameters()]
        ids = {id(q) for q in cd.trainable_parameters()}
        frozen = [q for q in student.parameters() if id(q) not in ids and q.grad is not None]
        results.append((parts, grads, shapes, frozen))
    (got, g_got, s_got, f_got), (ref, g_ref, s_ref, f_ref) = results
    T = b.input_ids.shape[1]
    if micro:  # pass 1 (no grad) and pass 2 (on the graph) each run the prefix once per micro-batch
        assert s_got == [(1, p), (4, T - p), (1, p), (4, T - p), (1, p), (2, T - p)] * 2
    else:
        assert s_got == [(1, p), (10, T - p)]
    assert all(s == (s[0], T) for s in s_ref)
    assert set(got) == set(ref) and all(abs(got[k] - ref[k]) < 1e-4 for k in got), (got, ref)
    assert len(g_got) == len(g_ref) > 0
    for a, r in zip(g_got, g_ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)
    assert not f_got and not f_ref  # only the slices' parameters take gradients


def test_no_prefix_reuse_in_training_under_gradient_checkpointing(tok):
    """Gradient checkpointing turns the model's cache off: a training forward then runs whole prompts."""
    from fastcd.models import shared_prefix
    from fastcd.training import gradient_checkpointing

    b, _ = _tom_matching(tok)
    model = make_tiny("llama", vocab_size=len(tok)).train()
    reads = [b.positions["last"]]
    assert shared_prefix(model, b.input_ids, reads) is None  # grad enabled and not a training step
    assert shared_prefix(model, b.input_ids, reads, train=True).length == shared_prefix_length(b.input_ids)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # not through transformers' deprecated names
        with gradient_checkpointing(model, True):
            assert shared_prefix(model, b.input_ids, reads, train=True) is None
    # afterwards the model is as it was: no hook left on its embeddings, and the prefix is reused again
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert shared_prefix(model, b.input_ids, reads, train=True).length == shared_prefix_length(b.input_ids)
