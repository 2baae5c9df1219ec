"""Per-head capture and interventions on z, the input of the attention output projection.

z at layer l is ``[batch, pos, n_heads * d_head]`` as ``o_proj`` sees it; viewed as
``[batch, pos, n_heads, d_head]`` it is exactly each head's ``softmax(QK^T/sqrt(d)) V`` (TransformerLens'
``hook_z``). Hooks are forward *pre*-hooks on ``o_proj`` (or GPT-2's ``c_proj``), always removed on exit,
also when the body raises.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from fastcd.errors import UsageError
from fastcd.loading import input_device
from fastcd.models import (
    Head,
    ModelSpec,
    accepts_logits_to_keep,
    get_adapter,
    logits_at,
    model_spec,
    shared_prefix,
    unwrap,
)

ALL = "all"  # position role: every position


def role_positions(batch, role: str | None) -> torch.Tensor | None:
    """``[n, 1]`` per-example positions of ``role`` in an encoded batch, or None for every position (``all``)."""
    if role is None or role == ALL:
        return None
    if role not in batch.positions:
        raise UsageError(f"position role {role!r} is not in this task's roles {sorted(batch.positions)} or 'all'")
    return batch.positions[role][:, None]


def position_mask(pos: torch.Tensor | None, rows: int, t: int) -> torch.Tensor:
    """bool ``[rows, T]``: where to patch (every position when ``pos`` is None)."""
    if pos is None:
        return torch.ones(rows, t, dtype=torch.bool)
    m = torch.zeros(rows, t, dtype=torch.bool)
    m[torch.arange(rows)[:, None], pos] = True
    return m


def _normalize_heads(spec: ModelSpec, heads: Iterable[Head] | None, name: str = "heads") -> list[Head]:
    if heads is None:
        return spec.all_heads()
    out = [spec.check_head(h, name) for h in heads]
    if len(set(out)) != len(out):
        raise UsageError(f"{name} must not repeat a head, got {[str(h) for h in out]}")
    return out


def _position_index(positions, batch: int, seq: int) -> torch.Tensor | None:
    """``None`` (all positions), a 1-D index shared by the batch, or a ``[batch, k]`` per-example index.

    Negative positions count from the end. Returns a non-negative LongTensor (1-D or 2-D) or None.
    """
    if positions is None:
        return None
    p = torch.as_tensor(positions, dtype=torch.long)
    if p.dim() == 0:
        p = p.reshape(1)
    if p.dim() > 2:
        raise UsageError(f"positions must be an int, a 1-D sequence or a [batch, k] tensor, got {p.dim()} dims")
    if p.dim() == 2 and p.shape[0] != batch:
        raise UsageError(f"positions has {p.shape[0]} rows but the batch has {batch} examples")
    if p.numel() and (int(p.min()) < -seq or int(p.max()) >= seq):
        raise UsageError(f"positions must lie in [-{seq}, {seq - 1}] for sequences of length {seq}, got {p.tolist()}")
    return p % seq


class ZCache:
    """What :func:`capture_z` recorded: z for the chosen heads at the chosen positions.

    ``cache[Head(l, h)]`` is ``[batch, pos, d_head]``; ``cache.stack()`` is ``[batch, pos, n_heads, d_head]``
    in the order the heads were given; ``cache.layer(l)`` is ``[batch, pos, heads_of_l, d_head]``.
    """

    def __init__(self, spec: ModelSpec, heads: list[Head]):
        self.spec = spec
        self.heads = heads
        self.by_layer: dict[int, list[int]] = defaultdict(list)
        for h in heads:
            self.by_layer[h.layer].append(h.head)
        self._z: dict[int, torch.Tensor] = {}
        self._whole: set[int] = set()  # layers stored with every head; their heads are picked when read

    def _store(self, layer: int, z: torch.Tensor, whole: bool = False) -> None:
        self._z[layer] = z
        (self._whole.add if whole else self._whole.discard)(layer)

    def _stored(self, layer: int) -> torch.Tensor:
        if layer not in self._z:
            raise KeyError(f"layer {layer} was not captured (captured layers: {sorted(self._z)}); did a forward run?")
        return self._z[layer]

    def layer(self, layer: int) -> torch.Tensor:
        z = self._stored(layer)
        return z[:, :, self.by_layer[layer]] if layer in self._whole else z

    def __getitem__(self, head) -> torch.Tensor:
        head = Head(*head)
        if head.head not in self.by_layer.get(head.layer, []):
            raise KeyError(f"{head} was not captured; captured heads: {[str(h) for h in self.heads]}")
        z = self._stored(head.layer)  # a whole layer: index the head itself (a view, no copy of the layer)
        return z[:, :, head.head] if head.layer in self._whole else z[:, :, self.by_layer[head.layer].index(head.head)]

    def stack(self) -> torch.Tensor:
        return torch.stack([self[h] for h in self.heads], dim=2)  # [batch, pos, n_heads, d_head]

    def __len__(self) -> int:
        return len(self.heads)


@contextmanager
def capture_z(model: nn.Module, heads: Iterable[Head] | None = None, positions=None, *, detach: bool = False):
    """Record per-head z during the forwards run inside the block (the last forward wins).

    Args:
        model: a supported HF causal LM.
        heads: heads to keep (default: all).
        positions: None (all), an int / 1-D sequence shared by the batch, or a ``[batch, k]`` LongTensor.
        detach: drop the autograd graph. The default keeps it, so a loss on captured z trains the model.

    Yields:
        A :class:`ZCache`.
    """
    adapter = get_adapter(model)
    spec = adapter.spec
    heads = _normalize_heads(spec, heads)
    cache = ZCache(spec, heads)
    handles = []

    def make_hook(layer: int, head_idx: list[int]):
        idx = torch.tensor(head_idx, dtype=torch.long)
        full_layer = head_idx == list(range(spec.n_heads))

        def hook(module, args):
            z = args[0]
            b, t, _ = z.shape
            z4 = z.view(b, t, spec.n_heads, spec.d_head)  # [batch, pos, n_heads, d_head]
            p = _position_index(positions, b, t)
            if p is not None:
                p = p.to(z.device)
                if p.dim() == 1:
                    z4 = z4[:, p]  # [batch, k, n_heads, d_head]
                else:
                    z4 = z4[torch.arange(b, device=z.device)[:, None], p]  # [batch, k, n_heads, d_head]
            if p is None and full_layer:
                # Every head at every position: feed the stored view forward, so the stored tensor lies on
                # the forward path and torch.autograd.grad(loss, cache.layer(l)) works (attribution patching).
                cache._store(layer, z4.detach() if detach else z4)
                return (z4.reshape(b, t, -1),) + tuple(args[1:])
            if p is None and not detach:
                # kept whole (a view: no tensor saved for the backward), its heads picked when read, outside the
                # layer: a layer recomputed by gradient checkpointing then replays the same operations
                cache._store(layer, z4, whole=True)
                return None
            z4 = z4[:, :, idx.to(z.device)]  # [batch, k, heads_of_layer, d_head]
            cache._store(layer, z4.detach() if detach else z4)
            return None

        return hook

    try:
        for layer, head_idx in cache.by_layer.items():
            handles.append(adapter.o_proj(layer).register_forward_pre_hook(make_hook(layer, head_idx)))
        yield cache
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------------
# Interventions
# ------------------------------------------------------------------------------------------------
@contextmanager
def intervene(model: nn.Module, plan: dict[int, tuple[torch.Tensor, torch.Tensor]]):
    """Low-level edit of z: at layer l, ``z = where(mask, value, z)``.

    Args:
        plan: ``{layer: (mask, value)}`` with mask ``[batch or 1, pos, n_heads]`` (bool) and value
            ``[batch or 1, pos, n_heads, d_head]``. Batch-1 entries broadcast over the batch.

    The higher-level :func:`ablate` and :func:`patch` build plans; batched patching builds one plan with a
    different head per example.
    """
    adapter = get_adapter(model)
    spec = adapter.spec
    handles = []

    def make_hook(layer: int, mask: torch.Tensor, value: torch.Tensor):
        def hook(module, args):
            z = args[0]
            b, t, _ = z.shape
            if mask.shape[-2] != t or value.shape[1] != t:
                raise UsageError(
                    f"intervention at layer {layer} was built for sequences of length {mask.shape[-2]}, "
                    f"but the forward has length {t}; prompts must share one length where positions align"
                )
            if mask.shape[0] not in (1, b) or value.shape[0] not in (1, b):
                raise UsageError(
                    f"intervention at layer {layer} has batch {mask.shape[0]}/{value.shape[0]}, forward has {b}"
                )
            z4 = z.view(b, t, spec.n_heads, spec.d_head)  # [batch, pos, n_heads, d_head]
            m = mask.to(z.device)[..., None]  # [batch|1, pos, n_heads, 1]
            new = torch.where(m, value.to(device=z.device, dtype=z.dtype), z4)
            return (new.reshape(b, t, spec.n_heads * spec.d_head),) + tuple(args[1:])

        return hook

    try:
        for layer, (mask, value) in plan.items():
            if not 0 <= layer < spec.n_layers:
                raise UsageError(f"plan names layer {layer}, but the model has {spec.n_layers} layers")
            if mask.dim() != 3 or mask.shape[-1] != spec.n_heads:
                raise UsageError(f"plan[{layer}] mask must be [batch, pos, {spec.n_heads}], got {tuple(mask.shape)}")
            if value.dim() != 4 or tuple(value.shape[-2:]) != (spec.n_heads, spec.d_head):
                raise UsageError(
                    f"plan[{layer}] value must be [batch, pos, {spec.n_heads}, {spec.d_head}], got {tuple(value.shape)}"
                )
            handles.append(adapter.o_proj(layer).register_forward_pre_hook(make_hook(layer, mask.bool(), value)))
        yield
    finally:
        for h in handles:
            h.remove()


def _head_mask(spec: ModelSpec, heads: Sequence[Head], positions, batch: int, seq: int) -> dict[int, torch.Tensor]:
    """``{layer: bool [batch|1, seq, n_heads]}`` true at the chosen heads and positions."""
    p = _position_index(positions, batch, seq)
    rows = batch if (p is not None and p.dim() == 2) else 1
    pos_mask = torch.zeros(rows, seq, dtype=torch.bool)
    if p is None:
        pos_mask[:] = True
    elif p.dim() == 1:
        pos_mask[:, p] = True
    else:
        pos_mask[torch.arange(batch)[:, None], p] = True
    out: dict[int, torch.Tensor] = {}
    for h in heads:
        m = out.setdefault(h.layer, torch.zeros(rows, seq, spec.n_heads, dtype=torch.bool))
        m[:, :, h.head] |= pos_mask
    return out


@torch.no_grad()
def run_with_z(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               logits: bool = True):
    """One forward with every head's z recorded.

    Returns:
        ``(logits [batch, pos, vocab], z [n_layers, batch, pos, n_heads, d_head])``; with ``logits=False`` the
        lm_head runs on the last position only and ``None`` comes back instead of the logits.
    """
    spec = get_adapter(model).spec
    kw = {} if logits or not accepts_logits_to_keep(model) else {"logits_to_keep": 1}
    with capture_z(model, None, detach=True) as cache:
        out = model(input_ids=input_ids, attention_mask=attention_mask, **kw)
    z = torch.stack([cache.layer(l) for l in range(spec.n_layers)])  # [n_layers, batch, pos, n_heads, d_head]
    return (out.logits if logits else None), z


@torch.no_grad()
def mean_z(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """Per-position mean of every head's z over a reference set of equal-length prompts.

    Returns:
        ``[n_layers, pos, n_heads, d_head]`` (float32).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] == 0:
        raise UsageError(f"input_ids must be a non-empty [batch, pos] tensor, got shape {tuple(input_ids.shape)}")
    total = None
    device = next(model.parameters()).device
    for i in range(0, input_ids.shape[0], batch_size):
        _, z = run_with_z(model, input_ids[i : i + batch_size].to(device), logits=False)
        s = z.float().sum(dim=1)  # [n_layers, pos, n_heads, d_head]
        total = s if total is None else total + s
    return total / input_ids.shape[0]


