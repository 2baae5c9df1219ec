"""Attribution patching (fastcd.attribution): the gradient estimate of every head's patching score in two forwards
and one backward, against exact batched patching, and the rank agreement used to compare them."""

import pytest
import torch
from conftest import make_tiny

from fastcd.attribution import attribution_patching, spearman
from fastcd.discover import make_source, patch_heads_batched
from fastcd.tasks import EntityTracking


def _data(tok, n=24):
    task = EntityTracking(n_boxes=3)
    pairs = task.pairs(n, seed=0, split="val")
    return task.encode([p.clean for p in pairs], tok), task.encode([p.corrupt for p in pairs], tok)


def test_spearman_is_rank_correlation_of_the_flattened_scores():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert spearman(a, a ** 3) == pytest.approx(1.0)  # monotone: ranks agree exactly
    assert spearman(a, -a) == pytest.approx(-1.0)
    b = torch.tensor([[2.0, 1.0], [3.0, 4.0]])  # one swapped pair of ranks: 1 - 6 * 2 / (4 * 15)
    assert spearman(a, b) == pytest.approx(0.8)


def test_attribution_needs_a_differentiable_metric(tok):
    model = make_tiny("llama", vocab_size=len(tok))
    clean, _ = _data(tok, n=4)
    with pytest.raises(ValueError, match="has no gradient"):
        attribution_patching(model, clean, make_source(model, clean, "zero"), metric="accuracy")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_attribution_tracks_exact_patching(arch, tok):
    model = make_tiny(arch, vocab_size=len(tok), n_layers=3)
    clean, corrupt = _data(tok, n=32)
    src = make_source(model, clean, "mean", corrupt=corrupt)
    exact = patch_heads_batched(model, clean, src, position="last")
    attr = attribution_patching(model, clean, src, position="last", batch_size=16)
    rho = spearman(attr.scores, exact.scores)
    print(f"{arch}: spearman(attribution, exact) = {rho:.3f}")
    assert rho > 0.8
    # two forwards + one backward per chunk: 2 chunks of 16 + the clean-metric pass
    assert attr.forwards == 2 + 2
    rechecked = attribution_patching(model, clean, src, position="last", batch_size=16, recheck_top_k=3)
    for h, _ in rechecked.top(3):
        torch.testing.assert_close(rechecked.scores[h.layer, h.head], exact.scores[h.layer, h.head],
                                   atol=2e-5, rtol=1e-4)


def test_attribution_is_exact_for_linear_direct_effect(tok):
    """With logit_diff and patching at the last position of the last layer, the metric is linear in z."""
    model = make_tiny("llama", vocab_size=len(tok), n_layers=1)
    model.model.layers[0].mlp.down_proj.weight.data.zero_()  # no MLP after the heads' write
    clean, corrupt = _data(tok, n=8)
    src = make_source(model, clean, "corrupt", corrupt=corrupt)
    kw = dict(metric="logit_diff", relative=False, position="last")
    exact = patch_heads_batched(model, clean, src, **kw)
    attr = attribution_patching(model, clean, src, **kw)
    # the final RMSNorm keeps it from being exactly linear, but it is close
    assert spearman(attr.scores, exact.scores) > 0.9
