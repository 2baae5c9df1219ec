"""fastcd: circuit distillation for Hugging Face causal LMs.

Find the teacher's circuit, match functionally corresponding student heads, and train only those heads
with task CE + lambda * sum over pairs (1 - CKA(student head, teacher head)) (Wadhwa, Amir, Wallace 2025).
Nothing here touches CUDA at import time.
"""

__version__ = "0.1.0"

from fastcd import _ext  # noqa: E402, F401  (warns once when the C++ extension is missing)
from fastcd._ext import HAS_CPP  # noqa: E402
from fastcd.hooks import ZCache, ablate, capture_z, intervene, mean_z, patch, run_with_z  # noqa: E402
from fastcd.models import (  # noqa: E402
    SUPPORTED_ARCHITECTURES,
    Head,
    ModelSpec,
    get_adapter,
    load_model,
    load_tokenizer,
    logits_at,
    model_spec,
    spec_of,
)
from fastcd.tasks import EntityTracking, TheoryOfMind, adapt_task, get_task  # noqa: E402
from fastcd.tokenizer import build_word_tokenizer  # noqa: E402


def __getattr__(name):
    # the training driver is imported on first use (it pulls scipy, safetensors, tqdm)
    import importlib

    if name in ("distill", "DistillConfig", "CircuitDistiller", "DistillResult"):
        return getattr(importlib.import_module("fastcd.distillation"), name)
    if name == "convert_gguf":
        return importlib.import_module("fastcd.convert").convert_gguf
    if name == "zoo":
        return importlib.import_module("fastcd.zoo")
    raise AttributeError(f"module 'fastcd' has no attribute {name!r}")

__all__ = [
    "CircuitDistiller", "DistillConfig", "EntityTracking", "HAS_CPP", "Head", "ModelSpec", "SUPPORTED_ARCHITECTURES",
    "TheoryOfMind", "ZCache", "__version__", "ablate", "adapt_task", "build_word_tokenizer", "capture_z",
    "convert_gguf", "distill", "get_adapter", "get_task", "intervene", "load_model", "load_tokenizer", "logits_at",
    "mean_z", "model_spec", "patch", "run_with_z", "spec_of", "zoo",
]
