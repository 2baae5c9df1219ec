import os
import random

import pytest
import torch

# Triton kernels run on CPU under the interpreter; it must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# No test reaches the network: a Hugging Face Hub id resolves from the local cache only (tests/test_hub.py)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Guarded: nothing touches CUDA at import beyond this availability query.
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

VOCAB = 211


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


def make_tiny(arch: str, *, n_layers: int = 2, seed: int = 0, vocab_size: int = VOCAB):
    """A tiny random causal LM of one architecture (real sizes in comments: Llama-3.2-1B)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,  # 2048
        intermediate_size=64,  # 8192
        num_hidden_layers=n_layers,  # 16
        num_attention_heads=4,  # 32
        num_key_value_heads=2,  # 8 (GQA)
        max_position_embeddings=128,
        attn_implementation="eager",
    )
    if arch == "llama":
        m = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "mistral":
        m = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif arch == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "qwen3":
        m = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=8))
    elif arch == "gemma3":  # mixed layer types: every second layer a sliding window of 4
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        m = Gemma3ForCausalLM(Gemma3TextConfig(
            **{**common, "attn_implementation": "eager"}, head_dim=8, sliding_window=4,
            layer_types=(["sliding_attention", "full_attention"] * n_layers)[:n_layers]))
    elif arch == "gpt2":
        m = GPT2LMHeadModel(
            GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=n_layers, n_head=4, n_positions=128,
                       bos_token_id=0, eos_token_id=0,
                       attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        )
    else:
        raise ValueError(arch)
    return m.eval()


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]


@pytest.fixture(params=ARCHS)
def tiny_model(request):
    return make_tiny(request.param)


@pytest.fixture(scope="session")
def tok():
    """The shipped word-level tokenizer (the toy tasks' vocabulary)."""
    from fastcd.tokenizer import build_word_tokenizer

    return build_word_tokenizer()


@pytest.fixture(scope="session")
def word_tokenizer():
    from fastcd.tokenizer import build_word_tokenizer

    return build_word_tokenizer()


def crash_after_first_save(monkeypatch):
    """Make the next ``distill`` die (KeyboardInterrupt) right after writing its first checkpoint; the one after
    that saves normally again."""
    import fastcd.pipeline as D

    real = D.save_checkpoint

    def crash(*args):
        real(*args)
        monkeypatch.setattr(D, "save_checkpoint", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(D, "save_checkpoint", crash)
