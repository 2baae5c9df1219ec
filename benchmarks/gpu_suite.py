"""The whole GPU check in one prepared command: build, GPU tests, CKA-loss grid, distillation step, scorer.

On a CUDA machine with the repository and carried wheels only (no registry), it finishes in under 8 minutes
(``--budget-s``, default 420, stops the benchmark grid early and says so) and writes ``gpu_suite.json`` and
``gpu_suite.md`` into ``--out``:

1. build: ``setup.py build_ext --inplace`` (the pybind11 extension; CUDA is not compiled, see docs/INSTALL.md);
2. the GPU-marked tests (``pytest -m gpu``);
3. the CKA alignment loss: eager per-pair loop, batched eager, ``torch.compile`` and the Triton kernel, at
   P in {8, 64, 256} pairs, m in {32, 256, 2048} examples, d_head in {64, 128}, fp32 and bf16, forward and
   forward+backward, with time (CUDA events via ``triton.testing.do_bench``) and peak memory;
4. one ``ce+cka`` step against one ``circuit-ce`` step at Llama-3.2-1B shapes with random weights (bf16,
   batch 32, the 7-box prompt length, 64 matched pairs, teacher z from an offline cache) and the alignment
   share of the step;
5. the all-pairs CKA scorer on the GPU (512 x 1024 heads, m = 256) against the CPU scorers.

``--smoke`` runs every code path at tiny sizes on the CPU (Triton under ``TRITON_INTERPRET=1``, torch.compile
with the ``aot_eager`` backend, no build), so that CI keeps the script from rotting.

Run: ``python benchmarks/gpu_suite.py --out OUT`` (GPU) or ``python benchmarks/gpu_suite.py --smoke --out OUT``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sh(cmd: list[str], timeout: int) -> dict:
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out = (p.stdout + p.stderr).strip().splitlines()
        return {"cmd": " ".join(cmd), "rc": p.returncode, "seconds": round(time.time() - t0, 1), "tail": out[-8:]}
    except subprocess.TimeoutExpired:
        return {"cmd": " ".join(cmd), "rc": None, "seconds": timeout, "tail": ["timed out"]}


def _timer(device):
    """``ms(fn)``: median milliseconds per call (CUDA events through do_bench on a GPU, perf_counter on CPU)."""
    import torch

    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=10, rep=40))

    def ms(fn):
        fn()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return sorted(ts)[1]

    torch.manual_seed(0)
    return ms


def _peak(device, fn) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 2)


def bench_cka_loss(device, smoke: bool, deadline: float) -> list[dict]:
    import torch

    from fastcd.kernels.cka import cka_loss_triton
    from fastcd.reference import cka_loss_ref

    ms = _timer(device)
    grid_p, grid_m, grid_d = ([2], [8], [16]) if smoke else ([8, 64, 256], [32, 256, 2048], [64, 128])
    dtypes = [torch.float32, torch.bfloat16]
    compiled = torch.compile(cka_loss_ref, dynamic=True, backend="aot_eager" if smoke else "inductor")

    def loop(x, y):
        total = x.new_zeros((), dtype=torch.float32)
        for i in range(x.shape[0]):
            total = total + cka_loss_ref(x[i], y[i])[0]
        return total

    def triton_loss(x, y):  # the kernel reads [m, 1, P * d]: one head per pair at position 0
        p, m, d = x.shape
        xs = x.permute(1, 0, 2).reshape(m, 1, p * d)
        zeros = torch.zeros(p, m, dtype=torch.long, device=x.device)
        return cka_loss_triton(xs, zeros, torch.arange(p, device=x.device), y, None,
                               torch.zeros(p, dtype=torch.long, device=x.device), ds=d, dt=y.shape[-1])[0]

    impls = {"eager loop": loop, "eager batched": lambda x, y: cka_loss_ref(x, y)[0],
             "torch.compile": lambda x, y: compiled(x, y)[0], "triton": triton_loss}
    rows = []
    for p in grid_p:
        for m in grid_m:
            for d in grid_d:
                for dtype in dtypes:
                    if time.time() > deadline:
                        rows.append({"stopped": "time budget reached", "at": [p, m, d, str(dtype)]})
                        return rows
                    g = torch.Generator(device="cpu").manual_seed(0)
                    x0 = torch.randn(p, m, d, generator=g).to(device=device, dtype=dtype)
                    y = torch.randn(p, m, d, generator=g).to(device=device, dtype=dtype)
                    for name, fn in impls.items():
                        if name == "eager loop" and p * m > 64 * 2048:
                            continue  # minutes of Python overhead; its trend is clear at smaller sizes
                        row = {"P": p, "m": m, "d": d, "dtype": str(dtype).replace("torch.", ""), "impl": name}
                        try:
                            row.update(_measure(ms, device, fn, x0, y))
                        except Exception as e:  # noqa: BLE001 - recorded, the grid goes on
                            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                        rows.append(row)
    return rows


def _measure(ms, device, fn, x0, y) -> dict:
    x = x0.clone().requires_grad_(True)

    def fb():
        fn(x, y).backward()
        x.grad = None

    return {"fwd_ms": round(ms(lambda: fn(x0, y)), 4), "fwd_bwd_ms": round(ms(fb), 4),
            "fwd_bwd_peak_mib": _peak(device, fb)}


def _step_fn(cd, opt, batch):
    def step():
        loss, _ = cd(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_step(device, smoke: bool) -> dict:
    """ce+cka vs circuit-ce at Llama-3.2-1B shapes (random weights), teacher signals from an offline cache."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastcd.artifacts import Matching, Pair
    from fastcd.config import DistillConfig
    from fastcd.distillation import CircuitDistiller, DistillBatch
    from fastcd.models import Head
    from fastcd.trainable import merge

    ms = _timer(device)
    if smoke:
        shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
        batch, seq, n_pairs, dtype, d_t = 4, 12, 3, torch.float32, 16
    else:  # Llama-3.2-1B; teacher z at Llama-3-8B's d_head
        shape = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8)
        batch, seq, n_pairs, dtype, d_t = 32, 56, 64, torch.bfloat16, 128
    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, max_position_embeddings=256, tie_word_embeddings=True)
    with torch.device(device):
        student = LlamaForCausalLM(cfg).to(dtype)
    student.config._attn_implementation = "sdpa"
    g = torch.Generator().manual_seed(0)
    heads = torch.randperm(shape["num_hidden_layers"] * shape["num_attention_heads"], generator=g)[:n_pairs]
    n_h = shape["num_attention_heads"]
    pairs = [Pair(Head(int(h) // n_h, int(h) % n_h), Head(int(h) // n_h, int(h) % n_h), "last") for h in heads]
    matching = Matching(pairs, "bench")
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=g).to(device)
    pos = {"last": torch.full((batch,), seq - 1, device=device)}
    b = DistillBatch(ids, pos, torch.randint(0, shape["vocab_size"], (batch,), generator=g).to(device),
                     teacher_z=torch.randn(n_pairs, batch, d_t, generator=g).to(device),
                     teacher_labels=torch.randint(0, shape["vocab_size"], (batch,), generator=g).to(device))
    out = {"shape": shape, "batch": batch, "seq": seq, "pairs": n_pairs, "dtype": str(dtype)}
    for method in ("circuit-ce", "ce+cka"):
        cd = CircuitDistiller(student, matching, config=DistillConfig(method=method))
        opt = torch.optim.AdamW(cd.trainable_parameters(), lr=1e-4)
        step = _step_fn(cd, opt, b)
        out[f"{method}_ms"] = round(ms(step), 3)
        out[f"{method}_peak_mib"] = _peak(device, step)
        out["trainable_params"] = cd.n_trainable
        merge(cd.slices)
    out["alignment_share"] = round(1 - out["circuit-ce_ms"] / out["ce+cka_ms"], 4)
    return out


def bench_scorer(device, smoke: bool) -> list[dict]:
    import numpy as np
    import torch

    from fastcd import _ext
    from fastcd.cka import cka_matrix, cka_matrix_torch

    na, nb, m, da, db = (6, 8, 16, 8, 16) if smoke else (512, 1024, 256, 64, 128)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(na, m, da, generator=g)
    b = torch.randn(nb, m, db, generator=g)
    rows = []
    t0 = time.perf_counter()
    ref = cka_matrix_torch(a, b)
    rows.append({"impl": "torch float64, CPU", "seconds": round(time.perf_counter() - t0, 3)})
    if _ext.HAS_CPP:
        t0 = time.perf_counter()
        got = cka_matrix(a.numpy(), b.numpy(), impl="cpp")
        rows.append({"impl": "C++ fastcd._C, CPU", "seconds": round(time.perf_counter() - t0, 3),
                     "max_abs_diff": float(np.abs(got - ref).max())})
    if device.type == "cuda":
        for dt in (torch.float64, torch.float32):
            ad, bd = a.to(device, dt), b.to(device, dt)
            cka_matrix_torch(ad, bd)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            got = cka_matrix_torch(ad, bd)
            torch.cuda.synchronize()
            rows.append({"impl": f"torch {str(dt)[6:]}, GPU", "seconds": round(time.perf_counter() - t0, 4),
                         "max_abs_diff": float(np.abs(np.asarray(got) - ref).max())})
    return rows


def markdown(res: dict) -> str:
    lines = [f"# GPU suite ({'smoke, CPU' if res['smoke'] else res['device']})", "",
             f"torch {res['versions']['torch']}, triton {res['versions'].get('triton')}, transformers "
             f"{res['versions']['transformers']}, Python {res['versions']['python']}; {res['seconds']} s in all.", ""]
    if res["smoke"]:
        lines += ["Smoke mode: every code path at tiny sizes on the CPU (Triton interpreted); its times measure "
                  "nothing.", ""]
    for name in ("build", "gpu_tests"):
        if res.get(name):
            r = res[name]
            last = r["tail"][-1] if r["tail"] else ""
            lines.append(f"- {name}: rc={r['rc']} in {r['seconds']} s (`{r['cmd']}`): {last}")
    lines += ["", "## CKA loss", "", "| P | m | d | dtype | impl | fwd ms | fwd+bwd ms | fwd+bwd peak MiB |",
              "|---|---|---|---|---|---|---|---|"]
    for r in res["cka_loss"]:
        if "stopped" in r:
            lines.append(f"| stopped: {r['stopped']} at {r['at']} |||||||")
            continue
        if "error" in r:
            lines.append(f"| {r['P']} | {r['m']} | {r['d']} | {r['dtype']} | {r['impl']} | error: {r['error']} |||")
            continue
        lines.append(f"| {r['P']} | {r['m']} | {r['d']} | {r['dtype']} | {r['impl']} | {r['fwd_ms']} | "
                     f"{r['fwd_bwd_ms']} | {r['fwd_bwd_peak_mib'] if r['fwd_bwd_peak_mib'] is not None else '-'} |")
    s = res["step"]
    lines += ["", "## Distillation step", "",
              f"{s['shape']['num_hidden_layers']} layers x {s['shape']['num_attention_heads']} heads, d_model "
              f"{s['shape']['hidden_size']}, batch {s['batch']} x {s['seq']} tokens, {s['pairs']} pairs, "
              f"{s['dtype']}: "
              f"circuit-ce {s['circuit-ce_ms']} ms, ce+cka {s['ce+cka_ms']} ms (alignment share "
              f"{s['alignment_share']:.1%}); peak MiB {s['circuit-ce_peak_mib']} / {s['ce+cka_peak_mib']}; "
              f"{s['trainable_params']} trainable parameters.", "", "## Scorer", "",
              "| impl | seconds | max abs diff |", "|---|---|---|"]
    for r in res["scorer"]:
        lines.append(f"| {r['impl']} | {r['seconds']} | {r.get('max_abs_diff', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, every code path (CI)")
    ap.add_argument("--out", required=True, help="directory for gpu_suite.json and gpu_suite.md")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop the CKA grid after this many seconds")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args(argv)
    t_start = time.time()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.makedirs(args.out, exist_ok=True)
    res = {"smoke": args.smoke}
    if not args.smoke and not args.skip_build:
        res["build"] = _sh([sys.executable, "setup.py", "build_ext", "--inplace"], timeout=240)
    import torch
    import transformers

    sys.path.insert(0, ROOT)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if not args.smoke and device.type != "cuda":
        print("gpu_suite: no CUDA device; use --smoke on a CPU machine", file=sys.stderr)
        return 2
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    res["device"] = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu"
    res["versions"] = {"torch": torch.__version__, "triton": tv, "transformers": transformers.__version__,
                       "python": platform.python_version(), "cuda": torch.version.cuda}
    if not args.skip_tests:
        res["gpu_tests"] = _sh([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], timeout=240)
    deadline = t_start + args.budget_s
    res["step"] = bench_step(device, args.smoke)
    res["scorer"] = bench_scorer(device, args.smoke)
    res["cka_loss"] = bench_cka_loss(device, args.smoke, deadline)
    res["seconds"] = round(time.time() - t_start, 1)
    from fastcd.io import write_json_atomic, write_text_atomic

    write_json_atomic(res, os.path.join(args.out, "gpu_suite.json"), indent=1)
    write_text_atomic(markdown(res), os.path.join(args.out, "gpu_suite.md"))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
