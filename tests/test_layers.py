"""The package's layering: a module imports only modules of its own stage or lower ones (at the top or inside a
function), and no module under fastcd/ is much over 400 lines."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "fastcd"

# lowest first; a module may import its own stage and every stage above it in this list
STAGES = [
    {"errors", "io", "vocab", "config", "cli_args"},
    {"_ext", "_C", "reference", "models", "tokenizer", "tasks", "tasks.base", "tasks.protocol", "tasks.entity_tracking",
     "tasks.tom", "tasks.registry", "tasks.dataset"},
    {"loading", "convert", "zoo", "hooks", "trainable", "cka", "kernels", "kernels.cka", "info", "stats", "plots",
     "stages"},
    {"artifacts", "metrics", "adapters"},
    {"discover", "attribution", "path_patching", "discover_policy", "circuit_search", "match", "pretrain"},
    {"distillation", "teacher_cache", "training", "card", "resume", "ranks", "cost", "pipeline"},
    {"experiment_config", "plan", "report", "shared_work", "experiment", "demo", "discover_run", "match_run"},
    {"cli", "__main__"},
]
STAGE = {m: i for i, s in enumerate(STAGES) for m in s}
# torch-free modules the CLI's --help reads: they may name a higher module only inside a function (run time)
RUNTIME_ONLY = {"config": {"cka", "loading"}, "cli_args": set()}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastcd"):
            names = [node.module[len("fastcd."):]] if node.module != "fastcd" else [a.name for a in node.names]
            for n in names:
                if n != "__version__":  # the package's version string, not a module
                    yield n, node
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("fastcd."):
                    yield a.name[len("fastcd."):], node


def _top_level(tree):
    return {id(n) for n in tree.body}


def test_no_module_imports_a_higher_stage():
    bad, unknown = [], []
    for path in sorted(ROOT.rglob("*.py")):
        mod = _module_name(path)
        if mod == "" or mod not in STAGE:
            if mod:
                unknown.append(mod)
            continue
        tree = ast.parse(path.read_text())
        top = _top_level(tree)
        for target, node in _imports(tree):
            target = target.split(".")[0] if target.split(".")[0] in ("tasks", "kernels") and target not in STAGE \
                else target
            if target not in STAGE:
                unknown.append(f"{mod} -> {target}")
                continue
            if STAGE[target] > STAGE[mod]:
                lazy_ok = target in RUNTIME_ONLY.get(mod, set()) and id(node) not in top
                if not lazy_ok:
                    bad.append(f"{mod} (stage {STAGE[mod]}) imports {target} (stage {STAGE[target]})")
    assert not unknown, f"modules missing from the stage table: {unknown}"
    assert not bad, bad


# where a module may import a fastcd module inside a function instead of at the top, and why
LAZY_OK = {
    "": "fastcd/__init__.py loads every public name on first use (import fastcd stays torch-free)",
    "cli": "torch-free --help: each command imports its module when it runs",
    "config": "torch-free (the CLI's parsers read it); validate() imports the torch-side checks",
    "cli_args": "torch-free (the CLI's parsers read it)",
    "experiment_config": "torch-free (fastcd experiment --help and --plan read it)",
    "convert": "torch-free until a conversion runs (fastcd models lists without torch)",
    "info": "reports what imports, so it tries each module",
}
OPTIONAL = ("_C", "kernels")  # the C++ extension and the Triton kernels: optional, imported where used


def test_in_function_imports_are_listed():
    """Every other module imports fastcd modules at its top; in-function imports only where LAZY_OK says why, or of
    the optional extension and kernels."""
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        mod = _module_name(path)
        if mod in LAZY_OK or mod.startswith("kernels"):
            continue
        tree = ast.parse(path.read_text())
        top = _top_level(tree)
        for target, node in _imports(tree):
            if id(node) not in top and not target.startswith(OPTIONAL):
                bad.append(f"{mod} imports {target} inside a function (line {node.lineno})")
    assert not bad, bad


def test_no_import_circles():
    """No two modules import each other, directly or through others, even inside a function: every module can be
    read (and imported) after the ones it names."""
    graph = {}
    for path in sorted(ROOT.rglob("*.py")):
        mod = _module_name(path)
        graph[mod] = {t for t, _ in _imports(ast.parse(path.read_text())) if t != mod}
    graph = {m: {t for t in deps if t in graph} for m, deps in graph.items()}
    state, cycles = {}, []

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t] if t in path else [m, t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_readme_stage_table_is_this_one():
    """README's layout block lists the same modules in the same stages as STAGES (one table, tested)."""
    import re

    text = (ROOT.parent / "README.md").read_text()
    found = re.search(r"^```\n(0  .*?)^```", text, flags=re.S | re.M)
    assert found, "README has no stage table (a block whose first line starts with '0  ')"
    block = found.group(1)
    readme = [set(line.split()[1:]) for line in block.strip().splitlines()]
    assert [int(line.split()[0]) for line in block.strip().splitlines()] == list(range(len(STAGES)))
    assert readme == STAGES


def test_modules_stay_small():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in ROOT.rglob("*.py")}
    big = {k: v for k, v in sizes.items() if v > 420}
    assert not big, big


def test_the_torch_free_modules_import_without_torch():
    import subprocess
    import sys

    code = ("import sys\nimport fastcd, fastcd.config, fastcd.cli_args, fastcd.experiment_config, fastcd.errors\n"
            "assert 'torch' not in sys.modules\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
