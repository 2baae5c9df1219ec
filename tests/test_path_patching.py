import pytest
import torch
from conftest import make_tiny

from fastcd.discover import make_source, patch_heads_batched
from fastcd.hooks import run_with_z
from fastcd.models import Head, get_adapter
from fastcd.path_patching import entity_tracking_circuit, path_patch
from fastcd.tasks import EntityTracking


@pytest.fixture(scope="module")
def tok():
    from fastcd.tokenizer import build_word_tokenizer

    return build_word_tokenizer()


def _data(tok, n=16):
    task = EntityTracking(n_boxes=3)
    pairs = task.pairs(n, seed=1, split="val")
    return task.encode([p.clean for p in pairs], tok), task.encode([p.corrupt for p in pairs], tok)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_direct_effect_in_one_layer_model_equals_activation_patching(arch, tok):
    """With no downstream heads, freezing the others changes nothing: path patching == activation patching."""
    model = make_tiny(arch, n_layers=1, vocab_size=len(tok))
    clean, corrupt = _data(tok)
    _, cz = run_with_z(model, corrupt.input_ids)
    pp = path_patch(model, clean, cz, sender_position="last", receivers=None, receiver_input="logits")
    ap = patch_heads_batched(model, clean, make_source(model, clean, "corrupt", corrupt=corrupt), position="last")
    torch.testing.assert_close(pp.scores, ap.scores, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("which, pos", [("q", "last"), ("v", "query_label")])
def test_composition_through_a_blind_receiver_is_zero(arch, which, pos, tok):
    """A receiver whose q (or v) ignores its input passes nothing on: every sender's patched forward is the same,
    so every sender scores the same, 0 up to float32 rounding (the clean reference may take kernels that sum in
    another order: -5.7e-9 for all four senders on one Xeon). The senders' real effects in this tiny random model
    are 1e-8 to 3e-5, so a tolerance alone could not tell them from rounding: their being equal can."""
    model = make_tiny(arch, n_layers=2, vocab_size=len(tok))
    clean, corrupt = _data(tok)
    receiver = Head(1, 1)
    mod, sl = get_adapter(model).qkv_output(1, which, receiver.head)
    with torch.no_grad():
        if arch == "gpt2":  # Conv1D: weight [in, out]
            mod.weight[:, sl] = 0
        else:
            mod.weight[sl] = 0
    _, cz = run_with_z(model, corrupt.input_ids)
    res = path_patch(model, clean, cz, sender_position=pos, receivers=[receiver], receiver_input=which)
    assert torch.all(res.scores[0] == res.scores[0][0]) and res.scores[0][0].abs() < 1e-6
    assert torch.isnan(res.scores[1]).all()  # same-layer senders have no path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("which, pos, receivers", [
    ("logits", "last", None),
    ("q", "last", [Head(1, 0), Head(2, 3)]),
    ("v", "query_label", [Head(0, 1), Head(2, 0)]),  # a layer-0 receiver: no sender reaches it
    ("v", "box_label", [Head(2, 1), Head(2, 2)]),  # the sender's token differs from prompt to prompt
])
def test_fast_path_equals_full_forwards(arch, which, pos, receivers, tok):
    """Layer skipping and the clean prefix's keys/values (the fast path) give the full forwards' scores."""
    model = make_tiny(arch, n_layers=3, vocab_size=len(tok))
    clean, corrupt = _data(tok, n=12)
    if pos == "box_label":
        assert clean.positions[pos].unique().numel() > 1
    _, cz = run_with_z(model, corrupt.input_ids)
    kw = dict(sender_position=pos, receivers=receivers, receiver_input=which, max_batch=20)
    ref = path_patch(model, clean, cz, skip_layers=False, reuse_prefix=False, **kw)
    fast = path_patch(model, clean, cz, **kw)
    torch.testing.assert_close(fast.scores, ref.scores, atol=2e-5, rtol=1e-4, equal_nan=True)
    assert (~torch.isnan(ref.scores)).sum() > 0 and ref.scores.nan_to_num().abs().sum() > 0
    layer_only = path_patch(model, clean, cz, reuse_prefix=False, **kw)
    torch.testing.assert_close(layer_only.scores, ref.scores, atol=2e-5, rtol=1e-4, equal_nan=True)


def test_composition_scores_are_nonzero_and_batch_invariant(tok):
    model = make_tiny("llama", n_layers=2, vocab_size=len(tok))
    clean, corrupt = _data(tok)
    _, cz = run_with_z(model, corrupt.input_ids)
    kw = dict(sender_position="last", receivers=[Head(1, 0), Head(1, 3)], receiver_input="q")
    a = path_patch(model, clean, cz, max_batch=16, **kw)  # one sender per forward
    b = path_patch(model, clean, cz, max_batch=64, **kw)
    torch.testing.assert_close(a.scores, b.scores, atol=2e-5, rtol=1e-4, equal_nan=True)
    assert a.scores[0].abs().sum() > 0
    assert a.forwards > b.forwards


def test_entity_tracking_circuit(tok, tmp_path):
    model = make_tiny("llama", n_layers=4, vocab_size=len(tok))
    clean, corrupt = _data(tok, n=12)
    k = (3, 2, 2, 1)
    circuit, results = entity_tracking_circuit(model, clean, corrupt, k=k)
    groups = circuit.groups()
    assert 1 <= len(groups["value_fetcher"]) <= 3
    assert all(c.score < 0 for c in circuit.heads)
    names = ["value_fetcher", "position_transmitter", "position_detector", "structure_reader"]
    roles = ["last", "last", "query_label", "box_label"]
    for name, role, kk in zip(names, roles, k):
        if name in circuit.meta["empty_groups"]:
            continue
        assert name in results and 1 <= len(groups[name]) <= kk
        assert {c.position for c in groups[name]} == {role}
    # each group's heads sit below the highest head of the group it feeds
    for sender, receiver in zip(names[1:], names[:-1]):
        if sender in groups and receiver in groups:
            top = max(c.head.layer for c in groups[receiver])
            assert all(c.head.layer < top for c in groups[sender])
    circuit.save(tmp_path / "c.json")
    with pytest.raises(ValueError, match="k must be four positive integers"):
        entity_tracking_circuit(model, clean, corrupt, k=(3, 2, 2))


def test_path_patch_errors(tok):
    model = make_tiny("llama", vocab_size=len(tok))
    clean, corrupt = _data(tok, n=4)
    _, cz = run_with_z(model, corrupt.input_ids)
    with pytest.raises(ValueError, match="receiver_input must be"):
        path_patch(model, clean, cz, sender_position="last", receivers=None, receiver_input="k")
    with pytest.raises(ValueError, match="receivers must be a non-empty list"):
        path_patch(model, clean, cz, sender_position="last", receivers=[], receiver_input="q")
    with pytest.raises(ValueError, match="corrupt_z must be"):
        path_patch(model, clean, cz[:, :2], sender_position="last", receivers=None)
    with pytest.raises(ValueError, match="out of range"):
        path_patch(model, clean, cz, sender_position="last", receivers=[Head(4, 0)], receiver_input="q")
