"""The offline teacher cache: the teacher's matched heads' z (at each pair's role), its labels and optionally its
last-token logits for every training prompt, computed once (:func:`build_teacher_cache`) into safetensors
shards plus ``index.json``, and read lazily by :class:`TeacherCache` (one shard's rows at a time, memory-mapped),
so training needs neither the teacher in memory nor the whole cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

import torch
from torch import nn

from fastcd.artifacts import Matching
from fastcd.errors import InputFileError, UsageError
from fastcd.hooks import teacher_forward
from fastcd.io import atomic_target
from fastcd.ranks import ranked
from fastcd.tasks.base import EncodedBatch


@torch.inference_mode()
def teacher_signals(teacher: nn.Module, teacher_batch: EncodedBatch, matching: Matching | None, *,
                    logits: bool = False, batch_size: int = 128, progress: bool = False) -> dict:
    """One pass of the teacher over ``teacher_batch``: ``{"labels" [N], "z" [P, N, d] | None, "logits" [N, V] |
    None}``: its argmax answer, each matched pair's teacher z at the pair's role, and (``logits=True``) its
    last-token logits (the lm_head runs on the last position only). Few-shot prompts' shared prefix runs once
    (:func:`fastcd.models.shared_prefix`) when every role read lies after it."""
    from tqdm import tqdm

    pairs = matching.pairs if matching is not None else []
    n = len(teacher_batch)
    zs, labels, lg = [], [], []
    for i in tqdm(range(0, n, batch_size), disable=not progress, desc=f"teacher cache ({n} prompts)"):
        sub = teacher_batch.index(range(i, min(i + batch_size, n)))
        last, z = teacher_forward(teacher, sub.input_ids, sub.positions, pairs)
        last = last.cpu()
        labels.append(last.argmax(-1))
        if logits:
            lg.append(last)
        if z is not None:
            zs.append(z.cpu())
    return {"labels": torch.cat(labels), "z": torch.cat(zs, dim=1) if zs else None,
            "logits": torch.cat(lg) if lg else None}


class MemoryCache:
    """The teacher signals held in memory (what :func:`teacher_signals` returns), with the cache interface
    ``get(idx) -> (z [P, B, d] | None, labels [B], logits | None)``; ``rows`` restricts it to a subset."""

    def __init__(self, signals: dict, rows=None):
        self.s = signals
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.s["labels"]) if self.rows is None else len(self.rows)

    def get(self, idx):
        r = torch.as_tensor(idx, dtype=torch.long) if self.rows is None else self.rows[idx]
        z, lg = self.s["z"], self.s["logits"]
        return (None if z is None else z[:, r], self.s["labels"][r], None if lg is None else lg[r])


def build_teacher_cache(teacher: nn.Module, teacher_batch: EncodedBatch, matching: Matching | None, path: str, *,
                        shard_size: int = 1024, logits: bool = False, batch_size: int = 128,
                        progress: bool = False, tokenizer=None, provenance: dict | None = None) -> str:
    """Precompute the teacher's matched heads' z (at each pair's role), labels and optionally last-token
    logits for every example (:func:`teacher_signals`), into ``path/shard_*.safetensors`` plus
    ``path/index.json`` (with ``provenance``: what it was made from, see :func:`fastcd.artifacts.provenance`).

    Under torch.distributed every rank calls it with the same prompts and its own teacher (on its own device):
    shard k is computed by rank k mod world size into one temporary directory that rank 0 made, and rank 0 writes
    the index and moves the whole into place; the cache equals the one-process cache (bit for bit when
    ``shard_size`` is a multiple of ``batch_size``: the same forward batches; otherwise up to the float rounding
    of other batch shapes). Every rank returns once the cache is in place."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    if shard_size < 1:
        raise UsageError(f"shard_size must be >= 1, got {shard_size}")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ranked() else (0, 1)
    pairs = matching.pairs if matching is not None else []
    n = len(teacher_batch)
    bounds = [(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]
    with atomic_target(path, directory=True) if rank == 0 else contextlib.nullcontext() as tmp:
        if world > 1:  # rank 0's temporary directory, for every rank (nobody else makes or clears it)
            box = [tmp]
            dist.broadcast_object_list(box, src=0)
            tmp = box[0]
        # one process: one pass over every prompt (the forward batches of teacher_signals); a rank: its shards
        every = None if world > 1 else MemoryCache(teacher_signals(teacher, teacher_batch, matching, logits=logits,
                                                                   batch_size=batch_size, progress=progress))
        for k in range(rank, len(bounds), world):
            rows = torch.arange(*bounds[k])
            if every is not None:
                z, labels, lg = every.get(rows)
            else:
                sig = teacher_signals(teacher, teacher_batch.index(rows.tolist()), matching, logits=logits,
                                      batch_size=batch_size, progress=progress and rank == 0)
                z, labels, lg = sig["z"], sig["labels"], sig["logits"]
            tensors = {name: t.contiguous() for name, t in (("labels", labels), ("z", z), ("logits", lg))
                       if t is not None}
            save_file(tensors, os.path.join(tmp, f"shard_{k:05d}.safetensors"))
        if world > 1:
            dist.barrier()  # every shard written
        if rank == 0:
            shards = [{"file": f"shard_{k:05d}.safetensors", "start": s, "stop": e} for k, (s, e) in enumerate(bounds)]
            index = {"n": n, "shards": shards, "pairs": [p.to_json() for p in pairs], "logits": logits,
                     "vocab_sha": None if tokenizer is None else vocab_sha(tokenizer), "provenance": provenance}
            with open(os.path.join(tmp, "index.json"), "w") as f:
                json.dump(index, f, indent=2)
    if world > 1:
        dist.barrier()  # the cache is in place for everyone
    return path


class TeacherCache:
    """Reads an offline teacher cache lazily; ``get(indices)`` returns ``(z [P, B, d] | None, labels [B],
    logits [B, V] | None)``. Only the rows a batch needs are read, shard by shard (safetensors ``get_slice``:
    the span from the first to the last needed row of each shard), so memory stays at about one batch."""

    def __init__(self, path: str, matching: Matching | None = None):
        from safetensors import safe_open

        idx_path = os.path.join(path, "index.json")
        if not os.path.isfile(idx_path):
            raise InputFileError(f"teacher_cache: {path!r} has no index.json; build it with build_teacher_cache")
        with open(idx_path) as f:
            self.index = json.load(f)
        # the cache holds the teacher side only: (teacher head, position) per pair, in order. Student heads may
        # differ (the ce+rand-cka control re-draws them over the same teacher heads).
        if matching is not None:
            want = [(str(p.teacher), p.position) for p in matching.pairs]
            have = [(d["teacher"], d["position"]) for d in self.index["pairs"]]
            if want != have:
                raise UsageError(f"teacher_cache {path!r} holds the teacher heads {have[:4]}..., the matching needs "
                                 f"{want[:4]}...; rebuild it with this matching")
        self.path = path
        self._files = [safe_open(os.path.join(path, s["file"]), "pt") for s in self.index["shards"]]
        self._starts = torch.tensor([s["start"] for s in self.index["shards"]])
        keys = set(self._files[0].keys()) if self._files else set()
        self.has_z, self.has_logits = "z" in keys, "logits" in keys

    def __len__(self) -> int:
        return int(self.index["n"])

    def _rows(self, name: str, idx: torch.Tensor, dim: int) -> torch.Tensor:
        shard = torch.searchsorted(self._starts, idx, right=True) - 1
        parts, where = [], []
        for s in shard.unique().tolist():
            sel = (shard == s).nonzero().flatten()
            local = idx[sel] - int(self._starts[s])
            lo, hi = int(local.min()), int(local.max()) + 1
            sl = self._files[s].get_slice(name)
            block = sl[:, lo:hi] if dim == 1 else sl[lo:hi]
            parts.append(block.index_select(dim, local - lo))
            where.append(sel)
        order = torch.cat(where).argsort()
        return torch.cat(parts, dim=dim).index_select(dim, order)

    def get(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long).flatten()
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"teacher_cache {self.path!r} holds rows 0..{len(self) - 1}, asked for "
                             f"{int(idx.min())}..{int(idx.max())}")
        return (self._rows("z", idx, 1) if self.has_z else None, self._rows("labels", idx, 0),
                self._rows("logits", idx, 0) if self.has_logits else None)


def vocab_sha(tokenizer) -> str:
    """A hash of a tokenizer's token -> id map (what teacher labels mean)."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha1(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


def check_cache_vocabulary(path: str, student_tok, vocab_size: int | None = None) -> None:
    """A teacher cache's labels are teacher token ids: they must mean the same tokens for the student (checked
    from its index, before any model loads) and fit the student's vocabulary (once it is loaded)."""
    idx_path = os.path.join(path, "index.json")
    if not os.path.isfile(idx_path):
        raise InputFileError(f"teacher_cache: {path!r} has no index.json; build it with build_teacher_cache")
    with open(idx_path) as f:
        index = json.load(f)
    sha = index.get("vocab_sha")
    if sha is not None and student_tok is not None and sha != vocab_sha(student_tok):
        raise UsageError(f"teacher_cache {path!r} was built with a tokenizer whose vocabulary differs from the "
                         "student's; its labels are token ids of another vocabulary")
    if vocab_size is not None:
        from safetensors import safe_open

        top = -1
        for sh in index["shards"]:
            with safe_open(os.path.join(path, sh["file"]), "pt") as f:
                top = max(top, int(f.get_tensor("labels").max()))
        if top >= vocab_size:
            raise UsageError(f"teacher_cache {path!r} holds label id {top}, outside the student's vocabulary of "
                             f"{vocab_size}; teacher and student must share one vocabulary")


__all__ = ["MemoryCache", "TeacherCache", "build_teacher_cache", "check_cache_vocabulary", "teacher_signals",
           "vocab_sha"]
