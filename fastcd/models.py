"""Model adapters: where the heads live in a Hugging Face causal LM (loading is :mod:`fastcd.loading`).

An adapter answers, for one architecture family: the decoder layers, the attention output projection
whose *input* is the per-head output z (``[batch, pos, n_heads * d_head]``), the head counts (GQA
included) and the parameter slices that belong to one head.
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from fastcd.errors import UsageError, UsageTypeError

logger = logging.getLogger("fastcd")

# model_type -> adapter family. Llama-like families share module names (self_attn.{q,k,v,o}_proj).
_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")  # each tested on a tiny random config
_GPT2_LIKE = ("gpt2",)
SUPPORTED_ARCHITECTURES = tuple(sorted(_LLAMA_LIKE + _GPT2_LIKE))


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64,
}


def parse_dtype(dtype) -> torch.dtype | None:
    """A dtype argument: None, a torch.dtype, or one of the names in ``_DTYPES`` (float32, bf16, ...)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise UsageError(f"dtype must be a torch.dtype or one of {sorted(_DTYPES)}, got {dtype!r}")


class Head(NamedTuple):
    """One attention head: ``Head(layer, head)``, printed ``L{layer}H{head}``."""

    layer: int
    head: int

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}"

    @classmethod
    def parse(cls, name: str) -> Head:
        """``Head.parse("L3H8") == Head(3, 8)``."""
        import re

        m = re.fullmatch(r"L(\d+)H(\d+)", name.strip())
        if m is None:
            raise UsageError(f"head name must look like 'L3H8', got {name!r}")
        return cls(int(m.group(1)), int(m.group(2)))


