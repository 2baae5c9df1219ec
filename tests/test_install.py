"""The repository's own top-level folders never shadow an installed distribution's modules.

Any process whose ``sys.path`` holds the repository root (``python -m pytest``, ``python -c`` in a checkout) sees
its top-level folders as importable names. transformers >= 5.25 imports Hugging Face's ``kernels`` distribution
whenever a model class is built, and the project's Triton folder is also called ``kernels/`` (installed as
``fastcd.kernels``): these tests start Python in the repository root, as a user's shell would.
"""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_in_root(code: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    # "-c" puts the current directory (the repository root) first on sys.path, as `python -m pytest` does
    env = {**os.environ, **(env_extra or {})}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)


def _inside_repo(path: str | None) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(ROOT)


def test_import_kernels_in_the_repository_root_never_yields_the_repository_folder():
    """`import kernels` either fails or gives a module outside the repository, and a transformers model builds
    there (with transformers >= 5.25 the build itself imports `kernels`)."""
    p = _run_in_root("""
        try:
            import os, kernels
            where = [getattr(kernels, "__file__", None) or "", *getattr(kernels, "__path__", [])]
            print("KERNELS", [os.path.abspath(w) for w in where if w])
        except ImportError as e:
            print("KERNELS-IMPORT-ERROR", e)
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2)
        print("BUILT", type(LlamaForCausalLM(cfg)).__name__)
    """)
    assert p.returncode == 0, p.stderr[-2000:]
    line = next(s for s in p.stdout.splitlines() if s.startswith("KERNELS"))
    if line.startswith("KERNELS "):
        where = ast.literal_eval(line[len("KERNELS "):])
        assert not any(_inside_repo(w) for w in where), f"`import kernels` in the repository root gave: {line}"
    assert "BUILT LlamaForCausalLM" in p.stdout


def test_without_a_kernels_distribution_import_kernels_yields_nothing_of_the_repository():
    """With no other `kernels` on sys.path, `import kernels` gives an empty placeholder: no file, no submodules
    (`kernels.cka` is not importable through it), nothing of the repository's folder; and transformers, which
    imports `kernels` to probe it, still builds a model."""
    p = _run_in_root("""
        import sys
        sys.path = [p for p in sys.path if "-packages" not in p]  # no installed distributions at all
        import kernels
        print("FILE", getattr(kernels, "__file__", None), "PATH", list(kernels.__path__), "ATTRS",
              sorted(a for a in vars(kernels) if not a.startswith("__")))
        try:
            import kernels.cka
            print("SUBMODULE", kernels.cka.__file__)
        except ImportError:
            print("NO-SUBMODULE")
    """)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.splitlines() == ["FILE None PATH [] ATTRS []", "NO-SUBMODULE"], p.stdout


def test_transformers_builds_a_model_in_the_root_when_kernels_is_not_installed(tmp_path):
    """transformers 5.17-5.24 import `kernels` to probe it when no distribution metadata names it: the
    placeholder must read as "not installed" there, not raise. Simulated by hiding an installed `kernels`."""
    p = _run_in_root("""
        import importlib.machinery as machinery
        import importlib.metadata as metadata

        # as if no `kernels` distribution were installed: its files and its metadata are hidden
        real_find, real_version, real_pd = machinery.PathFinder.find_spec.__func__, metadata.version, \
            metadata.packages_distributions

        def find_spec(cls, name, path=None, target=None):
            spec = real_find(cls, name, path, target)
            hidden = name.split(".")[0] == "kernels" and spec is not None and "-packages" in str(spec.origin)
            return None if hidden else spec

        def version(dist):
            if dist.lower() == "kernels":
                raise metadata.PackageNotFoundError(dist)
            return real_version(dist)

        machinery.PathFinder.find_spec = classmethod(find_spec)
        metadata.version = version
        metadata.packages_distributions = lambda: {k: v for k, v in real_pd().items() if k != "kernels"}
        import kernels
        assert getattr(kernels, "__file__", None) is None and list(kernels.__path__) == [], kernels
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2)
        print("BUILT", type(LlamaForCausalLM(cfg)).__name__)
    """)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "BUILT LlamaForCausalLM" in p.stdout


def test_fastcd_kernels_still_imports_as_a_subpackage():
    p = _run_in_root("""
        import fastcd.kernels, fastcd.kernels.cka
        print(fastcd.kernels.__name__, fastcd.kernels.cka.cka_loss_triton.__name__)
    """, {"TRITON_INTERPRET": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["fastcd.kernels", "cka_loss_triton"]


def test_no_top_level_folder_shadows_an_installed_distribution(tmp_path):
    """Every top-level folder of the repository (`kernels`, `csrc`, `configs`, `benchmarks`, `tests`, ...) loses
    to a regular package of the same name installed anywhere on sys.path (PyPI has `configs`, `benchmarks` and
    Hugging Face's `kernels`). `fastcd` is the project's own package and is meant to be found."""
    names = sorted(p.name for p in ROOT.iterdir()
                   if p.is_dir() and p.name.isidentifier() and p.name not in ("fastcd", "build", "dist"))
    assert {"kernels", "csrc", "configs", "benchmarks", "tests"} <= set(names)
    site = tmp_path / "site"
    for n in names:
        (site / n).mkdir(parents=True)
        (site / n / "__init__.py").write_text(f"WHO = 'installed {n}'\n")
    p = _run_in_root(f"""
        import importlib, sys
        sys.path.insert(1, {str(site)!r})  # right after the repository root (sys.path[0]), as site-packages is
        for n in {names!r}:
            m = importlib.import_module(n)
            print(n, getattr(m, "WHO", "REPOSITORY " + str(getattr(m, "__file__", None) or list(m.__path__))))
    """)
    assert p.returncode == 0, p.stderr[-2000:]
    got = dict(line.split(" ", 1) for line in p.stdout.splitlines())
    assert got == {n: f"installed {n}" for n in names}, got


def _readme_test_command() -> str:
    import re

    text = (ROOT / "README.md").read_text()
    cmds = [c.strip() for c in re.findall(r"```bash\n(.*?)```", text, flags=re.S) if "pytest" in c]
    assert cmds, "README has no bash block with the test command"
    return cmds[0]


def test_ci_builds_a_fresh_venv_and_runs_the_readme_test_command():
    """CI sees what a new user gets: a new venv every run, README's pinned CPU torch first, README's test command
    verbatim, from the repository root."""
    ci = (ROOT / ".ci" / "run").read_text()
    body = [s for s in ci.splitlines() if s.strip() and not s.lstrip().startswith("#")]
    assert 'cd "$(dirname "$0")/.."' in body, "CI must run from the repository root"
    venv = next(i for i, s in enumerate(body) if "-m venv" in s and "mktemp" not in s)
    assert "mktemp" in ci and "$tmp/venv" in body[venv], "CI must make its venv in a new temporary folder"
    torch = next(i for i, s in enumerate(body) if "install" in s and "torch==" in s)
    pin = body[torch].split("torch==")[1].split()[0]
    assert f"pip install torch=={pin}" in (ROOT / "README.md").read_text(), "CI's torch pin differs from README's"
    test = body.index(_readme_test_command())
    assert venv < torch < test, "CI must make the venv, then install torch, then run README's test command"
