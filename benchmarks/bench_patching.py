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


POSITIONS = [None, "query_label", "last", "box_label"]


@pytest.mark.parametrize("position", POSITIONS, ids=["all", "query_label", "last", "box_label"])
def test_patching_loop(benchmark, setup_patching, position):
    model, clean, src = setup_patching
    benchmark.group = f"patching position={position or 'all'}"
    res = benchmark.pedantic(lambda: patch_heads_loop(model, clean, src, batch_size=64, position=position),
                             rounds=3, warmup_rounds=1)
    benchmark.extra_info["forwards"] = res.forwards


@pytest.mark.parametrize("position", POSITIONS, ids=["all", "query_label", "last", "box_label"])
def test_patching_batched(benchmark, setup_patching, position):
    model, clean, src = setup_patching
    benchmark.group = f"patching position={position or 'all'}"
    res = benchmark.pedantic(
        lambda: patch_heads_batched(model, clean, src, max_batch=512, batch_size=64, position=position),
        rounds=3, warmup_rounds=1)
    benchmark.extra_info["forwards"] = res.forwards


# Path patching (Prakash et al.'s four groups, fastcd.path_patching.path_patch): full forwards (the specification)
# against the fast path (each forward from the sender's layer and from the earliest patched token on, over the
# clean prefix's keys and values). Senders: every head below the receivers; receivers: two heads of the last layer.
PATH_GROUPS = {"value_fetcher": ("last", "logits"), "position_transmitter": ("last", "q"),
               "position_detector": ("query_label", "v"), "structure_reader": ("box_label", "v")}


@pytest.fixture(scope="module")
def setup_path(setup_patching):
    from fastcd.hooks import run_with_z
    from fastcd.tasks import EntityTracking

    model, clean, _ = setup_patching
    task = EntityTracking(n_boxes=7)
    corrupt = task.encode([p.corrupt for p in task.pairs(64, seed=0, split="val")], build_word_tokenizer())
    return model, clean, run_with_z(model, corrupt.input_ids, logits=False)[1]


@pytest.mark.parametrize("fast", [False, True], ids=["full", "fast"])
@pytest.mark.parametrize("group", list(PATH_GROUPS))
def test_path_patching(benchmark, setup_path, group, fast):
    from fastcd.models import Head
    from fastcd.path_patching import path_patch

    model, clean, cz = setup_path
    pos, which = PATH_GROUPS[group]
    kw = dict(sender_position=pos, receiver_input=which, max_batch=512, skip_layers=fast, reuse_prefix=fast,
              receivers=None if which == "logits" else [Head(3, 0), Head(3, 5)])
    benchmark.group = f"path patching {group}"
    res = benchmark.pedantic(lambda: path_patch(model, clean, cz, **kw), rounds=3, warmup_rounds=1)
    benchmark.extra_info["forwards"] = res.forwards
