"""All-pairs CKA scorer at Llama-3.2-1B x Llama-3-8B head shapes (pytest-benchmark, CPU), with the roofline.

512 student heads (d=64) x 1024 teacher heads (d=128), m=256 random float32 activations, seed 0.
Providers: the C++ scorer (fastcd._C, Gram form) with float32 products summed in float64 per tile
(``cpp-f32``) and with float64 products (``cpp-f64``); the vectorised torch Gram form
(fastcd.match.cka_matrix_torch) with the final product in float32 (``torch-f32``) and float64 (``torch-f64``);
and a per-pair Python loop (feature form in torch, one pair at a time), timed on 2,000 pairs and extrapolated
to all 524,288. Each runs in a fresh subprocess (peak RSS growth over the call; best of 3 calls); every
result is checked against a float64 reference on a 32 x 32 corner.

Roofline: the work is one product of packed, normalised Gram rows, [512, P] x [P, 1024] with P = 32,896
(34.5 GFLOP), plus building the Grams' upper triangles (sum over heads of m^2 d: 10.7 GFLOP in float64); the
bound is those FLOPs at this machine's measured torch.mm peak (4096^3, float32 and float64), measured in the
same run (``test_gemm_peak``).

Contention: ``FASTCD_BENCH_BUSY=N`` runs N CPU-bound processes beside every measurement (a researcher's
shared machine).

Run: ``python -m pytest benchmarks/bench_cka_scorer.py --benchmark-only -s`` (add ``FASTCD_BENCH_BUSY=1``).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SHAPES = dict(ha=512, hb=1024, m=256, da=64, db=128)
LOOP_PAIRS = 2000
GRAM_FLOP = 2 * 512 * 1024 * (256 * 257 // 2)  # the packed-row product
BUILD_FLOP = 256 * 256 * (512 * 64 + 1024 * 128)  # the Grams' upper triangles (m^2 d / 2 FMA each)

_CHILD = textwrap.dedent('''
    import json, resource, sys, time
    import numpy as np
    import torch
    from fastcd.cka import cka_matrix, cka_matrix_torch

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    s = json.loads(sys.argv[2])
    rng = np.random.default_rng(0)
    a = rng.standard_normal((s["ha"], s["m"], s["da"]), dtype=np.float32)
    b = rng.standard_normal((s["hb"], s["m"], s["db"]), dtype=np.float32)
    provider = sys.argv[1]
    if provider == "peak":
        x, y = torch.randn(4096, 4096), torch.randn(4096, 4096)
        out = {}
        for name, (u, v) in {"f32": (x, y), "f64": (x.double(), y.double())}.items():
            u @ v
            t = time.perf_counter()
            for _ in range(3):
                u @ v
            out[name] = 3 * 2 * 4096 ** 3 / (time.perf_counter() - t) / 1e9
        print(json.dumps({"provider": "peak", "gflops": out, "threads": torch.get_num_threads()}))
        sys.exit()
    before = peak_mb()
    if provider == "loop":
        at, bt = torch.from_numpy(a).double(), torch.from_numpy(b).double()
        t = time.perf_counter()
        n = 0
        for i in range(s["ha"]):
            for j in range(s["hb"]):
                x = at[i] - at[i].mean(0); y = bt[j] - bt[j].mean(0)
                val = ((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())).item()
                n += 1
                if n == s["loop_pairs"]:
                    break
            if n == s["loop_pairs"]:
                break
        secs = (time.perf_counter() - t) * (s["ha"] * s["hb"]) / n
        err = None
    else:
        impl, prec = provider.split("-")
        run = (lambda: cka_matrix(a, b, impl="cpp", precision="float32" if prec == "f32" else "float64")) \\
            if impl == "cpp" else (lambda: cka_matrix_torch(a, b, dtype=torch.float32 if prec == "f32" else None))
        times = []
        for _ in range(3):
            t = time.perf_counter()
            r = run()
            times.append(time.perf_counter() - t)
        secs = min(times)
        ref = cka_matrix(a[:32], b[:32], impl="python")
        err = float(np.abs(r[:32, :32] - ref).max())
    print(json.dumps({"provider": provider, "seconds": secs, "peak_growth_mb": peak_mb() - before,
                      "max_abs_err_vs_f64": err, "threads": torch.get_num_threads()}))
''')


def _run(provider: str) -> dict:
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(int(os.environ.get("FASTCD_BENCH_BUSY", "0")))]
    try:
        # numpy's BLAS threads (the float64 reference check only) spin-wait badly beside busy processes
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", _CHILD, provider,
                              json.dumps({**SHAPES, "loop_pairs": LOOP_PAIRS})],
                             capture_output=True, text=True, check=True, env=env)
    finally:
        for p in busy:
            p.kill()
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["busy_processes"] = len(busy)
    return res


def test_gemm_peak(benchmark):
    res = benchmark.pedantic(lambda: _run("peak"), rounds=1, iterations=1)
    g = res["gflops"]
    bound = GRAM_FLOP / (g["f32"] * 1e9) + BUILD_FLOP * 2 / (g["f64"] * 1e9)
    benchmark.extra_info.update(res, roofline_seconds=bound)
    print(f"\ntorch.mm peak: {g['f32']:.0f} GFLOP/s float32, {g['f64']:.0f} GFLOP/s float64; roofline of the "
          f"scorer (float32 product + float64 Gram build): {bound:.3f} s")


@pytest.mark.parametrize("provider", ["cpp-f32", "cpp-f64", "torch-f32", "torch-f64", "loop"])
def test_cka_scorer(benchmark, provider):
    from fastcd import _ext

    if provider.startswith("cpp") and not _ext.HAS_CPP:
        pytest.skip("fastcd._C not built")
    res = benchmark.pedantic(lambda: _run(provider), rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    print(f"\n{provider}: {res['seconds']:.3f} s, peak RSS growth {res['peak_growth_mb']:.0f} MB, max error vs "
          f"float64 {res['max_abs_err_vs_f64']}, {res['busy_processes']} busy process(es) beside it")
