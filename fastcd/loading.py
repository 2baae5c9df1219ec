"""Offline loading: local Hugging Face directories (or modules) into models and tokenizers, with checks that
need no weights first (path, architecture, weight files: seconds, before a 1.5B model takes minutes), the
attention implementation, dtypes, devices and the memory budget for batched passes."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os

import torch
from torch import nn

from fastcd import zoo
from fastcd.convert import check_architecture, find_gguf, load_gguf_model, load_gguf_tokenizer
from fastcd.errors import InputFileError, UsageError, UsageTypeError
from fastcd.io import status_once
from fastcd.models import ModelSpec, get_adapter, model_spec, parse_dtype  # noqa: F401  (parse_dtype: re-exported)
from fastcd.vocab import DEVICE_MAPS

logger = logging.getLogger("fastcd")

def has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def pick_attn_implementation(device: str | torch.device | None) -> str:
    """``flash_attention_2`` when flash-attn is installed and the device is CUDA, ``sdpa`` otherwise."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and has_flash_attn():
        return "flash_attention_2"
    return "sdpa"


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


def check_model_path(path_or_name, what: str = "path", *, weights: bool = True) -> str:
    """Resolve a model argument (directory, GGUF file, packaged model name) and check, before anything loads,
    that it exists, names a supported architecture and (for a Hugging Face directory) holds weights. Errors name
    ``what`` (e.g. ``"teacher"``). Returns the resolved path. A :class:`ModelRef` was resolved and checked where it
    entered: only its weights are checked, once."""
    if isinstance(path_or_name, ModelRef):
        if weights:
            path_or_name.check_weights()
        return path_or_name.path
    path = os.fspath(zoo.resolve(os.fspath(path_or_name)))
    if not os.path.exists(path):
        raise InputFileError(
            f"{what}: {path!r} is not a local directory or GGUF file (nor a Hugging Face Hub id 'org/name', "
            f"nor a packaged model: {', '.join(zoo.MODELS)})"
        )
    gguf = find_gguf(path, what)
    check_architecture(path, what)  # from config.json / GGUF metadata, before any weight loads
    if weights:
        _check_weights(path, gguf, what)
    return path


def _check_weights(path: str, gguf: str | None, what: str) -> None:
    if gguf is None and not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES) and not any(
            f.endswith(".safetensors") for f in os.listdir(path)):
        raise InputFileError(f"{what}: {path!r} has a config.json but no weights (model.safetensors, "
                             "pytorch_model.bin or their sharded index)")


class ModelRef(os.PathLike):
    """A model argument (directory, GGUF file, packaged name, Hub id) resolved and checked once, at the entry
    point (:func:`resolve_model`): where it lives (``path``, ``gguf``), what the user called it (``name``), and,
    computed on first use and kept, its ``spec``, ``stored_dtype``, ``identity`` (for resume and provenance) and
    ``tokenizer``.
    It is path-like: every function that takes a model path takes it, and skips the resolution and the checks."""

    def __init__(self, arg, what: str = "model", *, weights: bool = True):
        self.arg, self.what = os.fspath(arg), what
        self.path = check_model_path(self.arg, what, weights=False)
        self.gguf = find_gguf(self.path, what)
        self.name = os.path.basename(os.path.normpath(self.arg))  # as the user named it (a packaged name stays)
        self._weights_checked = False
        if weights:
            self.check_weights()

    def check_weights(self) -> None:
        """One line naming ``what`` when the directory holds no weights (once; cheap: a directory listing)."""
        if not self._weights_checked:
            _check_weights(self.path, self.gguf, self.what)
            self._weights_checked = True

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"ModelRef({self.arg!r} -> {self.path!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ModelRef) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    @functools.cached_property
    def spec(self) -> ModelSpec:
        return _spec_from(self.path, self.gguf)

    @functools.cached_property
    def identity(self) -> str | None:
        return model_identity(self.path)

    @functools.cached_property
    def tokenizer(self):
        return load_tokenizer(self.path, self.what)

    @functools.cached_property
    def stored_dtype(self) -> str | None:
        """The dtype the weights are stored in (config.json's ``dtype`` / ``torch_dtype``); None for a GGUF file
        (quantized; dequantized to float32 unless ``load_model(dtype=...)`` says otherwise) or when unrecorded."""
        if self.gguf is not None:
            return None
        with open(os.path.join(self.path, "config.json"), encoding="utf-8") as f:
            conf = json.load(f)
        return conf.get("dtype") or conf.get("torch_dtype")


