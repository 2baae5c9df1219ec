"""One dispatch point for the alignment loss: Triton on CUDA when available, the PyTorch reference otherwise.

``FASTCD_IMPL=torch|triton`` or ``impl=`` overrides the choice. Triton is imported lazily, inside the
function, so ``import fastcd`` works without it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from fastcd.reference import cka_loss_ref

IMPLS = ("torch", "triton")


@functools.cache
def triton_available() -> bool:
    """Triton importable and the kernels module present (memoised)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return importlib.util.find_spec("fastcd.kernels.cka") is not None


def choose_impl(device: torch.device | None, impl: str | None = None) -> str:
    """The implementation ``cka_loss`` will use for tensors on ``device``."""
    impl = impl or os.environ.get("FASTCD_IMPL") or None
    if impl is not None:
        if impl not in IMPLS:
            raise ValueError(f"impl (or FASTCD_IMPL) must be one of {IMPLS}, got {impl!r}")
        if impl == "triton" and not triton_available():
            raise RuntimeError("impl='triton' was asked for but Triton or fastcd.kernels.cka is not available")
        return impl
    if device is not None and device.type == "cuda" and triton_available():
        return "triton"
    return "torch"


def cka_loss(x: torch.Tensor, y: torch.Tensor, *, eps: float = 1e-8, impl: str | None = None):
    """``sum_p (1 - CKA(x_p, y_p))`` over P head pairs (paper Eq. 7), biased linear CKA, eps-guarded.

    Args:
        x: student z ``[P, m, d_s]`` (keeps its autograd graph).
        y: teacher z ``[P, m, d_t]`` (no gradient needed).
        impl: ``"torch"``, ``"triton"`` or None (Triton on CUDA when available; ``FASTCD_IMPL`` overrides).

    Returns:
        ``(loss, cka)``: scalar loss and per-pair CKA ``[P]``.
    """
    which = choose_impl(x.device, impl)
    if which == "triton":
        from fastcd.kernels.cka import cka_loss_triton

        return cka_loss_triton(x, y, eps=eps)
    return cka_loss_ref(x, y, eps=eps)
