"""Head-granular trainable parameters: only the matched student heads' slices train.

Each touched weight is re-parametrised (``torch.nn.utils.parametrize``) as its frozen original with the
trainable slices spliced in: ``W = cat(W[:s], P, W[e:])`` along the slice dimension, the slices ``P`` kept in
float32 (master copies) and cast to the weight's dtype in the forward. Gradients, optimizer
state and weight decay therefore exist for the slices alone, and every other element of the weight stays
bit-identical. :func:`merge` writes the slices back and removes the parametrisations (before saving).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from fastcd.errors import UsageError
from fastcd.models import Head, get_adapter

KV_POLICIES = ("auto", "frozen", "trainable")


class _SpliceSlices(nn.Module):
    """``forward(W)`` returns W with ``slices[i]`` replaced by the trainable ``params[i]``."""

    def __init__(self, weight: torch.Tensor, slices: list[tuple[int, int, int]]):
        super().__init__()
        self.slices = sorted(slices)
        dims = {d for d, _, _ in self.slices}
        if len(dims) != 1:
            raise UsageError(f"slices of one weight must share one dimension, got {sorted(dims)}")
        self.dim = dims.pop()
        # float32 master slices whatever the weight's dtype: a bf16 student's updates (often below bf16's
        # resolution at the weight's scale) accumulate in float32; the forward casts them to the weight's dtype
        self.params = nn.ParameterList(
            [nn.Parameter(weight.detach().narrow(self.dim, s, e - s).float().clone()) for _, s, e in self.slices]
        )

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        parts, cur = [], 0
        for (_, s, e), p in zip(self.slices, self.params):
            if s > cur:
                parts.append(w.narrow(self.dim, cur, s - cur))
            parts.append(p.to(w.dtype))
            cur = e
        if cur < w.shape[self.dim]:
            parts.append(w.narrow(self.dim, cur, w.shape[self.dim] - cur))
        return torch.cat(parts, dim=self.dim)


@dataclass
class TrainableSlices:
    """What :func:`make_trainable` did: the trainable params and the modules it re-parametrised."""

    params: list[nn.Parameter]
    modules: list[tuple[nn.Module, str]]
    heads: list[Head]
    n_trainable: int
    n_total: int
    hooks: list = field(default_factory=list)  # state_dict hooks that save plain weights while parametrised

    @property
    def fraction(self) -> float:
        return self.n_trainable / self.n_total


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def trains_kv(model: nn.Module, kv: str) -> bool:
    """Whether the ``kv`` policy trains a matched head's key/value slices in ``model`` (``auto``: only without GQA)."""
    if kv not in KV_POLICIES:
        raise UsageError(f"kv must be one of {KV_POLICIES}, got {kv!r}")
    return kv == "trainable" or (kv == "auto" and get_adapter(model).spec.group_size == 1)


def make_trainable(model: nn.Module, heads: list[Head], *, kv: str = "auto") -> TrainableSlices:
    """Freeze ``model`` and make only ``heads``' q rows, o columns (and q bias) trainable, plus their key/value
    slices by the ``kv`` policy.

    Args:
        kv: ``"auto"`` (default): a head's k/v slices train when they are its own (no GQA: one KV head per
            query head) and stay frozen under GQA, where a KV group is shared with heads that are not matched
            and training it would move them too; ``"frozen"``: never; ``"trainable"``: each matched head's KV
            group trains, GQA or not.
    """
    own_kv = trains_kv(model, kv)
    if not heads:
        raise UsageError("heads must not be empty: nothing would train")
    adapter = get_adapter(model)
    heads = sorted({adapter.spec.check_head(h, "trainable head") for h in heads})
    n_total = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    by_param: dict[int, tuple[nn.Parameter, int, list[tuple[int, int]]]] = {}
    for h in heads:
        for sl in adapter.head_slices(h, kv=own_kv):
            key = id(sl.param)
            entry = by_param.setdefault(key, (sl.param, sl.dim, []))
            if entry[1] != sl.dim:
                raise UsageError(f"{sl.name}: slices of one weight along two dimensions are not supported")
            entry[2].append((sl.index.start, sl.index.stop))
    owners = {id(p): (mod, name) for mod in model.modules() for name, p in mod.named_parameters(recurse=False)}
    params, modules, n_tr, hooks = [], [], 0, []
    for key, (param, dim, ranges) in by_param.items():
        if key not in owners:
            raise UsageError("model: its head weights are already parametrised (another CircuitDistiller or "
                             "make_trainable holds them); call fastcd.trainable.merge(...) on that one first")
        mod, name = owners[key]
        merged = _merge_ranges(ranges)
        splice = _SpliceSlices(param, [(dim, s, e) for s, e in merged])
        parametrize.register_parametrization(mod, name, splice, unsafe=True)
        mod.parametrizations[name].original.requires_grad_(False)
        hooks.append(mod.register_state_dict_post_hook(_plain_weight_hook(name)))
        for p in splice.params:
            p.requires_grad_(True)
            params.append(p)
            n_tr += p.numel()
        modules.append((mod, name))
    return TrainableSlices(params, modules, heads, n_tr, n_total, hooks)


