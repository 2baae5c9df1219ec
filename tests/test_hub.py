"""Hugging Face Hub ids (``org/name``) resolve from the local Hugging Face cache, built inside the test."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import make_tiny

from fastcd.loading import load_model, load_tokenizer, spec_of
from fastcd.tokenizer import build_word_tokenizer
from fastcd.zoo import is_hub_id


def _cache(tmp_path, repo="tiny-org/tiny-llama"):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    tok = build_word_tokenizer()
    model = make_tiny("llama", vocab_size=len(tok), seed=3)
    model.save_pretrained(snap)
    tok.save_pretrained(snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return tmp_path / "hub", model, tok


def test_a_hub_id_loads_from_the_local_cache(tmp_path, monkeypatch):
    hub, model, tok = _cache(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("tiny-org/tiny-llama")
    ids = torch.randint(0, len(tok), (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert spec_of("tiny-org/tiny-llama").n_heads == 4
    assert load_tokenizer("tiny-org/tiny-llama").get_vocab() == tok.get_vocab()


def test_a_hub_id_absent_offline_is_one_line_naming_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"model 'no-org/no-model': not a local path, and not in the Hugging "
                                                r"Face cache \(.*empty\) while HF_HUB_OFFLINE is set"):
        load_model("no-org/no-model")


def test_the_cli_takes_a_hub_id(tmp_path, monkeypatch):
    hub, _, _ = _cache(tmp_path)
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    import os

    p = subprocess.run([sys.executable, "-m", "fastcd", "discover", "--model", "tiny-org/tiny-llama", "--task",
                        "entity-tracking", "--n-boxes", "3", "--method", "attribution", "--n-examples", "8",
                        "--position", "last", "--top-k", "2", "--out", str(tmp_path / "c.json")],
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "c.json").is_file()


@pytest.mark.parametrize("x,want", [("org/name", True), ("Qwen/Qwen2.5-0.5B", True), ("./org/name", False),
                                    ("/abs/path", False), ("a/b/c", False), ("org/../x", False), ("name", False)])
def test_what_counts_as_a_hub_id(x, want):
    assert is_hub_id(x) is want
