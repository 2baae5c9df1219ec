"""fastcd: circuit distillation for Hugging Face causal LMs.

Find the teacher's circuit, match functionally corresponding student heads, and train only those heads
with task CE + lambda * sum over pairs (1 - CKA(student head, teacher head)) (Wadhwa, Amir, Wallace 2025).

``import fastcd`` imports nothing heavy: every name below loads its module (and torch) on first use, so the
command line's ``--help`` stays fast. Nothing here touches CUDA at import time.

The modules stand in stages (a module imports only from its own stage or lower ones): README.md, "Layout",
the one table, which tests/test_layers.py checks against the code.
"""

__version__ = "0.1.0"

import importlib as _importlib

_LAZY = {
    "HAS_CPP": "fastcd._ext",
    "ZCache": "fastcd.hooks", "ablate": "fastcd.hooks", "capture_z": "fastcd.hooks", "intervene": "fastcd.hooks",
    "mean_z": "fastcd.hooks", "patch": "fastcd.hooks", "run_with_z": "fastcd.hooks",
    "SUPPORTED_ARCHITECTURES": "fastcd.models", "Head": "fastcd.models", "ModelSpec": "fastcd.models",
    "get_adapter": "fastcd.models", "logits_at": "fastcd.models", "model_spec": "fastcd.models",
    "load_model": "fastcd.loading", "load_tokenizer": "fastcd.loading", "spec_of": "fastcd.loading",
    "resolve_model": "fastcd.loading", "ModelRef": "fastcd.loading",
    "EntityTracking": "fastcd.tasks", "TheoryOfMind": "fastcd.tasks", "Task": "fastcd.tasks",
    "adapt_task": "fastcd.tasks", "get_task": "fastcd.tasks",
    "build_word_tokenizer": "fastcd.tokenizer",
    "Circuit": "fastcd.artifacts", "Matching": "fastcd.artifacts",
    "DistillConfig": "fastcd.config", "METHODS": "fastcd.config",
    "CircuitDistiller": "fastcd.distillation",
    "distill": "fastcd.pipeline", "DistillResult": "fastcd.pipeline",
    "convert_gguf": "fastcd.convert",
}
_MODULES = ("zoo",)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # next time: a plain attribute
        return value
    if name in _MODULES:
        return _importlib.import_module(f"fastcd.{name}")
    raise AttributeError(f"module 'fastcd' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_MODULES))


__all__ = sorted(["__version__", *_LAZY, *_MODULES])
