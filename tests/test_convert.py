"""GGUF files (fastcd.convert): their metadata read without any weight, the architecture checked before a load,
and paths that are not a model refused in one line (the real GGUF's load, conversion and truncation:
test_real_models.py)."""

import json

import numpy as np
import pytest

from fastcd.convert import check_architecture, find_gguf, gguf_info
from fastcd.loading import load_model


def _write_gguf(path, arch: str, name: str, n_tensors: int = 2):
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.add_name(name)
    for i in range(n_tensors):
        w.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_metadata_without_weights(tmp_path):
    p = _write_gguf(tmp_path / "m.gguf", "qwen2", "Tiny Qwen", n_tensors=3)
    info = gguf_info(p)
    assert {k: info[k] for k in ("architecture", "model_type", "name", "n_tensors")} == {
        "architecture": "qwen2", "model_type": "qwen2", "name": "Tiny Qwen", "n_tensors": 3}
    assert info["bytes"] == p.stat().st_size
    assert check_architecture(p) == "qwen2"
    assert check_architecture(tmp_path) == "qwen2"  # a directory holding one GGUF file
    # llama.cpp writes Mistral models as architecture llama: the name tells them apart
    assert gguf_info(_write_gguf(tmp_path / "mi.gguf", "llama", "Mistral-7B-v0.3"))["model_type"] == "mistral"
    assert gguf_info(_write_gguf(tmp_path / "gemma.gguf", "gemma3", "g"))["model_type"] == "gemma3_text"


def test_an_unsupported_gguf_architecture_is_refused_before_any_load(tmp_path):
    p = _write_gguf(tmp_path / "rwkv.gguf", "rwkv6", "RWKV")
    with pytest.raises(ValueError, match=r"path: unsupported architecture 'rwkv6' \(from GGUF metadata\)"):
        check_architecture(p)
    with pytest.raises(ValueError, match="student: unsupported architecture 'rwkv6'"):
        check_architecture(p, what="student")


def test_model_paths_and_architecture_are_checked_before_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a GGUF file"):
        find_gguf(tmp_path / "missing")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        find_gguf(tmp_path / "w.bin")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json and no .gguf file"):
        load_model(empty)
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"GGUF")
    (two / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="holds 2 GGUF files"):
        load_model(two)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        check_architecture(junk)
    other = tmp_path / "mamba"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match="unsupported architecture 'mamba' \\(from config.json\\)"):
        load_model(other)  # no weights exist: the error comes before any load
