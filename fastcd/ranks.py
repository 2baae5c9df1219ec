"""Under ``torchrun``: discovery and matching run once, on rank 0, and every rank checks that it holds the same
circuit and matching (given files that differ between ranks, e.g. different local copies, are one error)."""

from __future__ import annotations

import torch.distributed as dist

from fastcd.artifacts import Circuit, Matching
from fastcd.errors import UsageError


def ranked() -> bool:
    """True in a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_rank0() -> bool:
    return not ranked() or dist.get_rank() == 0


def broadcast_artifacts(circuit: Circuit | None, matching: Matching | None):
    """Rank 0's circuit and matching, on every rank (the other ranks pass None and receive them)."""
    if not ranked():
        return circuit, matching
    box = [None if circuit is None else circuit.to_json(), None if matching is None else matching.to_json()]
    dist.broadcast_object_list(box, src=0)
    return (None if box[0] is None else Circuit.from_json(box[0]),
            None if box[1] is None else Matching.from_json(box[1]))


def check_ranks_agree(**artifacts) -> None:
    """One line when any rank holds another artifact (``name=Circuit or Matching or None``) than rank 0."""
    if not ranked():
        return
    mine = {k: None if v is None else v.to_json() for k, v in artifacts.items()}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for name in artifacts:
        bad = [r for r, d in enumerate(everyone) if d[name] != everyone[0][name]]
        if bad:
            raise UsageError(f"{name}: rank {bad[0]} holds another {name} than rank 0 (ranks {bad} differ); every "
                             f"rank must train the same heads: give each rank the same {name} file, or none (rank 0 "
                             "then computes it for all)")


__all__ = ["broadcast_artifacts", "check_ranks_agree", "is_rank0", "ranked"]
