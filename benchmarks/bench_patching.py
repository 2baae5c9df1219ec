"""Batched exact head patching vs one forward per head (pytest-benchmark, CPU).

Run: ``python -m pytest benchmarks/bench_patching.py --benchmark-only``. Shapes: a tiny Llama (4 layers x
8 heads, d_model 128, GQA 8/4), 7-box entity tracking (55 tokens), 64 clean/corrupt pairs, mean ablation at
every position or at one position role, metric = relative p(correct). The loop runs the 32 heads one at a
time in chunks of 64 examples (32 forwards of 64 rows, plus one clean pass); the batched path stacks
(head, example) rows, up to 512 per forward, grouped by the patched head's layer, starts each forward at that
layer from the cached clean residual stream and, for a position role, runs only the positions from the
patched one on, over the clean prefix's keys and values. Both give the same scores (tests/test_discover.py).
"""

import pytest
import torch

from fastcd.discover import make_source, patch_heads_batched, patch_heads_loop
from fastcd.tasks import EntityTracking
from fastcd.tokenizer import build_word_tokenizer


@pytest.fixture(scope="module")
def setup_patching():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = build_word_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=128, attn_implementation="sdpa")).eval()
    task = EntityTracking(n_boxes=7)
    pairs = task.pairs(64, seed=0, split="val")
    clean = task.encode([p.clean for p in pairs], tok)
    corrupt = task.encode([p.corrupt for p in pairs], tok)
    src = make_source(model, clean, "mean", corrupt=corrupt)
    return model, clean, src


POSITIONS = [None, "query_label", "last"]


@pytest.mark.parametrize("position", POSITIONS, ids=["all", "query_label", "last"])
def test_patching_loop(benchmark, setup_patching, position):
    model, clean, src = setup_patching
    benchmark.group = f"patching position={position or 'all'}"
    res = benchmark.pedantic(lambda: patch_heads_loop(model, clean, src, batch_size=64, position=position),
                             rounds=3, warmup_rounds=1)
    benchmark.extra_info["forwards"] = res.forwards


@pytest.mark.parametrize("position", POSITIONS, ids=["all", "query_label", "last"])
def test_patching_batched(benchmark, setup_patching, position):
    model, clean, src = setup_patching
    benchmark.group = f"patching position={position or 'all'}"
    res = benchmark.pedantic(
        lambda: patch_heads_batched(model, clean, src, max_batch=512, batch_size=64, position=position),
        rounds=3, warmup_rounds=1)
    benchmark.extra_info["forwards"] = res.forwards
