"""Reading and writing the project's JSON artifacts: one-line errors naming the argument, atomic writes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
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
    if directory and os.path.exists(path):  # the old directory steps aside first: never a moment with neither
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def write_text_atomic(text: str, path: str | os.PathLike) -> str:
    """Write ``text`` (UTF-8) through a temporary file and ``os.replace``: a reader never sees half a file."""
    with atomic_target(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return os.fspath(path)


def write_json_atomic(obj, path: str | os.PathLike, *, indent: int | None = 2) -> str:
    """Write ``obj`` as JSON through a temporary file and ``os.replace``: a reader never sees half a file."""
    with atomic_target(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, default=str)
    return os.fspath(path)


_SAID_ONCE: set[str] = set()


def status_once(msg: str) -> None:
    """Say ``msg`` once per process on stderr (and to the ``fastcd`` logger); ``FASTCD_QUIET=1`` silences it."""
    if msg in _SAID_ONCE:
        return
    _SAID_ONCE.add(msg)
    logging.getLogger("fastcd").info(msg)
    if os.environ.get("FASTCD_QUIET", "0") != "1":
        print(msg, file=sys.stderr)


def experiment_status(msg: str) -> None:
    """One timestamped line of an experiment's progress on stdout (``HH:MM:SS experiment: ...``)."""
    print(time.strftime("%H:%M:%S"), "experiment:", msg, flush=True)


def status(msg: str) -> None:
    """One status line on stderr (``fastcd: ...``), as a stage starts or ends; ``FASTCD_QUIET=1`` silences it."""
    if os.environ.get("FASTCD_QUIET", "0") != "1":
        print(msg, file=sys.stderr, flush=True)


def correct_as_bits(correct) -> str:
    """Per-example correctness as a string of 0/1 (how run records keep it)."""
    return "".join("1" if c else "0" for c in correct)


def correct_from_bits(s: str) -> list[bool]:
    """The inverse of :func:`correct_as_bits`."""
    return [c == "1" for c in s]


def short_sha(obj) -> str:
    """16 hex characters of the sha1 of ``obj`` as sorted JSON (identities, provenance)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
