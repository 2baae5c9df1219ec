"""Circuit adapters: the trained head slices of a circuit-distilled student, alone, as a small shareable file.

Circuit distillation trains only the matched student heads' q rows and o columns (and their q bias and, where a
head owns them, its k/v slices): everything else stays the base model's. An adapter is those slices
(``adapter.safetensors``) and ``adapter.json``: the heads, the key/value policy, the matching, the base model's
shape and a fingerprint of its (never trained) token embeddings. :func:`apply_adapter` writes the slices into a
loaded base model after checking that it is that base; the result equals the distilled student.

    from fastcd.adapters import save_adapter, load_adapted
    save_adapter(res, "et-adapter")                   # res = fastcd.distill(...) with a circuit method
    student = load_adapted("path/to/base-student", "et-adapter")
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from torch import nn

from fastcd.artifacts import Matching
from fastcd.errors import InputFileError, UsageError
from fastcd.io import atomic_target
from fastcd.loading import load_model
from fastcd.models import Head, get_adapter
from fastcd.trainable import trains_kv

FORMAT = "fastcd-circuit-adapter/1"
SHAPE_FIELDS = ("model_type", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_model", "vocab_size")


def base_fingerprint(model: nn.Module) -> str:
    """sha256 of the token embeddings rounded to bf16 (the same for a base loaded in float32 or bf16)."""
    emb = model.get_input_embeddings().weight.detach()
    return hashlib.sha256(emb.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().tobytes()).hexdigest()


def _shape(model: nn.Module) -> dict:
    s = get_adapter(model).spec
    return {k: getattr(s, k) for k in SHAPE_FIELDS}


def save_adapter(result, path: str | os.PathLike, *, kv: str = "auto", base: str | None = None) -> dict:
    """Write the trained slices of ``result`` (a :class:`fastcd.pipeline.DistillResult` of a circuit method, or
    anything with ``student`` and ``matching``) to the directory ``path``; returns the ``adapter.json`` record.
    ``kv`` must be the run's key/value policy (``DistillConfig.kv``); ``base`` names the base student (default: the
    student's ``config._name_or_path``)."""
    student, matching = getattr(result, "student", None), getattr(result, "matching", None)
    if not isinstance(student, nn.Module) or not isinstance(matching, Matching) or not len(matching):
        raise UsageError("result: an adapter needs a distilled student and its matching (a circuit method's result; "
                         "a full-model method trains every weight, so it has no adapter)")
    if (getattr(result, "metrics", None) or {}).get("trained_heads_fraction") == 1.0:
        raise UsageError("result: a full-model method trains every weight; it has no circuit adapter")
    own_kv = trains_kv(student, kv)
    heads = sorted(matching.student_heads())
    adapter = get_adapter(student)
    tensors, slices = {}, []
    for h in heads:
        for sl in adapter.head_slices(h, kv=own_kv):
            key = f"{sl.name}[{sl.dim}:{sl.index.start}:{sl.index.stop}]"
            if key in tensors:  # a KV group shared by two matched heads: stored once
                continue
            tensors[key] = sl.param.detach().narrow(sl.dim, sl.index.start, sl.index.stop - sl.index.start).contiguous()
            slices.append({"key": key, "head": str(h), "name": sl.name, "dim": sl.dim,
                           "start": sl.index.start, "stop": sl.index.stop})
    n = sum(t.numel() for t in tensors.values())
    total = sum(p.numel() for p in student.parameters())
    record = {"format": FORMAT, "base": base or getattr(student.config, "_name_or_path", None),
              "base_shape": _shape(student), "base_fingerprint": base_fingerprint(student),
              "heads": [str(h) for h in heads], "kv": "trainable" if own_kv else "frozen", "slices": slices,
              "n_params": n, "share_of_base": n / total, "dtype": str(next(iter(tensors.values())).dtype),
              "matching": matching.to_json()}
    from safetensors.torch import save_file

    with atomic_target(path, directory=True) as tmp:
        save_file(tensors, os.path.join(tmp, "adapter.safetensors"))
        with open(os.path.join(tmp, "adapter.json"), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
    return record


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(adapter.json record, {key: tensor})`` of an adapter directory; one-line errors for a bad one."""
    path = os.fspath(path)
    meta_path, st_path = os.path.join(path, "adapter.json"), os.path.join(path, "adapter.safetensors")
    if not (os.path.isfile(meta_path) and os.path.isfile(st_path)):
        raise InputFileError(f"adapter: {path!r} is not an adapter directory (adapter.json and adapter.safetensors)")
    with open(meta_path, encoding="utf-8") as f:
        record = json.load(f)
    if record.get("format") != FORMAT:
        raise UsageError(f"adapter: {path!r} has format {record.get('format')!r}, expected {FORMAT!r}")
    from safetensors.torch import load_file

    return record, load_file(st_path)


def apply_adapter(model: nn.Module, path: str | os.PathLike, *, check_base: bool = True) -> nn.Module:
    """Write the adapter's slices into ``model`` (in place; returns it). Refused, before any weight changes, when the
    model's shape differs from the adapter's base or (``check_base``) its embeddings are not the base's."""
    record, tensors = read_adapter(path)
    want, got = record["base_shape"], _shape(model)
    diff = [k for k in SHAPE_FIELDS if want.get(k) != got.get(k)]
    if diff:
        what = ", ".join(f"{k} {want.get(k)} there, {got.get(k)} here" for k in diff)
        raise UsageError(f"adapter: made for a base of another shape ({what})")
    if check_base and base_fingerprint(model) != record["base_fingerprint"]:
        raise UsageError(f"adapter: made for base {record['base']!r}, and this model's token embeddings differ from "
                         "that base's (another model or checkpoint); check_base=False applies it anyway")
    adapter = get_adapter(model)
    by_key = {}
    for s in record["slices"]:
        sl = next((x for x in adapter.head_slices(Head.parse(s["head"]), kv=record["kv"] == "trainable")
                   if x.name == s["name"]), None)
        if sl is None or (sl.dim, sl.index.start, sl.index.stop) != (s["dim"], s["start"], s["stop"]):
            raise UsageError(f"adapter: slice {s['key']} does not exist in this model")
        t = tensors[s["key"]]
        if tuple(t.shape) != tuple(sl.param.narrow(sl.dim, sl.index.start, sl.index.stop - sl.index.start).shape):
            raise UsageError(f"adapter: slice {s['key']} has shape {tuple(t.shape)}, this model's differs")
        by_key[s["key"]] = (sl, t)
    with torch.no_grad():
        for sl, t in by_key.values():
            sl.param.narrow(sl.dim, sl.index.start, sl.index.stop - sl.index.start).copy_(t.to(sl.param.dtype))
    return model


def load_adapted(base, adapter: str | os.PathLike, **load_kwargs) -> nn.Module:
    """``load_model(base, **load_kwargs)`` with the adapter applied (the distilled student)."""

    read_adapter(adapter)  # a bad adapter fails before the base loads
    return apply_adapter(load_model(base, **load_kwargs), adapter)


__all__ = ["apply_adapter", "base_fingerprint", "load_adapted", "read_adapter", "save_adapter"]
