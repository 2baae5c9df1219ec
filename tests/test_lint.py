import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    if shutil.which("ruff") is None and subprocess.run([sys.executable, "-m", "ruff", "--version"],
                                                       capture_output=True).returncode != 0:
        pytest.fail("ruff is not installed; install the dev extra: pip install -e '.[dev]'")
    out = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_machine_paths_in_repo():
    """No absolute path of a developer's machine is written into tracked sources."""
    bad = []
    for p in list(ROOT.glob("fastcd/**/*.py")) + list(ROOT.glob("tests/*.py")) + list(ROOT.glob("*.md")):
        text = p.read_text(encoding="utf-8")
        for needle in ("/work/", "/root/", "/home/"):
            if needle in text and p.name != "test_lint.py":
                bad.append(f"{p.relative_to(ROOT)}: {needle}")
    assert not bad, bad


WRITERS = {"savefig": 0, "save_pretrained": 0, "save": 1, "save_file": 1}  # call name -> index of its path argument
NOT_FILES = {"/proc/self/clear_refs"}  # a kernel control file, not data


def _write_target(call):
    """The path expression a call writes to, or None when the call writes nothing (by its name and mode)."""
    import ast

    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
    if name == "open":
        mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
        if isinstance(mode, ast.Constant) and isinstance(mode.value, str) and "w" in mode.value:
            return call.args[0]
        return None
    if name in WRITERS and len(call.args) > WRITERS[name]:
        if name == "save" and not (isinstance(f, ast.Attribute) and getattr(f.value, "id", None) == "torch"):
            return None
        return call.args[WRITERS[name]]
    return None


def test_every_file_is_written_through_a_temporary_target():
    """fastcd and its benchmarks write files only into a temporary target (``fastcd.io.atomic_target`` and its
    helpers): a killed run never leaves half a file where a reader looks. Appending to a log is allowed, and so is
    a line marked ``# in place:`` with its reason (an API that writes into the caller's own directory)."""
    import ast

    bad = []
    for p in sorted(list(ROOT.glob("fastcd/**/*.py")) + list(ROOT.glob("benchmarks/*.py"))):
        src = p.read_text(encoding="utf-8")
        lines = src.splitlines()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Call) and (target := _write_target(node)) is not None:
                text = ast.unparse(target)
                if "# in place:" in lines[node.lineno - 1]:
                    continue
                if "tmp" not in text and not (isinstance(target, ast.Constant) and target.value in NOT_FILES):
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: writes {text}")
    assert not bad, "\n".join(bad)


def test_the_write_check_sees_a_direct_write():
    import ast

    direct = ast.parse("open(path, 'w')").body[0].value
    via_tmp = ast.parse("open(tmp, 'w')").body[0].value
    append = ast.parse("open(path, 'a')").body[0].value
    saved = ast.parse("torch.save(state, os.path.join(out, 'state.pt'))").body[0].value
    assert ast.unparse(_write_target(direct)) == "path" and ast.unparse(_write_target(via_tmp)) == "tmp"
    assert _write_target(append) is None and ast.unparse(_write_target(saved)) == "os.path.join(out, 'state.pt')"
