"""All-pairs CKA scorer at Llama-3.2-1B x Llama-3-8B head shapes (pytest-benchmark, CPU).

512 student heads (d=64) x 1024 teacher heads (d=128), m=256 random float32 activations, seed 0.
Providers: the C++ scorer (fastcd._C, tiled, float64), the vectorised torch Gram-form implementation
(fastcd.match.cka_matrix_torch), and a per-pair Python loop (feature form in torch, one pair at a time),
timed on 2,000 pairs and extrapolated linearly to all 524,288. Peak memory is the process's peak RSS growth
over the call, measured in a fresh subprocess per provider.

Run: ``python -m pytest benchmarks/bench_cka_scorer.py --benchmark-only -s``.
"""

import json
import subprocess
import sys
import textwrap

import pytest

SHAPES = dict(ha=512, hb=1024, m=256, da=64, db=128)
LOOP_PAIRS = 2000

_CHILD = textwrap.dedent('''
    import json, resource, sys, time
    import numpy as np
    import torch
    from fastcd.match import cka_matrix

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    s = json.loads(sys.argv[2])
    rng = np.random.default_rng(0)
    a = rng.standard_normal((s["ha"], s["m"], s["da"]), dtype=np.float32)
    b = rng.standard_normal((s["hb"], s["m"], s["db"]), dtype=np.float32)
    before = peak_mb()
    provider = sys.argv[1]
    t = time.perf_counter()
    if provider == "loop":
        at, bt = torch.from_numpy(a).double(), torch.from_numpy(b).double()
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
    else:
        cka_matrix(a, b, impl=provider)
        secs = time.perf_counter() - t
    print(json.dumps({"provider": provider, "seconds": secs, "peak_growth_mb": peak_mb() - before,
                      "threads": torch.get_num_threads()}))
''')


def _run(provider: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, provider, json.dumps({**SHAPES, "loop_pairs": LOOP_PAIRS})],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("provider", ["cpp", "torch", "loop"])
def test_cka_scorer(benchmark, provider):
    from fastcd import _ext

    if provider == "cpp" and not _ext.HAS_CPP:
        pytest.skip("fastcd._C not built")
    res = benchmark.pedantic(lambda: _run(provider), rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    print(f"\n{provider}: {res['seconds']:.2f} s, peak RSS growth {res['peak_growth_mb']:.0f} MB")
