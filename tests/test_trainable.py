"""fastcd.trainable: re-initialising a head touches only that head's parameter slices."""

from __future__ import annotations

import torch
from experiment_helpers import TEACHER

from fastcd.trainable import reinit_heads


def test_reinit_heads_touches_only_that_heads_slices():
    from fastcd.hooks import Head
    from fastcd.loading import load_model

    m = load_model(TEACHER)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    reinit_heads(m, [Head(0, 2)], seed=0)
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    d = m.config.hidden_size // m.config.num_attention_heads
    assert changed and all(".layers.0.self_attn." in k for k in changed)
    for k in changed:
        diff = (before[k] != after[k])
        if "o_proj" in k:
            cols = diff.any(0).nonzero().flatten()
            assert cols.min() >= 2 * d and cols.max() < 3 * d
        else:
            rows = diff.any(-1).nonzero().flatten() if diff.ndim == 2 else diff.nonzero().flatten()
            assert rows.min() >= 2 * d and rows.max() < 3 * d