@dataclass(frozen=True)
class ModelSpec:
    """Shape facts of a causal LM."""

    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    vocab_size: int

    @property
    def n_total_heads(self) -> int:
        return self.n_layers * self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without GQA)."""
        return self.n_heads // self.n_kv_heads

    def check_head(self, head: Head, name: str = "head") -> Head:
        if not isinstance(head, tuple) or len(head) != 2:
            raise UsageTypeError(f"{name} must be a Head(layer, head), got {head!r}")
        head = Head(int(head[0]), int(head[1]))
        if not (0 <= head.layer < self.n_layers and 0 <= head.head < self.n_heads):
            raise UsageError(
                f"{name} {head} is out of range for this model: {self.n_layers} layers x {self.n_heads} heads "
                f"(layers 0..{self.n_layers - 1}, heads 0..{self.n_heads - 1})"
            )
        return head

    def all_heads(self) -> list[Head]:
        return [Head(l, h) for l in range(self.n_layers) for h in range(self.n_heads)]


class ParamSlice(NamedTuple):
    """``param`` restricted to ``index`` along ``dim``: the part of a weight that belongs to one head."""

    name: str
    param: nn.Parameter
    dim: int
    index: slice


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP / ``torch.compile`` wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "config"):
        model = model.module
    return getattr(model, "_orig_mod", model)


class ModelAdapter:
    """Finds layers, projections and head slices in one architecture family."""

    def __init__(self, model: nn.Module):
        self.model = unwrap(model)
        cfg = getattr(self.model, "config", None)
        if cfg is None:
            raise UsageTypeError(
                f"model must be a Hugging Face PreTrainedModel with a .config, got {type(model).__name__}"
            )
        self.config = cfg
        self.spec = self._spec()

    # --- per family --------------------------------------------------------------------------------
    def layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def o_proj(self, layer: int) -> nn.Module:
        raise NotImplementedError

    def head_slices(self, head: Head, *, kv: bool = False) -> list[ParamSlice]:
        raise NotImplementedError

    def qkv_output(self, layer: int, which: str, head: int) -> tuple[nn.Module, slice]:
        raise NotImplementedError

    #: whether :meth:`start_at_layer` works (the embeddings go in as ``inputs_embeds`` unchanged)
    supports_layer_skip = False

    @contextmanager
    def start_at_layer(self, layer: int):
        """Within the block, ``model(inputs_embeds=h)`` runs only decoder layers ``layer..L-1`` on the residual
        stream ``h`` (the input of decoder layer ``layer``). Used to skip the clean prefix of patched runs."""
        raise NotImplementedError(f"{type(self).__name__} cannot start a forward at a middle layer")

    def head_write(self, head: Head, z: torch.Tensor) -> torch.Tensor:
        """The head's write into the residual stream, ``W_O[:, h] z_h`` (no bias).

        ``[..., d_head] -> [..., d_model]``.
        """
        s = self.spec
        head = s.check_head(head)
        w = self.o_proj(head.layer).weight
        cols = slice(head.head * s.d_head, (head.head + 1) * s.d_head)
        if isinstance(self, GPT2Adapter):  # Conv1D weight is [in, out]
            return z @ w[cols, :]
        return z @ w[:, cols].T

    def _spec(self) -> ModelSpec:
        raise NotImplementedError


class LlamaLikeAdapter(ModelAdapter):
    """Llama, Mistral, Qwen2, Qwen3: ``model.model.layers[i].self_attn.{q,k,v,o}_proj``."""

    def qkv_output(self, layer: int, which: str, head: int) -> tuple[nn.Module, slice]:
        """The module whose output holds ``which`` (q/k/v) for query head ``head`` and the slice of its last dim.

        For k/v under GQA the slice is the head's KV group, shared with the other heads of the group.
        """
        s = self.spec
        attn = self.attn(layer)
        if which == "q":
            return attn.q_proj, slice(head * s.d_head, (head + 1) * s.d_head)
        g = head // s.group_size
        return getattr(attn, f"{which}_proj"), slice(g * s.d_head, (g + 1) * s.d_head)

    def _spec(self) -> ModelSpec:
        c = self.config
        n_heads = c.num_attention_heads
        n_kv = getattr(c, "num_key_value_heads", None) or n_heads
        d_head = getattr(c, "head_dim", None) or c.hidden_size // n_heads
        return ModelSpec(c.model_type, c.num_hidden_layers, n_heads, n_kv, d_head, c.hidden_size, c.vocab_size)

    @property
    def supports_layer_skip(self) -> bool:
        """Starting a forward at layer l slices the layer list; models that pick each layer's attention mask and
        RoPE by its index in ``config.layer_types`` (Gemma3, Qwen2/3 with sliding layers) then give layer l the
        type of layer 0. Skipping is kept only when every layer has one type."""
        types = getattr(self.config, "layer_types", None)
        return not types or len(set(types)) == 1

    def layers(self) -> list[nn.Module]:
        return list(self.model.model.layers)

    @contextmanager
    def start_at_layer(self, layer: int):
        inner = self.model.model
        orig = inner.layers
        if not 0 <= layer < len(orig):
            raise UsageError(f"layer must be in 0..{len(orig) - 1}, got {layer}")
        inner.layers = nn.ModuleList(list(orig)[layer:])  # the hooks live on the modules, so they still fire
        try:
            yield
        finally:
            inner.layers = orig

    def attn(self, layer: int) -> nn.Module:
        return self.layers()[layer].self_attn

    def o_proj(self, layer: int) -> nn.Module:
        return self.attn(layer).o_proj

    def head_slices(self, head: Head, *, kv: bool = False) -> list[ParamSlice]:
        s = self.spec
        head = s.check_head(head)
        attn = self.attn(head.layer)
        q = slice(head.head * s.d_head, (head.head + 1) * s.d_head)
        out = [
            ParamSlice(f"{head}.q_proj.weight", attn.q_proj.weight, 0, q),
            ParamSlice(f"{head}.o_proj.weight", attn.o_proj.weight, 1, q),
        ]
        if getattr(attn.q_proj, "bias", None) is not None:
            out.append(ParamSlice(f"{head}.q_proj.bias", attn.q_proj.bias, 0, q))
        if kv:
            g = head.head // s.group_size
            kvs = slice(g * s.d_head, (g + 1) * s.d_head)
            for name in ("k_proj", "v_proj"):
                mod = getattr(attn, name)
                out.append(ParamSlice(f"{head}.{name}.weight", mod.weight, 0, kvs))
                if getattr(mod, "bias", None) is not None:
                    out.append(ParamSlice(f"{head}.{name}.bias", mod.bias, 0, kvs))
        return out


class GPT2Adapter(ModelAdapter):
    """GPT-2: ``transformer.h[i].attn.c_attn`` (fused qkv, Conv1D ``[d_model, 3*d_model]``) and ``c_proj``."""

    def _spec(self) -> ModelSpec:
        c = self.config
        return ModelSpec(c.model_type, c.n_layer, c.n_head, c.n_head, c.n_embd // c.n_head, c.n_embd, c.vocab_size)

    def layers(self) -> list[nn.Module]:
        return list(self.model.transformer.h)

    def o_proj(self, layer: int) -> nn.Module:
        return self.layers()[layer].attn.c_proj

    def qkv_output(self, layer: int, which: str, head: int) -> tuple[nn.Module, slice]:
        s = self.spec
        off = {"q": 0, "k": 1, "v": 2}[which] * s.d_model
        return self.layers()[layer].attn.c_attn, slice(off + head * s.d_head, off + (head + 1) * s.d_head)

    def head_slices(self, head: Head, *, kv: bool = False) -> list[ParamSlice]:
        s = self.spec
        head = s.check_head(head)
        attn = self.layers()[head.layer].attn
        q = slice(head.head * s.d_head, (head.head + 1) * s.d_head)
        # Conv1D stores weight as [in, out]: q columns are the head's outputs; c_proj rows are its inputs.
        out = [
            ParamSlice(f"{head}.c_attn.weight[q]", attn.c_attn.weight, 1, q),
            ParamSlice(f"{head}.c_attn.bias[q]", attn.c_attn.bias, 0, q),
            ParamSlice(f"{head}.c_proj.weight", attn.c_proj.weight, 0, q),
        ]
        if kv:
            for i, name in ((1, "k"), (2, "v")):
                sl = slice(i * s.d_model + q.start, i * s.d_model + q.stop)
                out.append(ParamSlice(f"{head}.c_attn.weight[{name}]", attn.c_attn.weight, 1, sl))
                out.append(ParamSlice(f"{head}.c_attn.bias[{name}]", attn.c_attn.bias, 0, sl))
        return out


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s architecture; a clear error for an unsupported one."""
    inner = unwrap(model)
    cfg = getattr(inner, "config", None)
    if cfg is None:
        raise UsageTypeError(
            f"model must be a Hugging Face PreTrainedModel with a .config, got {type(model).__name__}"
        )
    model_type = getattr(cfg, "model_type", None)
    if model_type in _LLAMA_LIKE:
        return LlamaLikeAdapter(inner)
    if model_type in _GPT2_LIKE:
        return GPT2Adapter(inner)
    raise UsageError(
        f"model: unsupported architecture {model_type!r} ({type(inner).__name__}); "
        f"supported model_type values: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def model_spec(model: nn.Module) -> ModelSpec:
    return get_adapter(model).spec


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (checked once per model class: on the hot path)."""
    return _class_accepts_logits_to_keep(type(unwrap(model)))


@functools.cache
def _cache_argument(cls) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


@functools.cache
def _class_accepts_logits_to_keep(cls) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False


PREFIX_MIN = 32  # shared leading tokens worth a forward of their own (FASTCD_PREFIX_REUSE=0: never)


def shared_prefix_length(input_ids: torch.Tensor) -> int:
    """How many leading tokens every row of ``input_ids`` [n, T] shares (0 for a single row)."""
    if input_ids.dim() != 2 or input_ids.shape[0] < 2:
        return 0
    return int((input_ids == input_ids[:1]).all(0).long().cumprod(0).sum())


@dataclass
class SharedPrefix:
    """The keys and values of the ``length`` leading tokens that every row shares, computed once (batch 1) and
    repeated over the batch (:func:`shared_prefix`); one forward of the suffixes consumes it."""

    length: int
    cache: object

    def shift(self, positions: dict) -> dict:
        """Token positions in the full prompts -> positions in the suffixes (what a capture there indexes)."""
        return {k: v - self.length for k, v in positions.items()}


def shared_prefix(model: nn.Module, input_ids: torch.Tensor, reads, length: int | None = None, *,
                  train: bool = False) -> SharedPrefix | None:
    """Run the shared prefix of ``input_ids`` [n, T] once, or None where reuse is not exact or not worth it.

    Exact for causal attention when the forward takes ``input_ids`` alone and every position read (``reads``:
    tensors of positions: logits, captured z) lies after the prefix; worth it for ``PREFIX_MIN`` or more shared
    tokens. No hook may be on the model now (an intervention would change the prefix's keys and values); hooks
    installed afterwards see only the suffixes, so a capture is indexed by :meth:`SharedPrefix.shift` positions.
    ``length`` caps the prefix (where exactness was checked up to there). ``train``: the forward may keep its
    graph (a training step): the prefix runs once on it and its keys and values are repeated over the batch, so
    every row's gradient flows back through the one prefix forward, summed, as the full forward's would (not with
    gradient checkpointing, which turns the cache off). ``FASTCD_PREFIX_REUSE=0`` turns it off."""
    import os

    if os.environ.get("FASTCD_PREFIX_REUSE") == "0" or not accepts_logits_to_keep(model):
        return None
    if torch.is_grad_enabled() and (not train or any(getattr(m, "gradient_checkpointing", False) is True
                                                     for m in unwrap(model).modules())):
        return None
    p = shared_prefix_length(input_ids) if length is None else min(length, shared_prefix_length(input_ids))
    if p < PREFIX_MIN or min(int(r.min()) for r in reads) < p:
        return None
    if any(m._forward_pre_hooks or m._forward_hooks for m in model.modules()):
        return None
    return run_prefix(model, input_ids, p)


def run_prefix(model: nn.Module, input_ids: torch.Tensor, length: int) -> SharedPrefix:
    """One forward of ``input_ids[:1, :length]`` (batch 1, under the model's hooks, on the graph when grad is on),
    its keys and values repeated over the batch: :func:`shared_prefix` once reuse is checked exact, or a caller
    that applies the same intervention to every row's prefix (the circuit search's soft masks)."""
    name = _cache_argument(type(unwrap(model)))  # transformers >= 5.25 names it `cache`, before `past_key_values`
    cache = model(input_ids=input_ids[:1, :length], use_cache=True, logits_to_keep=1)[name]
    cache.batch_repeat_interleave(input_ids.shape[0])
    return SharedPrefix(length, cache)


def logits_at(model: nn.Module, positions: torch.Tensor, *, prefix: SharedPrefix | None = None, **forward_kwargs):
    """``model(**forward_kwargs)`` with the lm_head applied only where logits are read.

    Row ``i``'s logits at ``positions[i]``: ``[n, vocab]``. Uses ``logits_to_keep`` (the unique positions of the
    batch, usually one for equal-length prompts), so the ``[n, T, vocab]`` tensor is never built; models without
    ``logits_to_keep`` fall back to the full logits. Returns ``(logits [n, vocab], output)``; ``output.logits``
    holds only the kept positions.

    Shared-prefix reuse: in a no-grad forward of ``input_ids`` alone, with no hooks on the model, when every row
    starts with the same ``PREFIX_MIN`` or more tokens (few-shot prompts: instruction and shots), the prefix runs
    once and only the suffixes run over the batch, with its cached keys and values (exact up to float rounding;
    ``FASTCD_PREFIX_REUSE=0`` turns it off). ``prefix``: a :func:`shared_prefix` made before hooks went on (a
    capture then sees the suffixes only).
    """
    mod = forward_kwargs.get("input_ids", forward_kwargs.get("inputs_embeds"))
    device = mod.device
    n = mod.shape[0]
    pos = positions.to(device).long().reshape(-1)
    if pos.shape[0] != n:
        raise UsageError(f"positions must hold one position per row ({n}), got {pos.shape[0]}")
    rows = torch.arange(n, device=device)
    if prefix is None and set(forward_kwargs) == {"input_ids"}:
        prefix = shared_prefix(model, forward_kwargs["input_ids"], [pos])
    if prefix is not None:
        if set(forward_kwargs) != {"input_ids"} or prefix.cache is None or int(pos.min()) < prefix.length:
            raise UsageError("prefix: a shared prefix serves one forward of input_ids alone, read after the prefix")
        uniq, inv = torch.unique(pos - prefix.length, return_inverse=True)
        name = _cache_argument(type(unwrap(model)))
        cache, prefix.cache = prefix.cache, None  # the suffixes' forward extends it: never reused
        out = model(input_ids=forward_kwargs["input_ids"][:, prefix.length:], use_cache=True, logits_to_keep=uniq,
                    **{name: cache})
        return out.logits[rows, inv], out
    if accepts_logits_to_keep(model):
        uniq, inv = torch.unique(pos, return_inverse=True)
        out = model(**forward_kwargs, logits_to_keep=uniq)
        return out.logits[rows, inv], out
    out = model(**forward_kwargs)
    return out.logits[rows, pos], out
