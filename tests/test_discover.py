
import pytest
import torch
from conftest import make_tiny

from fastcd.discover import make_source, patch_heads_batched, patch_heads_loop
from fastcd.tasks import EntityTracking, TheoryOfMind


@pytest.fixture(scope="module")
def tok():
    from fastcd.tokenizer import build_word_tokenizer

    return build_word_tokenizer()


def _data(tok, n=24, task=None):
    task = task or EntityTracking(n_boxes=3)
    pairs = task.pairs(n, seed=0, split="val")
    return task.encode([p.clean for p in pairs], tok), task.encode([p.corrupt for p in pairs], tok)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode, position", [("mean", None), ("corrupt", "last"), ("mean", "query_label"),
                                            ("zero", "box_label")])
def test_batched_patching_equals_loop(arch, mode, position, tok):
    model = make_tiny(arch, vocab_size=len(tok))
    clean, corrupt = _data(tok)
    src = make_source(model, clean, mode, corrupt=corrupt)
    loop = patch_heads_loop(model, clean, src, metric="prob", position=position, batch_size=8)
    fast = patch_heads_batched(model, clean, src, metric="prob", position=position, max_batch=8 * 24,
                               batch_size=8)
    torch.testing.assert_close(fast.scores, loop.scores, atol=2e-5, rtol=1e-4)
    assert not torch.isnan(loop.scores).any() and loop.scores.abs().sum() > 0
    # one clean pass per batch of 8, then per layer one forward per group of rows that start at one token (a role
    # that moves from prompt to prompt, box_label, runs each of its positions' rows from there on)
    groups = clean.positions[position].unique().numel() if position and arch == "llama" else 1
    assert fast.forwards == 3 + 2 * groups and loop.forwards >= 2 * fast.forwards, (loop.forwards, fast.forwards)
    plain = patch_heads_batched(model, clean, src, metric="prob", position=position, max_batch=8 * 24,
                                batch_size=8, skip_layers=False)
    torch.testing.assert_close(plain.scores, loop.scores, atol=2e-5, rtol=1e-4)


def _tiny_gemma3(vocab, layer_types):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=len(layer_types),
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                           layer_types=list(layer_types), max_position_embeddings=128, attn_implementation="eager")
    return Gemma3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("position", [None, "query_label"])
def test_gemma3_mixed_layer_types_patching_equals_loop(position, tok):
    """Gemma3 picks each layer's mask (sliding window 4 < prompt length here) and RoPE by its index in
    config.layer_types: skipping layers would give layer l the type of layer 0, so fastcd does not skip when the
    types differ (and does when they are uniform)."""
    from fastcd.models import get_adapter

    mixed = _tiny_gemma3(len(tok), ["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    assert not get_adapter(mixed).supports_layer_skip
    assert get_adapter(_tiny_gemma3(len(tok), ["full_attention"] * 2)).supports_layer_skip
    clean, corrupt = _data(tok, n=8)
    src = make_source(mixed, clean, "mean", corrupt=corrupt)
    loop = patch_heads_loop(mixed, clean, src, metric="logprob", position=position, batch_size=8)
    fast = patch_heads_batched(mixed, clean, src, metric="logprob", position=position, max_batch=64, batch_size=8)
    torch.testing.assert_close(fast.scores, loop.scores, atol=2e-5, rtol=1e-4)
    assert loop.scores.abs().sum() > 0


@pytest.mark.parametrize("metric, arch", [("logprob", "mistral"), ("logit_diff", "qwen2"), ("accuracy", "qwen3")])
def test_batched_equals_loop_other_metrics(metric, arch, tok):
    model = make_tiny(arch, vocab_size=len(tok))
    clean, corrupt = _data(tok, task=TheoryOfMind())
    src = make_source(model, clean, "corrupt", corrupt=corrupt)
    kw = dict(metric=metric, relative=False, position="question_character", batch_size=6)
    loop = patch_heads_loop(model, clean, src, **kw)
    fast = patch_heads_batched(model, clean, src, max_batch=50, **kw)
    torch.testing.assert_close(fast.scores, loop.scores, atol=2e-5, rtol=1e-4)


def test_patching_a_head_that_does_nothing_scores_zero(tok):
    model = make_tiny("llama", vocab_size=len(tok))
    clean, corrupt = _data(tok, n=8)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[:, 8:16] = 0  # head L1H1 writes nothing
    src = make_source(model, clean, "corrupt", corrupt=corrupt)
    res = patch_heads_batched(model, clean, src)
    assert res.scores[1, 1] == 0
    assert (res.scores.flatten().abs() > 0).sum() >= 6


def test_metric_and_input_errors(tok):
    model = make_tiny("llama", vocab_size=len(tok))
    clean, corrupt = _data(tok, n=4)
    with pytest.raises(ValueError, match="mode must be one of"):
        make_source(model, clean, "resample")
    with pytest.raises(ValueError, match="needs corrupt prompts"):
        make_source(model, clean, "corrupt")
    with pytest.raises(ValueError, match="position role 'subject'"):
        patch_heads_batched(model, clean, make_source(model, clean, "zero"), position="subject")
    res = patch_heads_batched(model, clean, make_source(model, clean, "zero"))
    with pytest.raises(ValueError, match=r"k must be in 1\.\.8"):
        res.top(9)
    # prompts of unequal length where positions must align
    mixed = EntityTracking(n_boxes=3).generate(2) + EntityTracking(n_boxes=4).generate(2)
    ragged = EntityTracking().encode(mixed, tok)
    with pytest.raises(ValueError, match="one token length"):
        patch_heads_batched(model, ragged, make_source(model, clean, "zero"))
    with pytest.raises(ValueError, match="one token length"):
        make_source(model, clean, "corrupt", corrupt=ragged)


def test_circuit_by_roles(tok):
    from fastcd.discover import circuit_by_roles

    model = make_tiny("llama", vocab_size=len(tok))
    clean, corrupt = _data(tok)
    src = make_source(model, clean, "mean", corrupt=corrupt)
    circuit, results = circuit_by_roles(model, clean, src, ("last", "box_label"), k_per_role=2, threshold=0.0)
    assert set(results) == {"last", "box_label"}
    for c in circuit.heads:
        assert c.score < 0 and c.score == float(results[c.position].scores[c.head.layer, c.head.head])
    assert sum(c.position == "last" for c in circuit.heads) <= 2
    with pytest.raises(ValueError, match="no head's patch lowers"):
        circuit_by_roles(model, clean, src, ("last",), threshold=10.0)
    with pytest.raises(ValueError, match="k_per_role must be"):
        circuit_by_roles(model, clean, src, ("last",), k_per_role=0)
