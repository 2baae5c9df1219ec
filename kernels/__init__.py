"""Triton kernels, installed as ``fastcd.kernels``. Nothing is imported eagerly: Triton stays optional.

This folder sits at the repository's top level (the project's layout), so any process whose ``sys.path`` holds
the repository root (``python -m pytest``, ``python -c`` in a checkout) would find it as a top-level module named
``kernels``, the name of Hugging Face's kernel-hub distribution that transformers >= 5.25 imports whenever a
model class is built. Imported under any name but ``fastcd.kernels``, this module therefore does not stay: it
puts the real ``kernels`` distribution found elsewhere on ``sys.path`` in its place, or, when there is none, an
empty placeholder without a file or submodules. ``import kernels`` never yields this folder's code.
"""

import sys as _sys

if __name__ != "fastcd.kernels":

    def _hand_off(name: str) -> None:
        import importlib.util
        import os
        from importlib.machinery import PathFinder

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

        def _same(entry: str) -> bool:
            try:
                return os.path.samefile(entry or os.getcwd(), here)
            except OSError:
                return False

        path = [p for p in _sys.path if not _same(p)]
        spec = PathFinder.find_spec(name, path) if "." not in name else None
        if spec is None or spec.loader is None:
            # No other `kernels` anywhere: leave an empty placeholder that holds nothing of this folder (no file,
            # an empty __path__, so `import kernels.cka` fails). transformers 5.x checks `kernels` by importing it
            # when it finds no distribution metadata, and reads a module with neither __file__ nor __version__
            # as "not installed" (its PEP 420 shadowing rule); an ImportError here would stop transformers
            # 5.17-5.24 from building any model in the repository root.
            import types
            from importlib.machinery import ModuleSpec

            placeholder = types.ModuleType(name, "Placeholder: no `kernels` distribution is installed. The "
                                                 "repository's kernels/ folder is fastcd.kernels.")
            placeholder.__spec__ = ModuleSpec(name, None, is_package=True)
            placeholder.__path__ = []
            _sys.modules[name] = placeholder
            return
        module = importlib.util.module_from_spec(spec)
        _sys.modules[name] = module  # the import statement returns what sys.modules holds after this file runs
        try:
            spec.loader.exec_module(module)
        except BaseException:
            _sys.modules.pop(name, None)
            raise

    _hand_off(__name__)
