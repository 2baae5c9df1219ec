"""CKA in one place: the alignment loss (training) and the all-pairs scorer (matching), and the one dispatch
vocabulary both use. The plain PyTorch/Python specification of every path is :mod:`fastcd.reference`.

Implementations (``impl=``, ``--impl``; ``python -m fastcd.info`` shows which are available here):

============  ==================================  ==========================================
impl          alignment loss (:func:`cka_loss`)   all-pairs scorer (:func:`cka_matrix`)
============  ==================================  ==========================================
``torch``     the PyTorch reference (any device)  vectorised torch, Gram form (any device)
``triton``    fused Triton kernel (CUDA)          --
``cpp``       --                                  ``fastcd._C`` (OpenMP, bounded memory)
``python``    --                                  per-pair reference loop (slow; the spec)
``None``      Triton on CUDA when available,      C++ when built, torch otherwise
              torch otherwise (``FASTCD_IMPL``)
============  ==================================  ==========================================

Triton is imported lazily, inside the functions, so ``import fastcd`` works without it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
import torch

from fastcd import _ext
from fastcd.errors import UsageError
from fastcd.io import status_once
from fastcd.reference import ESTIMATORS, check_cka_inputs, cka_loss_gather_ref, cka_loss_ref, cka_matrix_ref

IMPLS = ("torch", "triton", "cpp", "python")  # the one vocabulary
LOSS_IMPLS = ("torch", "triton")
SCORER_IMPLS = ("cpp", "torch", "python")


def available_impls() -> dict[str, list[str]]:
    """Which implementations can run here, per operation (what ``fastcd.info`` prints)."""
    cuda = torch.cuda.is_available()
    loss = ["torch"] + (["triton"] if triton_available() and (cuda or os.environ.get("TRITON_INTERPRET") == "1")
                        else [])
    scorer = (["cpp"] if _ext.HAS_CPP else []) + ["torch", "python"]
    return {"loss": loss, "scorer": scorer}


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
        if impl not in LOSS_IMPLS:
            what = "one of the implementations " + str(IMPLS) if impl not in IMPLS else "an alignment-loss one"
            raise UsageError(f"impl (or FASTCD_IMPL) must be one of {LOSS_IMPLS} for the alignment loss, got "
                             f"{impl!r} (not {what}; see python -m fastcd.info)")
        if impl == "triton":
            if not triton_available():
                raise UsageError("impl: 'triton' was asked for but Triton or fastcd.kernels.cka is not available "
                                 "(pip install 'fastcd[triton]'); use impl='torch'")
            on_gpu = device is not None and device.type == "cuda"
            if not on_gpu and os.environ.get("TRITON_INTERPRET", "0") != "1":
                raise UsageError("impl: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on "
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
        raise UsageError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "unbiased":
        if impl == "triton":
            raise UsageError("impl='triton' computes the biased estimator only; use estimator='biased' or "
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

    return cka_loss_gather_ref(xs, pos_s, head_s, y, pos_t, head_t, ds=ds, dt=dt, eps=eps, estimator=estimator)


def cka_matrix_torch(a, b, *, chunk: int = 64, dtype=None) -> np.ndarray:
    """All-pairs biased linear CKA in vectorised torch, Gram form, chunked over heads.

    Each head's centred Gram's upper triangle (off-diagonals times sqrt 2) is one row, built in float64 and
    normalised; all pairs are one matrix product of the rows in ``dtype`` (float64 by default; float32 for
    twice the speed at about 1e-7). ``chunk`` heads' full Grams are alive at a time. Runs on the inputs' device.
    """
    if dtype not in (None, torch.float32, torch.float64):
        raise UsageError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    a = a if torch.is_tensor(a) else torch.as_tensor(np.asarray(a))
    b = b if torch.is_tensor(b) else torch.as_tensor(np.asarray(b))
    check_cka_inputs(a, b)
    m = a.shape[1]
    iu = torch.triu_indices(m, m, device=a.device)
    w = torch.full((iu.shape[1],), 2.0**0.5, dtype=torch.float64, device=a.device)  # sqrt(2) in float32: 1e-8
    w[iu[0] == iu[1]] = 1.0

    def packed(x: torch.Tensor) -> torch.Tensor:
        rows = []
        for i in range(0, x.shape[0], chunk):
            xc = x[i : i + chunk].double()
            xc = xc - xc.mean(1, keepdim=True)  # [c, m, d]
            g = xc @ xc.transpose(1, 2)  # [c, m, m]
            rows.append(g[:, iu[0], iu[1]] * w)  # [c, P]
            del g  # free the full Grams before the next chunk
        return torch.cat(rows)

    def unit(g: torch.Tensor) -> torch.Tensor:
        n = g.norm(dim=1, keepdim=True)
        return torch.where(n > 0, g / n.clamp_min(1e-300), torch.zeros_like(g)).to(dtype or torch.float64)

    with torch.autocast(a.device.type, enabled=False):  # float32 rows would otherwise multiply in bf16
        return (unit(packed(a)) @ unit(packed(b)).T).double().cpu().numpy()


def cka_matrix(a, b, *, impl: str | None = None, form: str = "auto", max_bytes: int = 256 << 20,
               precision: str = "float64") -> np.ndarray:
    """All-pairs biased linear CKA, ``[heads_a, m, d_a] x [heads_b, m, d_b] -> [heads_a, heads_b]`` float64.

    Args:
        impl: ``"cpp"`` (fastcd._C, bounded memory), ``"torch"`` (vectorised), ``"python"`` (per-pair
            reference) or None: the C++ scorer when built, torch otherwise (announced once).
    """
    if impl is not None and impl not in SCORER_IMPLS:
        raise UsageError(f"impl must be one of {SCORER_IMPLS} for the CKA scorer, got {impl!r}"
                         f"{' (Triton serves the alignment loss only)' if impl == 'triton' else ''}")
    if impl is None:
        impl = "cpp" if _ext.HAS_CPP else "torch"

        status_once(f"fastcd: CKA scorer uses {'fastcd._C (C++)' if impl == 'cpp' else 'the torch fallback'}")
    if impl == "cpp":
        if not _ext.HAS_CPP:
            raise RuntimeError(f"impl='cpp' was asked for but fastcd._C is not built ({_ext.CPP_ERROR})")
        a_np = _as_float_array(a)
        b_np = _as_float_array(b)
        try:
            return _ext._C.cka_matrix(a_np, b_np, form, int(max_bytes), precision)
        except (TypeError, RuntimeError) as e:
            raise UsageError(str(e)) from None
    if impl == "torch":
        return cka_matrix_torch(a, b, dtype=torch.float32 if precision == "float32" else torch.float64)
    if impl == "python":
        return cka_matrix_ref(a, b)
    raise UsageError(f"impl must be 'cpp', 'torch', 'python' or None, got {impl!r}")


def _as_float_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.numpy() if x.dtype in (torch.float32, torch.float64) else x.double().numpy()
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    return np.ascontiguousarray(x)
