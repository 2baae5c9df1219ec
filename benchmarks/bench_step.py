"""One circuit-distillation step vs one plain CE step, and optimizer-state bytes (pytest-benchmark).

CPU: tiny Llama teacher (2 layers x 4 heads, d_model 64) and student (2 layers x 4 heads, d_model 48), 7-box
entity tracking, batch 32, 3 matched heads. Providers: ``circuit-ce`` (CE only, same trainable slices) and
``ce+cka`` (CE + lambda * sum (1 - CKA)). With a GPU: Llama-1B-like shapes (16 layers x 32 heads, d 2048,
GQA 8) for the student and the same teacher, bf16.

Run: ``python -m pytest benchmarks/bench_step.py --benchmark-only -s``.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastcd.artifacts import Matching, Pair
from fastcd.config import DistillConfig
from fastcd.distillation import CircuitDistiller, DistillBatch
from fastcd.models import Head
from fastcd.tasks import EntityTracking
from fastcd.tokenizer import build_word_tokenizer

CUDA = torch.cuda.is_available()


def _llama(vocab, layers, d, heads, kv, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(dtype)


@pytest.fixture(scope="module")
def setup_step():
    tok = build_word_tokenizer()
    task = EntityTracking(7)
    enc = task.encode(task.generate(32, seed=0), tok)
    device = "cuda" if CUDA else "cpu"
    if CUDA:  # Llama-3.2-1B-like student
        teacher = _llama(len(tok), 4, 256, 8, 8, 0, torch.bfloat16).to(device)
        student = _llama(len(tok), 16, 2048, 32, 8, 1, torch.bfloat16).to(device)
    else:
        teacher = _llama(len(tok), 2, 64, 4, 4, 0)
        student = _llama(len(tok), 2, 48, 4, 4, 1)
    pairs = [Pair(Head(1, 2), Head(1, 1), "last", "vf", {}), Pair(Head(0, 2), Head(0, 3), "box_label", "sr", {}),
             Pair(Head(0, 3), Head(1, 0), "query_label", "pd", {})]
    batch = DistillBatch(enc.input_ids.to(device), {k: v.to(device) for k, v in enc.positions.items()},
                         enc.answer_ids.to(device), enc.input_ids.to(device),
                         {k: v.to(device) for k, v in enc.positions.items()})
    return teacher, student, Matching(pairs, "bench"), batch


@pytest.mark.parametrize("method", ["circuit-ce", "ce+cka"])
def test_step(benchmark, setup_step, method):
    teacher, student, matching, batch = setup_step
    cd = CircuitDistiller(student, matching, teacher=teacher, config=DistillConfig(method=method))
    opt = torch.optim.AdamW(cd.trainable_parameters(), lr=1e-4)

    def step():
        loss, _ = cd(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if CUDA:
            torch.cuda.synchronize()

    benchmark.group = "distillation step"
    benchmark.pedantic(step, rounds=20, warmup_rounds=3)
    slice_bytes = sum(p.numel() * p.element_size() for p in cd.trainable_parameters())
    state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                      if torch.is_tensor(v) and v.dim() > 0)
    full_bytes = 2 * sum(p.numel() * p.element_size() for p in student.parameters())  # Adam on every weight
    benchmark.extra_info.update(slice_bytes=slice_bytes, adam_state_bytes=state_bytes,
                                full_finetune_adam_bytes=full_bytes)
    print(f"\n{method}: trainable {slice_bytes} B, Adam state {state_bytes} B "
          f"({state_bytes / slice_bytes:.2f}x), full fine-tune Adam {full_bytes} B")
    from fastcd.trainable import merge

    merge(cd.slices)
