"""A distillation run's identity and its checkpoint: what a checkpoint must agree on to be resumed, checked in two
phases (what needs no weights before any model loads, the models after), and messages a user can act on.

The identity holds the config fields a run depends on, the task, the models (or cache), the matching, and the
data the run actually uses: a content hash of the training, validation and test prompts and answers as generated
or read, with one short hash per training prompt so that a change is described ("3 of 64 changed (first: prompt
12)"), not only flagged. A task that reads a file lazily, when it generates, is caught too.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict

import torch

from fastcd.config import DistillConfig
from fastcd.errors import UsageError
from fastcd.io import atomic_target, short_sha, status_once, write_json_atomic
from fastcd.training import BATCH_ORDER

EARLY = ("config", "task", "data", "teacher_cache")  # checked before any model loads
SPLIT_WORDS = {"train": "training prompts", "val": "validation prompts", "test": "test prompts"}


def cfg_key(cfg: DistillConfig) -> dict:
    """The config fields a checkpoint depends on: not where it is written, how often it logs, evaluates or saves,
    nor ``steps`` (a run may be extended), nor ``micro_batch_size`` or ``gradient_checkpointing`` (exact: the same
    gradients)."""
    d = asdict(cfg)
    for k in ("progress", "out", "overwrite", "resume", "steps", "log_every", "eval_every", "save_every", "n_eval",
              "n_val", "device", "impl", "report_to", "early_stopping_patience", "circuit_eval", "micro_batch_size",
              "gradient_checkpointing"):
        d.pop(k, None)
    d["path_k"] = list(d["path_k"])
    return d


sha = short_sha


def fingerprint(x) -> str | None:
    """A model or cache path (resolved), or for a module: its class, config and first parameter values."""
    if x is None:
        return None
    if isinstance(x, (str, os.PathLike)):
        p = os.fspath(x)
        return os.path.realpath(p) if os.path.exists(p) else p
    h = hashlib.sha1(type(x).__name__.encode())
    conf = getattr(x, "config", None)
    if conf is not None and hasattr(conf, "to_dict"):
        h.update(json.dumps(conf.to_dict(), sort_keys=True, default=str).encode())
    for p in list(x.parameters())[:4]:
        h.update(p.detach().float().flatten()[:4096].cpu().numpy().tobytes())
    return "module:" + h.hexdigest()[:16]


def _example_key(ex) -> list:
    """What a run reads of one example (a clean/corrupt pair: both prompts and answers)."""
    if hasattr(ex, "clean"):
        return [_example_key(ex.clean), _example_key(ex.corrupt)]
    return [ex.prompt, ex.answer, ex.meta.get("spans")]


def data_identity(splits: dict) -> dict:
    """``{split: {"n", "sha", "items"?}}`` over the examples (or pairs) of each split; ``items`` (one 8-character
    hash per example) for the training split, to say which prompts changed."""
    out = {}
    for name, examples in splits.items():
        keys = [sha(_example_key(e))[:8] for e in examples]
        out[name] = {"n": len(keys), "sha": sha(keys), **({"items": keys} if name == "train" else {})}
    return out


def describe_data_diff(old: dict, new: dict) -> list[str]:
    """Lines a user can act on: per split, how many examples changed and the first one."""
    lines = []
    for name in sorted(set(old) | set(new), key=lambda s: list(SPLIT_WORDS).index(s) if s in SPLIT_WORDS else 9):
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        what = SPLIT_WORDS.get(name, name)
        if a is None or b is None or a["n"] != b["n"]:
            lines.append(f"{what} differ: {None if a is None else a['n']} there, {None if b is None else b['n']} now")
        elif "items" in a and "items" in b:
            changed = [i for i, (x, y) in enumerate(zip(a["items"], b["items"])) if x != y]
            lines.append(f"{what} differ: {len(changed)} of {b['n']} changed (first: prompt {changed[0]})")
        else:
            lines.append(f"{what} differ (same number, {b['n']}, other content)")
    return lines


def read_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated zip, pickle garbage, ...: one line
        raise UsageError(f"out: {path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]}); delete it, or pass overwrite=True (--overwrite) to "
                         "start over") from None


def check_checkpoint(state: dict, path: str, identity: dict, cfg: DistillConfig, keys=None) -> dict:
    """Check that the checkpoint ``state`` (read from ``path``) belongs to this run, on ``keys`` of the identity
    (default: all); one line naming every difference. Returns ``state``."""
    old = state.get("identity")
    if not isinstance(old, dict):
        raise UsageError(f"out: {path} was written by an older fastcd without a run identity; use another out or "
                         "overwrite=True (--overwrite)")
    diffs, data_lines = [], []
    for k in keys or identity:
        if k == "config":
            for f in sorted(set(old["config"]) | set(identity["config"])):
                if old["config"].get(f) != identity["config"].get(f) and f != "micro_batch_size":
                    diffs.append((f, old["config"].get(f), identity["config"].get(f)))
        elif k == "data":
            if "data" not in old:
                data_lines.append("the checkpoint records no data identity (made by an older fastcd)")
            else:
                data_lines += describe_data_diff(old["data"], identity["data"])
        elif old.get(k) != identity.get(k) and not (k == "matching" and identity.get(k) is None):
            diffs.append((k, old.get(k), identity.get(k)))
    if diffs or data_lines:
        detail = "; ".join(data_lines + [f"{k}: {a!r} there, {b!r} now" for k, a, b in diffs[:4]])
        names = (["data"] if data_lines else []) + [d[0] for d in diffs]
        raise UsageError(f"out: {path} belongs to a run that differs in {names} ({detail}); use another out, or "
                         "overwrite=True (--overwrite) to start over")
    if state.get("batch_order") != BATCH_ORDER:
        raise UsageError(f"out: {path} was written by a fastcd that drew batches with replacement; its run cannot "
                         "go on with the same batches: use another out, or overwrite=True (--overwrite) to start over")
    if state["step"] > cfg.steps:
        raise UsageError(f"out: {path} is at step {state['step']}, past steps={cfg.steps}; raise steps to extend "
                         "the run, or overwrite=True (--overwrite) to start over")
    return state


def save_checkpoint(state: dict, out: str, identity: dict, step: int) -> None:
    """``OUT/ckpt.pt``, then ``OUT/manifest.json`` describing it: the manifest never names a checkpoint that is
    not there (a kill between the two leaves the previous manifest, which a resume does not read)."""
    with atomic_target(os.path.join(out, "ckpt.pt")) as tmp:
        torch.save(state, tmp)

    write_json_atomic({"identity": identity, "step": step}, os.path.join(out, "manifest.json"))


def training_state(cd, opt, sched, **extra) -> dict:
    """What a run needs to go on exactly where it stopped: the trainable slices, the optimizer and schedule, every
    random generator, the calibrated lambda and the batch order; ``extra`` (step, log, ...) beside them."""
    return {"params": [p.detach().clone() for p in cd.trainable_parameters()], "optimizer": opt.state_dict(),
            "scheduler": None if sched is None else sched.state_dict(), "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "lam": cd.calibrated_lam, "batch_order": BATCH_ORDER, **extra}


def restore_training_state(cd, opt, sched, state: dict) -> None:
    """Put :func:`training_state`'s ``state`` back into a fresh distiller, optimizer and schedule."""
    with torch.no_grad():
        for p, v in zip(cd.trainable_parameters(), state["params"], strict=True):
            p.copy_(v)
    opt.load_state_dict(state["optimizer"])
    if state.get("scheduler") is not None:
        sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])  # dropout and any other use of the global generator
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if state.get("python_rng") is not None:
        random.setstate(state["python_rng"])
    cd.calibrated_lam = state.get("lam")


def announce_resume(path: str, step: int, steps: int) -> None:
    status_once(f"resuming from step {step} of {steps} ({path})")


__all__ = ["EARLY", "announce_resume", "cfg_key", "check_checkpoint", "data_identity", "describe_data_diff",
           "fingerprint", "read_checkpoint", "restore_training_state", "save_checkpoint", "sha", "training_state"]
