"""Reading and writing the project's JSON artifacts: one-line errors naming the argument, atomic writes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from contextlib import contextmanager

from fastcd.errors import InputFileError, UsageError


def read_json(path: str | os.PathLike, what: str = "path"):
    """The JSON value in ``path``; a missing, non-UTF-8 or malformed file is a one-line error naming ``what``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputFileError(f"{what}: no such file {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise UsageError(f"{what}: {path!r} is not UTF-8 text (invalid byte at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{what}: {path!r} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


@contextmanager
def atomic_target(path: str | os.PathLike, *, directory: bool = False):
    """Yield a temporary sibling of ``path`` to write; on success move it onto ``path`` with ``os.replace`` (a
    directory replaces the old one), on an error remove it. A reader never sees half a file or directory."""
    path = os.fspath(path).rstrip("/")
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if directory:
        os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise
    if directory:
        shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def write_json_atomic(obj, path: str | os.PathLike, *, indent: int | None = 2) -> str:
    """Write ``obj`` as JSON through a temporary file and ``os.replace``: a reader never sees half a file."""
    with atomic_target(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, default=str)
    return os.fspath(path)


_ANNOUNCED: set[str] = set()


def announce(msg: str) -> None:
    """Say ``msg`` once per process on stderr (and to the ``fastcd`` logger); ``FASTCD_QUIET=1`` silences it."""
    if msg in _ANNOUNCED:
        return
    _ANNOUNCED.add(msg)
    logging.getLogger("fastcd").info(msg)
    if os.environ.get("FASTCD_QUIET", "0") != "1":
        print(msg, file=sys.stderr)


def status(msg: str) -> None:
    """One status line on stderr (``fastcd: ...``), as a stage starts or ends; ``FASTCD_QUIET=1`` silences it."""
    if os.environ.get("FASTCD_QUIET", "0") != "1":
        print(msg, file=sys.stderr, flush=True)


def bits(correct) -> str:
    """Per-example correctness as a string of 0/1 (how run records keep it)."""
    return "".join("1" if c else "0" for c in correct)


def unbits(s: str) -> list[bool]:
    return [c == "1" for c in s]


def short_sha(obj) -> str:
    """16 hex characters of the sha1 of ``obj`` as sorted JSON (identities, provenance)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
