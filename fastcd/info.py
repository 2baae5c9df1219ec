"""``python -m fastcd.info``: versions, availability, and which implementation each op will use."""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform


def _version(mod: str) -> str:
    if importlib.util.find_spec(mod) is None:
        return "not installed"
    try:
        return getattr(importlib.import_module(mod), "__version__", "installed")
    except Exception as e:  # a broken install must not break the report
        return f"broken ({type(e).__name__}: {e})"


def _loss_impl(cuda: bool) -> str:
    import torch

    from fastcd.cka import choose_impl

    try:
        return choose_impl(torch.device("cuda" if cuda else "cpu"))
    except (ValueError, RuntimeError) as e:
        return f"error: {e}"


def collect() -> dict[str, str]:
    import torch

    import fastcd
    from fastcd import _ext
    from fastcd.cka import IMPLS, available_impls
    from fastcd.loading import has_flash_attn, pick_attn_implementation

    cuda = torch.cuda.is_available()
    rows = {
        "fastcd": fastcd.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "flash_attn": _version("flash_attn"),
        "CUDA available": str(cuda),
        "CUDA version (torch build)": str(torch.version.cuda),
        "GPU": torch.cuda.get_device_name(0) if cuda else "none",
        "C++ extension fastcd._C": "built" if _ext.HAS_CPP else f"missing ({_ext.CPP_ERROR})",
        "flash-attn usable": str(has_flash_attn() and cuda),
        "FASTCD_IMPL": os.environ.get("FASTCD_IMPL", "(unset)"),
        "op: nearest_indices (matching)": "cpp (fastcd._C)" if _ext.HAS_CPP else "python (fastcd.reference)",
        "op: cka_matrix (matching scorer)": "cpp (fastcd._C)" if _ext.HAS_CPP else "torch (vectorised)",
        "op: cka_loss (alignment loss)": _loss_impl(cuda),
        "impl vocabulary (impl=, --impl)": ", ".join(IMPLS),
        "impls available: alignment loss": ", ".join(available_impls()["loss"]),
        "impls available: CKA scorer": ", ".join(available_impls()["scorer"]),
        "op: attention in load_model": pick_attn_implementation("cuda" if cuda else "cpu"),
    }
    return rows


def main() -> None:
    for k, v in collect().items():
        print(f"{k:<40} {v}")


if __name__ == "__main__":
    main()
