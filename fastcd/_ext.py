"""Load the optional C++ extension ``fastcd._C`` once.

When it is missing (``FASTCD_SKIP_CPP_BUILD=1``, or a failed build), fastcd warns once, naming the
Python fallback, and every op uses its twin in :mod:`fastcd.reference`.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from fastcd import reference
from fastcd.errors import UsageError

_C = None
HAS_CPP = False
CPP_ERROR: str | None = None

try:
    import importlib.util as _util

    # "from fastcd import _C" on a missing module reports a misleading "circular import": say what is wrong
    try:
        _spec = _util.find_spec("fastcd._C")
    except (ValueError, ModuleNotFoundError):  # blocked in sys.modules
        _spec = None
    if _spec is None:
        raise ImportError("no compiled fastcd._C module in the package (not built)")
    from fastcd import _C as _C  # type: ignore[attr-defined,no-redef]

    HAS_CPP = True
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
    CPP_ERROR = str(e)
    if os.environ.get("FASTCD_SILENCE_CPP_WARNING", "0") != "1":
        warnings.warn(
            "fastcd: C++ extension fastcd._C is not available "
            f"({e}); using the Python fallbacks in fastcd.reference. "
            "Reinstall with `pip install -e .` (without FASTCD_SKIP_CPP_BUILD=1) to build it.",
            RuntimeWarning,
            stacklevel=2,
        )


def nearest_indices(query, keys, *, impl: str | None = None):
    """Index of the nearest key (absolute difference) for each query value; ties go to the lowest index.

    Args:
        query: 1-D array-like of floats, shape ``(n,)``.
        keys: 1-D non-empty array-like of floats, shape ``(k,)``.
        impl: ``"cpp"``, ``"python"`` or None (the extension when it is built).

    Returns:
        ``np.ndarray`` of int64, shape ``(n,)``.
    """
    impl = impl or ("cpp" if HAS_CPP else "python")
    if impl == "cpp":
        if not HAS_CPP:
            raise RuntimeError(f"impl='cpp' was asked for but fastcd._C is not built ({CPP_ERROR})")
        try:
            return _C.nearest_indices(np.asarray(query, dtype=np.float64), np.asarray(keys, dtype=np.float64))
        except (RuntimeError, TypeError) as e:  # pybind11 maps std::invalid_argument to ValueError
            raise UsageError(str(e)) from None
    if impl == "python":
        return reference.nearest_indices_ref(query, keys)
    raise UsageError(f"impl must be 'cpp', 'python' or None, got {impl!r}")