def resolve_model(arg, what: str = "model", *, weights: bool = True):
    """``arg`` as a :class:`ModelRef` (resolved and checked once; one line naming ``what`` if it is not a model);
    a module or a ModelRef is returned as it is. ``weights=False`` checks the config only (an entry point that
    checks its other arguments first calls ``check_model_path(ref)`` before anything loads)."""
    if isinstance(arg, (ModelRef, nn.Module)):
        return arg
    if not isinstance(arg, (str, os.PathLike)):
        raise UsageTypeError(f"{what} must be a model directory, GGUF file, packaged model name, Hub id or an "
                             f"nn.Module, got {type(arg).__name__}")
    return ModelRef(arg, what, weights=weights)


def model_identity(path_or_name) -> str | None:
    """What a model directory or GGUF file holds, cheaply (no weights loaded): a hash of its config (without
    ``_name_or_path``) and of 16 chunks of 64 KiB spread over each weight file, with their sizes. A copy of the same
    checkpoint elsewhere has the same identity; a fine-tuned one (same shapes, other weights) does not. None for a
    module or a path that does not resolve."""
    import hashlib


    if isinstance(path_or_name, ModelRef):
        return path_or_name.identity
    if not isinstance(path_or_name, (str, os.PathLike)):
        return None
    try:
        path = os.fspath(zoo.resolve(os.fspath(path_or_name)))
    except (InputFileError, UsageError):
        return None
    h = hashlib.sha1()
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            conf = json.load(f)
        conf.pop("_name_or_path", None)
        conf.pop("transformers_version", None)
        h.update(json.dumps(conf, sort_keys=True).encode())
        files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
    elif os.path.isfile(path):
        path, files = os.path.dirname(os.path.abspath(path)), [os.path.basename(path)]
    else:
        return None
    for name in files:
        fp, size = os.path.join(path, name), os.path.getsize(os.path.join(path, name))
        h.update(f"{name}:{size}".encode())
        with open(fp, "rb") as f:
            for k in range(16):
                f.seek(size * k // 16)
                h.update(f.read(65536))
    return "model:" + h.hexdigest()[:16]


def load_model(path_or_module, *, dtype=None, device=None, attn_implementation: str | None = None,
               what: str = "path_or_module", device_map=None, max_memory: dict | None = None,
               offload_folder: str | None = None):
    """Load a causal LM from a local Hugging Face directory, a GGUF file, a packaged or Hub model, or take a module.

    Args:
        path_or_module: a directory with ``config.json`` and weights, a ``.gguf`` file (or a directory holding
            exactly one; dequantized, needs ``fastcd[gguf]``), the name of a prepared packaged model
            (``fastcd models``), a Hugging Face Hub id (``org/name``: from the local Hugging Face cache, or
            downloaded unless ``HF_HUB_OFFLINE`` is set), or an ``nn.Module``. The architecture is checked
            (config.json / GGUF metadata) before any weight loads.
        dtype: ``torch.dtype`` or a name (``"bf16"``, ``"float32"`` ...); None keeps the stored dtype (float32
            for GGUF).
        device: where to put the model (default: CPU).
        attn_implementation: override; by default flash-attn when installed and on CUDA, sdpa otherwise.
        what: the argument name used in error messages (``"teacher"``, ``"student"``).
        device_map: spread a model larger than one GPU over the visible devices (accelerate's ``"auto"``,
            ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``, or a ``{module name: device}`` dict); for a
            Hugging Face directory (or a prepared packaged model), not with ``device``. ``max_memory`` and
            ``offload_folder`` go with it to ``from_pretrained`` (CPU RAM or disk for what the GPUs cannot hold).

    Returns:
        The model in eval mode.
    """
    dtype = parse_dtype(dtype)
    if isinstance(path_or_module, nn.Module):
        if device_map is not None:
            raise UsageError(f"device_map: {what} is a module already in memory; pass its directory to have it "
                             "spread over devices, or dispatch it yourself (accelerate.dispatch_model)")
        model = path_or_module
        if dtype is not None or device is not None:
            model = model.to(device=device, dtype=dtype)
        get_adapter(model)  # validate the architecture early
        return model
    if not isinstance(path_or_module, (str, os.PathLike)):
        raise UsageTypeError(f"path_or_module must be a local directory path or an nn.Module, got "
                             f"{type(path_or_module)}")

    check_device(device, "device")
    check_device_map(device_map, device, max_memory, offload_folder)
    ref = resolve_model(path_or_module, what)
    ref.check_weights()
    path, gguf = ref.path, ref.gguf
    if device_map is not None and gguf is not None:
        raise UsageError(f"device_map: {what} is a GGUF file ({gguf}); convert it once (fastcd models prepare, or "
                         "fastcd convert) and pass the Hugging Face directory to spread it over devices")
    from transformers import AutoModelForCausalLM

    impl = attn_implementation or pick_attn_implementation(device)
    status_once(f"fastcd: attention implementation {impl} (flash-attn on CUDA when installed, sdpa otherwise)")
    if gguf is not None:
        model = load_gguf_model(gguf, dtype=dtype, attn_implementation=impl)
    else:
        try:
            placed = {} if device_map is None else {"device_map": device_map, "max_memory": max_memory,
                                                    "offload_folder": offload_folder}
            model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=dtype if dtype is not None else "auto", attn_implementation=impl,
                **placed)
        except Exception as e:  # noqa: BLE001 - SafetensorError has no importable base; others re-raise
            if type(e).__name__ == "SafetensorError" or isinstance(e, OSError):
                raise UsageError(f"{what}: the weights in {path!r} cannot be read ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:150]}); a truncated or partial download?") from None
            raise
    if device is not None:
        model = model.to(device)
    model.eval()
    get_adapter(model)
    return model


