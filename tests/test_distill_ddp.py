"""DDP: two CPU processes on gloo give the same result as one process at the same global batch."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # two processes per test (torchrun)

SCRIPT = Path(__file__).parent / "scripts" / "ddp_distill.py"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method,micro,mode", [("ce+cka", 0, "given"), ("cka", 0, "given"), ("full-ce", 0, "given"),
                                               ("ce+cka", 2, "given"), ("ce+cka", 0, "discover")])
def test_ddp_two_processes_match_one(tmp_path, method, micro, mode):
    """With ``mode="discover"`` no matching is given: rank 0 discovers and matches, the other rank receives them.
    With ``micro`` > 0 the two ranks also split their 4 prompts into micro-batches of 2 (the CKA term exact over
    the global 8 by gradient caching), against one process that takes the 8 in one forward."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    single = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "one.pt"), method, "0", mode], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = shutil.which("torchrun")
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(SCRIPT),
        str(tmp_path / "two.pt"), method, str(micro), mode]
    double = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    a = torch.load(tmp_path / "one.pt")
    b = torch.load(tmp_path / "two.pt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-6, rtol=1e-5)
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_tiny

    from fastcd.tokenizer import build_word_tokenizer

    init = make_tiny("llama", vocab_size=len(build_word_tokenizer()), seed=2).state_dict()
    assert any(not torch.equal(init[k], a[k]) for k in a)  # the runs did train


def test_torchrun_builds_the_teacher_cache_once_and_matches_one_process(tmp_path):
    """`fastcd distill --build-teacher-cache` under torchrun: each rank loads the teacher and computes its share of
    the cache files into rank 0's temporary directory (no clash on it), rank 0 writes the index, both train from
    the one cache; the cache's files and the student equal one process's."""
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_tiny

    from fastcd.artifacts import Matching, Pair
    from fastcd.models import Head
    from fastcd.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer()
    make_tiny("llama", n_layers=3, vocab_size=len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    Matching([Pair(Head(2, 1), Head(1, 0), "last", "g", {})], "given").save(tmp_path / "m.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    common = ["distill", "--teacher", str(tmp_path / "model"), "--student", str(tmp_path / "model"), "--task",
              "entity-tracking", "--n-boxes", "3", "--matching", str(tmp_path / "m.json"), "--steps", "3",
              "--batch-size", "8", "--n-train", "16", "--n-eval", "8", "--lr", "1e-2", "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "fastcd", *common, "--out", str(tmp_path / "one"),
                          "--build-teacher-cache", str(tmp_path / "c1"), "--cache-shard-size", "4"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = shutil.which("torchrun")
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m",
        "fastcd", *common, "--out", str(tmp_path / "two"), "--build-teacher-cache", str(tmp_path / "c2"),
        "--cache-shard-size", "4"]  # 16 prompts: 4 files, two computed by each rank
    two = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote teacher cache") == 1
    assert sorted(os.listdir(tmp_path / "c2")) == sorted(os.listdir(tmp_path / "c1"))
    assert len(os.listdir(tmp_path / "c1")) == 5  # 4 files and the index
    from safetensors.torch import load_file

    a = load_file(tmp_path / "one" / "student" / "model.safetensors")
    b = load_file(tmp_path / "two" / "student" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-6, rtol=1e-5)


def test_ranks_holding_different_matchings_stop_with_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    torchrun = shutil.which("torchrun")
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(SCRIPT),
        str(tmp_path / "two.pt"), "ce+cka", "0", "disagree"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "matching: rank 1 holds another matching than rank 0 (ranks [1] differ)" in p.stderr


def test_accelerate_launch_with_micro_batches_matches_one_process(tmp_path):
    """`accelerate launch` (the launcher most training code uses) starts the same ranks torchrun does: two
    processes, each splitting its 4 prompts into micro-batches of 2, give the student one process gives with the
    global batch of 8 in one forward (the CKA term exact over all 8)."""
    import accelerate  # noqa: F401  (a dev dependency: its absence is a failure, not a skip)
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_tiny

    from fastcd.artifacts import Matching, Pair
    from fastcd.models import Head
    from fastcd.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer()
    make_tiny("llama", n_layers=3, vocab_size=len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    Matching([Pair(Head(2, 1), Head(1, 0), "last", "g", {}), Pair(Head(1, 3), Head(0, 2), "query_label", "g", {})],
             "given").save(tmp_path / "m.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["distill", "--teacher", str(tmp_path / "model"), "--student", str(tmp_path / "model"), "--task",
              "entity-tracking", "--n-boxes", "3", "--matching", str(tmp_path / "m.json"), "--steps", "3",
              "--batch-size", "8", "--n-train", "16", "--n-eval", "8", "--lr", "1e-2", "--method", "ce+cka",
              "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "fastcd", *common, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(_free_port())]  # --multi_gpu: accelerate's torchrun-style launcher, here on CPU with gloo
    two = subprocess.run([*launch, "-m", "fastcd", *common, "--micro-batch-size", "2", "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "one" / "student" / "model.safetensors")
    b = load_file(tmp_path / "two" / "student" / "model.safetensors")
    init = load_file(tmp_path / "model" / "model.safetensors")
    assert any(not torch.equal(init[k], a[k]) for k in a)  # the runs did train
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-6, rtol=1e-5)
