"""Alignment loss (sum over P pairs of 1 - CKA): fwd, bwd and fwd+bwd (pytest-benchmark).

Providers: ``loop`` (eager, one pair at a time), ``torch`` (batched eager reference, fastcd.reference),
``compile`` (torch.compile of the batched reference), ``triton`` (fused gather + CKA kernel). Sweep on a GPU:
P in {8, 64, 256}, m in {32, 256, 2048}, d_head in {64, 128}. On a CPU-only machine the suite runs its CPU
part (loop vs batched eager at P in {8, 64}, m in {32, 256}, d_head 64) and skips the GPU providers
with a message; the GPU rows of RESULTS.md stay pending until run on a GPU.

Run: ``python -m pytest benchmarks/bench_cka_loss.py --benchmark-only``.
"""

import itertools

import pytest
import torch

from fastcd.reference import cka_loss_ref

CUDA = torch.cuda.is_available()
if CUDA:
    SWEEP = list(itertools.product([8, 64, 256], [32, 256, 2048], [64, 128]))
    PROVIDERS = ["loop", "torch", "compile", "triton"]
else:
    SWEEP = list(itertools.product([8, 64], [32, 256], [64]))
    PROVIDERS = ["loop", "torch", "compile", "triton"]


def setup_cka(p, m, d, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    heads, t = 8, 16
    xs = torch.randn(m, t, heads * d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    pos = torch.randint(0, t, (p, m), generator=g).to(device)
    head = torch.randint(0, heads, (p,), generator=g).to(device)
    y = torch.randn(p, m, d, generator=g).to(device=device, dtype=dtype)
    return xs, pos, head, y


def _gather(xs, pos, head, d):
    m = xs.shape[0]
    rows = torch.arange(m, device=xs.device)
    return torch.stack([xs[rows, pos[i]].view(m, -1, d)[:, int(head[i])] for i in range(pos.shape[0])])


def _fn(provider, xs, pos, head, y, d):
    if provider == "loop":
        def f():
            x = _gather(xs, pos, head, d)
            return sum(cka_loss_ref(x[i], y[i])[0] for i in range(x.shape[0]))
    elif provider == "torch":
        def f():
            return cka_loss_ref(_gather(xs, pos, head, d), y)[0]
    elif provider == "compile":
        comp = torch.compile(lambda x, yy: cka_loss_ref(x, yy)[0])

        def f():
            return comp(_gather(xs, pos, head, d), y)
    else:
        from fastcd.kernels.cka import cka_loss_triton

        zeros = torch.zeros_like(head)

        def f():
            return cka_loss_triton(xs, pos, head, y, None, zeros, ds=d, dt=d)[0]
    return f


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("p, m, d", SWEEP)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cka_loss(benchmark, provider, mode, p, m, d):
    if provider in ("compile", "triton") and not CUDA:
        pytest.skip(f"{provider}: GPU provider; the GPU rows are pending on a CPU-only machine")
    device = "cuda" if CUDA else "cpu"
    xs, pos, head, y = setup_cka(p, m, d, device)
    f = _fn(provider, xs, pos, head, y, d)
    benchmark.group = f"cka_loss {mode} P={p} m={m} d={d}"
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                f()
            sync()
    elif mode == "bwd":
        def run():
            loss = f()
            xs.grad = None
            sync()
            loss.backward()
            sync()
    else:
        def run():
            xs.grad = None
            f().backward()
            sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(run, rounds=5, warmup_rounds=2)
    if CUDA:
        benchmark.extra_info["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