def check_device_map(device_map, device=None, max_memory=None, offload_folder=None, what: str = "device_map") -> None:
    """One line for a device map fastcd cannot pass on: an unknown strategy, beside ``device``, or without
    accelerate (what transformers needs to dispatch a model)."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise UsageError(f"max_memory / offload_folder only apply with {what}; set {what} (e.g. 'auto') too")
        return
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise UsageError(f"{what}: expected one of {', '.join(DEVICE_MAPS)} or a {{module name: device}} dict, "
                         f"got {device_map!r}")
    if not isinstance(device_map, (str, dict)):
        raise UsageTypeError(f"{what}: expected a string or a dict, got {type(device_map).__name__}")
    if device is not None:
        raise UsageError(f"{what} ({device_map!r}) places the model itself; leave device unset (got {device!r})")
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise UsageError(f"{what} needs accelerate (transformers dispatches the model with it): pip install accelerate")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids go: its embedding's device (a model spread with ``device_map`` may hold its first
    parameter elsewhere)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    if w is not None and w.device.type != "meta":
        return w.device
    hooked = getattr(emb, "_hf_hook", None)  # offloaded by accelerate: it runs where its hook says
    if hooked is not None and getattr(hooked, "execution_device", None) is not None:
        return torch.device(hooked.execution_device)
    return next(model.parameters()).device


def check_device(device, what: str = "device") -> None:
    """A one-line error for a device this torch cannot use (``cuda`` on a CPU build, a bad name)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"{what}: {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{what}: {device!r} was asked for but this torch ({torch.__version__}) sees no CUDA "
                             "device; leave it unset to run on the CPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{what}: {device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{what}: 'mps' was asked for but MPS is not available here")


def spec_of(path_or_module, what: str = "model") -> ModelSpec:
    """The shape facts of a model without loading its weights (config.json or GGUF metadata), or of a module.
    Errors name ``what``."""
    if isinstance(path_or_module, nn.Module):
        return model_spec(path_or_module)
    if isinstance(path_or_module, ModelRef):
        return path_or_module.spec
    path = check_model_path(path_or_module, what, weights=False)  # config only: no weights needed
    return _spec_from(path, find_gguf(path, what))


def _spec_from(path: str, gguf: str | None) -> ModelSpec:
    from transformers import AutoConfig

    if gguf is None:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    else:
        cfg = AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(gguf)), gguf_file=os.path.basename(gguf),
                                         local_files_only=True)

    class _Shell(nn.Module):
        config = cfg

    return get_adapter(_Shell()).spec


def load_tokenizer(path: str | os.PathLike, what: str = "path"):
    """The tokenizer stored in a local model directory, a GGUF file, a prepared packaged model or a Hub model's
    snapshot (see :func:`load_model`). Errors name ``what``."""
    from transformers import AutoTokenizer

    if isinstance(path, ModelRef):
        return path.tokenizer
    path = os.fspath(zoo.resolve(os.fspath(path)))
    if not os.path.exists(path):
        raise InputFileError(f"{what}: {path!r} is not a local directory or GGUF file")
    gguf = find_gguf(path, what)
    if gguf is not None:
        return load_gguf_tokenizer(gguf)
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise InputFileError(f"{what}: {path!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the "
                             "model's tokenizer there (tokenizer.save_pretrained) or pass one")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