def _plain_weight_hook(name: str):
    """While ``name`` is parametrised, ``state_dict()`` (and so ``save_pretrained``) holds the current weight under
    its plain key instead of ``parametrizations.<name>.original`` + the slices, so a model saved from a user's own
    loop reloads in transformers with the trained weights."""

    def hook(module, state_dict, prefix, local_metadata):
        if not parametrize.is_parametrized(module, name):
            return
        for k in [k for k in state_dict if k.startswith(f"{prefix}parametrizations.{name}.")]:
            del state_dict[k]
        state_dict[prefix + name] = getattr(module, name).detach()

    return hook


def merge(slices: TrainableSlices) -> None:
    """Write the trained slices into the weights and remove the parametrisations (call before saving)."""
    for mod, name in slices.modules:
        if parametrize.is_parametrized(mod, name):
            parametrize.remove_parametrizations(mod, name, leave_parametrized=True)
    for h in slices.hooks:
        h.remove()
    slices.hooks.clear()


class FrozenCast:
    """The frozen linear weights of a slice-training model held in the autocast dtype while the training steps run.

    Under ``torch.autocast`` a linear layer casts its float32 weight to the autocast dtype on every call, and a frozen
    weight (``requires_grad=False``) is not in autocast's cast cache: a 0.5B student re-reads 2 GB and writes 1 GB
    per step. Inside ``with FrozenCast(model, dtype):`` every frozen ``nn.Linear`` weight and bias (the frozen
    original under a trainable splice too) holds ``.to(dtype)`` of itself, the very values autocast would cast, so
    each step computes the same numbers (the splice casts the float32 slices to the weight's dtype, as autocast did);
    on exit the float32 originals are back, untouched. A weight shared with an embedding (a tied lm_head) stays
    float32 for the embedding, whose output feeds the float32 residual stream; the lm_head reads its own low-precision
    copy for the steps and is tied again on exit. The copies cost 2 bytes per frozen linear parameter (bf16/fp16).
    :meth:`originals` puts the float32 weights back for a block that runs outside autocast (validation). The plain
    twin is autocast's own cast (``train_loop(..., frozen_cast=False)``); tests/test_training.py compares the two."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        self.held = []  # (parameter, float32 data, low-precision data)
        self.untied = []  # (linear module, the weight it shares with an embedding, its own low-precision copy)
        for mod in model.modules():
            if not isinstance(mod, nn.Linear):
                continue
            for name in ("weight", "bias"):
                p = (mod.parametrizations[name].original if parametrize.is_parametrized(mod, name)
                     else getattr(mod, name))
                if p is None or p.requires_grad or not p.is_floating_point() or p.dtype == dtype:
                    continue
                if id(p) in tied and name == "weight" and not parametrize.is_parametrized(mod, name):
                    # an lm_head tied to the embedding: for the steps it gets its own frozen copy in ``dtype``
                    self.untied.append((mod, p, nn.Parameter(p.detach().to(dtype), requires_grad=False)))
                elif id(p) not in tied:
                    self.held.append((p, p.data, p.data.to(dtype)))

    def _put(self, low: bool) -> None:
        for p, full, lowp in self.held:
            p.data = lowp if low else full
        for mod, shared, own in self.untied:
            mod._parameters["weight"] = own if low else shared

    def __enter__(self):
        self._put(True)
        return self

    def __exit__(self, *exc) -> None:
        self._put(False)

    @contextlib.contextmanager
    def originals(self):
        self._put(False)
        try:
            yield
        finally:
            self._put(True)


def slice_state(slices: TrainableSlices) -> list[torch.Tensor]:
    return [p.detach().clone() for p in slices.params]


def reinit_heads(model, heads, *, seed: int = 0) -> None:
    """Re-initialise ``heads``' own slices (q rows, q bias, o columns; k/v too where the head owns its KV group)
    with Gaussian values of the same standard deviation as the weight they sit in, seeded."""
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(seed)
    own_kv = adapter.spec.group_size == 1
    with torch.no_grad():
        for h in heads:
            h = adapter.spec.check_head(Head.parse(h) if isinstance(h, str) else h, "positive_control.reinit head")
            for sl in adapter.head_slices(h, kv=own_kv):
                w = sl.param
                part = w.narrow(sl.dim, sl.index.start, sl.index.stop - sl.index.start)
                std = float(w.float().std())
                part.copy_((torch.randn(part.shape, generator=g) * std).to(w.dtype))
