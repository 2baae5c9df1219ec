import os
import subprocess
import sys

import numpy as np
import pytest

import fastcd
from fastcd import _ext
from fastcd.reference import nearest_indices_ref

needs_cpp = pytest.mark.skipif(not _ext.HAS_CPP, reason="fastcd._C not built (FASTCD_SKIP_CPP_BUILD=1)")


def test_extension_is_built_in_this_install():
    """The README install builds the extension; CI must catch a build that silently fell back."""
    if os.environ.get("FASTCD_SKIP_CPP_BUILD") == "1":
        pytest.skip("built without the extension on purpose")
    assert fastcd.HAS_CPP, _ext.CPP_ERROR


@needs_cpp
@pytest.mark.parametrize("n, k", [(0, 1), (1, 1), (7, 3), (97, 59), (300, 128)])
def test_nearest_indices_matches_twin(n, k):
    rng = np.random.default_rng(n * 1000 + k)
    q = rng.normal(size=n)
    keys = rng.normal(size=k)
    np.testing.assert_array_equal(_ext.nearest_indices(q, keys, impl="cpp"), nearest_indices_ref(q, keys))


@needs_cpp
def test_nearest_indices_ties_go_to_lowest_index():
    keys = np.array([0.0, 1.0, 1.0, 3.0, -1.0])
    q = np.array([0.5, 1.0, 2.0, -0.5, 10.0])
    expect = np.array([0, 1, 1, 0, 3])
    np.testing.assert_array_equal(_ext.nearest_indices(q, keys, impl="cpp"), expect)
    np.testing.assert_array_equal(nearest_indices_ref(q, keys), expect)


@pytest.mark.parametrize("impl", ["python", pytest.param("cpp", marks=needs_cpp)])
def test_nearest_indices_errors_name_the_argument(impl):
    with pytest.raises(ValueError, match="keys must not be empty"):
        _ext.nearest_indices([1.0], [], impl=impl)
    with pytest.raises(ValueError, match="query must be a 1-D array"):
        _ext.nearest_indices(np.zeros((2, 2)), [1.0], impl=impl)
    with pytest.raises(ValueError, match="keys must be finite, found nan at index 1"):
        _ext.nearest_indices([1.0], [0.0, float("nan")], impl=impl)
    with pytest.raises(ValueError, match="query must be finite"):
        _ext.nearest_indices([float("inf")], [0.0], impl=impl)


def test_bad_impl_name():
    with pytest.raises(ValueError, match="impl must be 'cpp', 'python' or None"):
        _ext.nearest_indices([1.0], [1.0], impl="cuda")


def test_import_without_extension_warns_once_and_falls_back(tmp_path):
    """With fastcd._C unimportable, `import fastcd` works, warns once naming the fallback, and ops run."""
    code = (
        "import sys, warnings\n"
        "sys.modules['fastcd._C'] = None  # makes `from fastcd import _C` raise ImportError\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastcd\n"
        "    import fastcd._ext, fastcd.models\n"
        "msgs = [str(x.message) for x in w if 'fastcd._C' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'fastcd.reference' in msgs[0] and 'circular' not in msgs[0], msgs[0]\n"
        "assert 'not built' in msgs[0], msgs[0]\n"
        "assert fastcd.HAS_CPP is False\n"
        "print(list(fastcd._ext.nearest_indices([0.9], [0.0, 1.0])))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[np.int64(1)]" or out.stdout.strip() == "[1]"


def test_triton_available_is_false_without_the_kernels_package(tmp_path):
    """Run from a tree where fastcd.kernels is absent: no ModuleNotFoundError, and fastcd.info still reports."""
    code = (
        "import sys\n"
        "sys.modules['fastcd.kernels'] = None  # as when fastcd.kernels is not installed\n"
        "from fastcd.cka import triton_available\n"
        "assert triton_available() is False\n"
        "import runpy; runpy.run_module('fastcd.info', run_name='__main__')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "triton" in out.stdout.lower()
