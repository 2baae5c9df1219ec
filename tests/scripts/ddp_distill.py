"""Run by tests/test_distill_ddp.py under torchrun (gloo, CPU): distil a tiny pair and save the weights."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import make_tiny  # noqa: E402

from fastcd.artifacts import Matching, Pair  # noqa: E402
from fastcd.config import DistillConfig
from fastcd.models import Head  # noqa: E402
from fastcd.pipeline import distill  # noqa: E402
from fastcd.tasks import EntityTracking  # noqa: E402
from fastcd.tokenizer import build_word_tokenizer  # noqa: E402


def main(out: str, method: str, micro: int = 0, mode: str = "given") -> None:
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    tok = build_word_tokenizer()
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=2)
    m = Matching([Pair(Head(1, 2), Head(1, 1), "last", "g", {}), Pair(Head(0, 3), Head(0, 2), "query_label", "g", {})],
                 "given")
    if mode == "discover" and dist.is_initialized() and dist.get_rank() == 1:  # rank 0 alone discovers and matches
        import fastcd.pipeline as P

        def not_here(*a, **k):
            raise AssertionError("rank 1 ran discovery or matching")

        P.default_circuit = P.match = not_here
    if mode == "disagree" and dist.is_initialized() and dist.get_rank() == 1:  # another matching on rank 1
        m = Matching([Pair(Head(1, 2), Head(1, 3), "last", "g", {})], "given")
    cfg = DistillConfig(method=method, steps=5, batch_size=8, n_train=64, n_eval=8, lr=1e-2, progress=False,
                        kd_weight=0.3, micro_batch_size=micro, n_discovery=16, top_k=2, discovery="attribution",
                        matching_method="cka")
    res = distill(teacher, student, EntityTracking(n_boxes=3), matching=None if mode == "discover" else m, config=cfg,
                  student_tokenizer=tok, teacher_tokenizer=tok)
    if mode == "discover":
        print("matching:", res.matching.to_json()["pairs"])
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(res.student.state_dict(), out)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0,
         sys.argv[4] if len(sys.argv) > 4 else "given")
