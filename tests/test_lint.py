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
