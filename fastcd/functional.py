"""One dispatch point for the alignment loss: Triton on CUDA when available, the PyTorch reference otherwise.

``FASTCD_IMPL=torch|triton`` or ``impl=`` overrides the choice. Triton is imported lazily, inside the
function, so ``import fastcd`` works without it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from fastcd.reference import ESTIMATORS, cka_loss_ref

IMPLS = ("torch", "triton")


@functools.cache
def triton_available() -> bool:
    """Triton importable and the kernels module present (memoised)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:  # find_spec of a submodule raises when the parent package (fastcd.kernels) is absent
        return importlib.util.find_spec("fastcd.kernels.cka") is not None
    except ModuleNotFoundError:
        return False


def choose_impl(device: torch.device | None, impl: str | None = None) -> str:
    """The implementation ``cka_loss`` will use for tensors on ``device``."""
    impl = impl or os.environ.get("FASTCD_IMPL") or None
    if impl is not None:
        if impl not in IMPLS:
            raise ValueError(f"impl (or FASTCD_IMPL) must be one of {IMPLS}, got {impl!r}")
        if impl == "triton":
            if not triton_available():
                raise ValueError("impl: 'triton' was asked for but Triton or fastcd.kernels.cka is not available "
                                 "(pip install 'fastcd[triton]'); use impl='torch'")
            on_gpu = device is not None and device.type == "cuda"
            if not on_gpu and os.environ.get("TRITON_INTERPRET", "0") != "1":
                raise ValueError("impl: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on "
                                 "CPU under the Triton interpreter); use impl='torch' on the CPU")
        return impl
    if device is not None and device.type == "cuda" and triton_available():
        return "triton"
    return "torch"


def cka_loss(x: torch.Tensor, y: torch.Tensor, *, eps: float = 1e-8, impl: str | None = None,
             estimator: str = "biased"):
    """``sum_p (1 - CKA(x_p, y_p))`` over P head pairs (paper Eq. 7), linear CKA, scale-invariant, eps-guarded.

    Args:
        x: student z ``[P, m, d_s]`` (keeps its autograd graph).
        y: teacher z ``[P, m, d_t]`` (no gradient needed).
        impl: ``"torch"``, ``"triton"`` or None (Triton on CUDA when available; ``FASTCD_IMPL`` overrides).
        estimator: ``"biased"`` (the paper's linear CKA) or ``"unbiased"`` (debiased CKA from the unbiased HSIC
            estimator; torch only, see :func:`fastcd.reference.cka_loss_ref`).

    Returns:
        ``(loss, cka)``: scalar loss and per-pair CKA ``[P]``.
    """
    which = _impl_for(x.device, impl, estimator)
    if which == "triton":
        # the kernel reads [batch, pos, heads * d_head]: view the stack as one head per pair at position 0
        p, m, ds = x.shape
        xs = x.permute(1, 0, 2).reshape(m, 1, p * ds)  # [m, 1, P * d_s]
        zeros = torch.zeros(p, m, dtype=torch.long, device=x.device)
        return cka_loss_gathered(xs, zeros, torch.arange(p, device=x.device), y, None,
                                 torch.zeros(p, dtype=torch.long, device=x.device), ds=ds, dt=y.shape[-1],
                                 eps=eps, impl="triton")
    return cka_loss_ref(x, y, eps=eps, estimator=estimator)


def _impl_for(device, impl: str | None, estimator: str) -> str:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "unbiased":
        if impl == "triton":
            raise ValueError("impl='triton' computes the biased estimator only; use estimator='biased' or "
                             "impl='torch' for estimator='unbiased'")
        return "torch"
    return choose_impl(device, impl)


def cka_loss_gathered(xs: torch.Tensor, pos_s: torch.Tensor, head_s: torch.Tensor, y: torch.Tensor,
                      pos_t: torch.Tensor | None, head_t: torch.Tensor, *, ds: int, dt: int, eps: float = 1e-8,
                      impl: str | None = None, estimator: str = "biased"):
    """The alignment loss read straight from z as ``o_proj`` sees it (fused gather on the Triton path).

    Args:
        xs: student z ``[B, T, H_s * ds]`` (keeps its graph); pos_s ``[P, B]``; head_s ``[P]``.
        y: teacher z ``[B, T', H_t * dt]`` with pos_t ``[P, B]``, head_t ``[P]``; or gathered ``[P, B, dt]``
            with ``pos_t=None``.

    Returns:
        ``(loss, cka [P])``.
    """
    which = _impl_for(xs.device, impl, estimator)
    if which == "triton":
        from fastcd.kernels.cka import cka_loss_triton

        return cka_loss_triton(xs, pos_s, head_s, y, pos_t, head_t, ds=ds, dt=dt, eps=eps)
    from fastcd.reference import cka_loss_gather_ref

    return cka_loss_gather_ref(xs, pos_s, head_s, y, pos_t, head_t, ds=ds, dt=dt, eps=eps, estimator=estimator)
