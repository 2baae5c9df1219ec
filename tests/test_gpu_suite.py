"""benchmarks/gpu_suite.py --smoke: every code path of the one-command GPU check runs on the CPU (so the script
that is run whenever a GPU is lent cannot rot), and its JSON and markdown hold every section."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_suite_smoke(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_suite.py"), "--smoke", "--skip-tests",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_suite.json").read_text())
    impls = {r["impl"] for r in res["cka_loss"]}
    assert impls == {"eager loop", "eager batched", "torch.compile", "triton"}
    assert not [r for r in res["cka_loss"] if "error" in r], res["cka_loss"]
    assert {r["dtype"] for r in res["cka_loss"]} == {"float32", "bfloat16"}
    assert res["step"]["ce+cka_ms"] > 0 and res["step"]["circuit-ce_ms"] > 0
    assert res["scorer"] and all(r.get("max_abs_diff", 0) < 1e-9 for r in res["scorer"])
    md = (tmp_path / "gpu_suite.md").read_text()
    for section in ("## CKA loss", "## Distillation step", "## Scorer", "Smoke mode"):
        assert section in md


def test_gpu_suite_refuses_to_run_without_cuda_unless_smoke(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_suite.py"), "--skip-build",
                        "--skip-tests", "--out", str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=300)
    assert p.returncode == 2 and "no CUDA device" in p.stderr
