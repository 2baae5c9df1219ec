"""Build only the optional pybind11 extension ``fastcd._C``; all metadata lives in pyproject.toml.

Set ``FASTCD_SKIP_CPP_BUILD=1`` to skip the extension (fastcd then uses its Python twins). The build is portable:
the hot loops are compiled for AVX-512, AVX2 and the x86-64 baseline and chosen at load time (target_clones), so
a wheel runs on any x86-64 CPU; ``FASTCD_NATIVE_BUILD=1`` adds ``-march=native`` (then the result runs only on
CPUs like the build machine's).
This file must not import torch: the isolated build environment does not have it.
"""

import os
from glob import glob

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("FASTCD_SKIP_CPP_BUILD", "0") != "1":
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    extra_compile_args = ["-O3"]
    if os.environ.get("FASTCD_NATIVE_BUILD", "0") == "1":
        extra_compile_args.append("-march=native")
    extra_link_args = []
    if os.name != "nt":
        # OpenMP when the compiler has it; the code also builds without it.
        extra_compile_args.append("-fopenmp")
        extra_link_args.append("-fopenmp")
    ext_modules = [
        Pybind11Extension(
            "fastcd._C",
            sorted(glob("csrc/*.cpp")),
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ]
    cmdclass = {"build_ext": build_ext}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
