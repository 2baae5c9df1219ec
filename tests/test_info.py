"""``python -m fastcd.info`` (fastcd.info): what this install can run, and which implementation each op takes."""

import subprocess
import sys

import torch

from fastcd import _ext
from fastcd.info import collect


def test_collect_reports_this_install():
    rows = collect()
    assert rows["torch"] == torch.__version__
    assert rows["CUDA available"] == str(torch.cuda.is_available())
    ext = rows["C++ extension fastcd._C"]
    assert ext == "built" if _ext.HAS_CPP else ext.startswith("missing (")  # with the import error
    want = "cpp (fastcd._C)" if _ext.HAS_CPP else "python (fastcd.reference)"
    assert rows["op: nearest_indices (matching)"] == want
    if not torch.cuda.is_available():
        assert rows["op: attention in load_model"] == "sdpa" and rows["flash-attn usable"] == "False"


def test_info_runs_and_reports_choices():
    out = subprocess.run([sys.executable, "-m", "fastcd.info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for key in ("torch", "triton", "CUDA available", "C++ extension fastcd._C", "flash-attn usable",
                "op: nearest_indices", "op: attention in load_model"):
        assert key in out.stdout
    assert "sdpa" in out.stdout  # no CUDA here