@contextmanager
def ablate(model: nn.Module, heads: Iterable[Head], *, means: torch.Tensor | None = None, positions=None):
    """Mean-ablate (``means`` from :func:`mean_z`) or zero-ablate (``means=None``) heads at positions.

    Args:
        heads: the heads to ablate.
        means: ``[n_layers, pos, n_heads, d_head]`` per-position means, or None for zero ablation.
        positions: None (all), shared 1-D positions, or ``[batch, k]`` per-example positions.
    """
    spec = get_adapter(model).spec
    heads = _normalize_heads(spec, heads)
    if means is not None and (means.dim() != 4 or tuple(means.shape[2:]) != (spec.n_heads, spec.d_head)
                              or means.shape[0] != spec.n_layers):
        raise UsageError(
            f"means must be [n_layers={spec.n_layers}, pos, n_heads={spec.n_heads}, d_head={spec.d_head}] "
            f"from mean_z, got {tuple(means.shape)}"
        )
    # The sequence length is only known at forward time, so the plan is built lazily per forward.
    adapter = get_adapter(model)
    handles = []

    def make_hook(layer: int):
        def hook(module, args):
            z = args[0]
            b, t, _ = z.shape
            if means is not None and means.shape[1] != t:
                raise UsageError(
                    f"means were computed for sequences of length {means.shape[1]}, the forward has length {t}"
                )
            mask = _head_mask(spec, [h for h in heads if h.layer == layer], positions, b, t)[layer]
            value = (means[layer][None] if means is not None
                     else torch.zeros(1, t, spec.n_heads, spec.d_head))  # [1, pos, n_heads, d_head]
            z4 = z.view(b, t, spec.n_heads, spec.d_head)
            new = torch.where(mask.to(z.device)[..., None], value.to(device=z.device, dtype=z.dtype), z4)
            return (new.reshape(b, t, -1),) + tuple(args[1:])

        return hook

    try:
        for layer in sorted({h.layer for h in heads}):
            handles.append(adapter.o_proj(layer).register_forward_pre_hook(make_hook(layer)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def patch(model: nn.Module, heads: Iterable[Head], source_z: torch.Tensor, *, positions=None):
    """Patch heads' z from another run (``source_z`` from :func:`run_with_z`) at the given positions.

    Args:
        source_z: ``[n_layers, batch, pos, n_heads, d_head]``; its batch and length must match the forward.
    """
    spec = get_adapter(model).spec
    heads = _normalize_heads(spec, heads)
    if source_z.dim() != 5 or source_z.shape[0] != spec.n_layers or tuple(source_z.shape[3:]) != (
        spec.n_heads, spec.d_head
    ):
        raise UsageError(
            f"source_z must be [n_layers={spec.n_layers}, batch, pos, n_heads={spec.n_heads}, "
            f"d_head={spec.d_head}] from run_with_z, got {tuple(source_z.shape)}"
        )
    b, t = source_z.shape[1], source_z.shape[2]
    masks = _head_mask(spec, heads, positions, b, t)
    plan = {layer: (mask, source_z[layer]) for layer, mask in masks.items()}
    with intervene(model, plan):
        yield


def memory_budget() -> int:
    """Bytes one batched forward may use for activations: ``$FASTCD_MEMORY_BUDGET`` (e.g. ``4G``, ``512M``,
    bytes), default 2 GiB."""
    raw = os.environ.get("FASTCD_MEMORY_BUDGET", "2G").strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if raw and raw[-1] in mult:
            return int(float(raw[:-1]) * mult[raw[-1]])
        return int(raw)
    except ValueError:
        raise UsageError(f"FASTCD_MEMORY_BUDGET must be bytes or a size like '4G', got {raw!r}") from None


def rows_for_budget(model: nn.Module, seq_len: int, *, budget: int | None = None, cap: int = 4096,
                    grad: bool = False) -> int:
    """How many prompt rows of length ``seq_len`` one no-grad forward may take within the memory budget; with
    ``grad``, one forward and backward (every layer's activations kept for the backward: n_layers times as much).

    Per row and layer: the residual stream and its normed copies (~6 x d_model), the MLP (3 x d_ff), attention
    scores (n_heads x T, eager) and the patch plan (n_heads x d_head), times T, plus one row of logits."""
    s = model_spec(model)
    cfg = unwrap(model).config
    d_ff = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * s.d_model
    item = next(model.parameters()).element_size()
    per_row = item * (seq_len * (6 * s.d_model + 3 * d_ff + s.n_heads * seq_len + s.n_heads * s.d_head)
                      + s.vocab_size)
    if grad:
        per_row *= s.n_layers
    return int(max(1, min(cap, (budget or memory_budget()) // per_row)))


def gather_roles(cache, heads, roles, pos: dict, batch: int) -> torch.Tensor:
    """``[P, B, d]``: pair p's head z at its role's per-example position (keeps the graph), on the first pair's
    device (a model spread over devices captures each layer where it runs)."""
    rows = torch.arange(batch)
    out = []
    for h, role in zip(heads, roles):
        z = cache[h]  # [B, T, d]
        if role == ALL:
            raise UsageError("CKA pairs need a single position role per head, not 'all'")
        out.append(z[rows, pos[role].to(z.device)].to(out[0].device if out else z.device))
    return torch.stack(out)


@torch.inference_mode()
def teacher_forward(teacher: nn.Module, ids: torch.Tensor, pos: dict,
                    pairs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One no-grad teacher forward: its last-position logits ``[B, V]`` (fp32) and each pair's teacher z at the
    pair's role ``[P, B, d]`` (None without pairs). Few-shot prompts' shared prefix runs once
    (:func:`fastcd.models.shared_prefix`) when every position read lies after it."""
    ids = ids.to(input_device(teacher))
    prefix = shared_prefix(teacher, ids, [pos["last"]] + [pos[p.position] for p in pairs])  # before the hooks
    with capture_z(teacher, list(dict.fromkeys(p.teacher for p in pairs)), detach=True) as cache:
        last, _ = logits_at(teacher, pos["last"], input_ids=ids, prefix=prefix)
    z = None
    if pairs:  # the capture saw the suffixes only when a prefix ran
        z = gather_roles(cache, [p.teacher for p in pairs], [p.position for p in pairs],
                         pos if prefix is None else prefix.shift(pos), ids.shape[0]).float()
    return last.float(), z
