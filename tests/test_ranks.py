"""Rank agreement under torch.distributed (fastcd.ranks): outside a process group everything is local; in a group
of two gloo processes rank 0's circuit and matching reach rank 1, and ranks that hold different ones stop with one
line (end to end under torchrun: test_distill_ddp.py)."""

from __future__ import annotations

import torch.distributed as dist
import torch.multiprocessing as mp

from fastcd.artifacts import Circuit, CircuitHead, Matching, Pair
from fastcd.models import Head
from fastcd.ranks import broadcast_artifacts, check_ranks_agree, is_rank0, ranked

CIRCUIT = Circuit([CircuitHead(Head(1, 2), "mover", "last", -0.3)], "entity-tracking", 2, 4)


def _matching(student_head: int) -> Matching:
    return Matching([Pair(Head(1, 2), Head(0, student_head), "last", "mover", {"cka": 0.5})], "cka")


def test_outside_a_process_group_everything_is_local():
    assert not ranked() and is_rank0()
    m = _matching(1)
    c, got = broadcast_artifacts(CIRCUIT, m)
    assert c is CIRCUIT and got is m
    check_ranks_agree(matching=m, circuit=None)  # nothing to compare: no error


def _worker(rank: int, init: str, results):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        mine = (CIRCUIT, _matching(1)) if rank == 0 else (None, None)
        c, m = broadcast_artifacts(*mine)
        check_ranks_agree(circuit=c, matching=m)  # the broadcast ones agree
        out = {"rank0": is_rank0(), "circuit": c.to_json(), "matching": m.to_json()}
        try:
            check_ranks_agree(matching=_matching(rank))  # rank 1 holds another student head
        except ValueError as e:
            out["error"] = str(e)
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_two_ranks_broadcast_rank0s_artifacts_and_catch_disagreement(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(f"file://{tmp_path / 'store'}", results), nprocs=2, join=True)
    r0, r1 = results[0], results[1]
    assert r0["rank0"] and not r1["rank0"]
    assert r1["circuit"] == CIRCUIT.to_json() and r1["matching"] == _matching(1).to_json()
    want = "matching: rank 1 holds another matching than rank 0 (ranks [1] differ)"
    assert r0["error"].startswith(want) and r1["error"] == r0["error"]  # every rank stops, with the same line
    assert "\n" not in r0["error"]

