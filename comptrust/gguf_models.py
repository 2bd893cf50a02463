"""GGUF models: read through transformers, and the dense model each file de-quantizes to cached as safetensors.

transformers reads a GGUF file slowly: the embedded SmolLM2 takes ~25 s (most of it parsing the tokenizer's
metadata and mapping tensor names, not de-quantizing), Gemma 3 270M ~60 s, and `comptrust run` loads the dense
model once per configuration. The first load writes what it de-quantized to (fp32 weights, config, tokenizer) as
an ordinary safetensors model under the cache folder; later loads read that in about a second (0.3 s of reading,
0.4 s of checking its hashes, once transformers' modules are imported), bit for bit the same weights, tokens and
logits. An entry records the GGUF file it came from (path, size, mtime), the
transformers and gguf versions that read it, and the sha256 of each of its files: a changed source, a new reader or
a damaged entry is noticed and the entry rebuilt, never used. COMPTRUST_DENSE_CACHE=0 turns the cache off.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from comptrust.memory import copy_into_process_memory, release_memory
from comptrust.models import ModelLoadError, ModelNotFoundError, cache_root

ENTRY_FORMAT = 1
STAMP_NAME = "comptrust_source.json"  # written last: an entry without it is incomplete


def read_gguf(path: Path, dtype: torch.dtype):
    """(model, tokenizer) de-quantized from the GGUF file by transformers, uncached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_readers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except Exception as exc:  # truncated/corrupt files fail deep in the readers with struct/KeyError/...
        raise ModelLoadError(f"Could not read GGUF file {str(path)!r}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}\n"
                             "The file may be truncated or not a supported architecture.") from exc
    return model, tokenizer


def cache_enabled() -> bool:
    return os.environ.get("COMPTRUST_DENSE_CACHE", "1") != "0"


def cache_folder() -> Path:
    return cache_root() / "dense"


def entry_dir(path: Path) -> Path:
    """The cache entry of one GGUF file: one per source path (a changed file replaces its entry)."""
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return cache_folder() / f"{path.stem}-{digest}"


def source_stamp(path: Path) -> dict:
    """What an entry must have been made from to be used."""
    stat = path.stat()
    return {"format": ENTRY_FORMAT, "gguf_file": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "transformers": importlib.metadata.version("transformers"), "gguf": importlib.metadata.version("gguf")}


def current_entry(path: Path) -> Path | None:
    """The cache entry of GGUF file `path` when it is there, current and intact (what load_gguf would read: a
    plain safetensors model folder), else None."""
    if not cache_enabled():
        return None
    entry = entry_dir(path)
    try:
        return entry if entry_problem(entry, source_stamp(path)) is None else None
    except OSError:  # the GGUF file itself is gone
        return None


def load_gguf(path: Path, dtype: torch.dtype):
    """(model, tokenizer) of a GGUF file: from its cache entry when that is current and intact, else read from
    the file and cached for next time. Where the entry cannot be written the model is returned all the same."""
    if not cache_enabled():
        return read_gguf(path, dtype)
    _require_readers()  # before the stamp, which records the gguf package's version
    entry, stamp = entry_dir(path), source_stamp(path)
    problem = entry_problem(entry, stamp)
    if problem is None:
        return _read_entry(entry, dtype)
    if problem != "absent":
        print(f"comptrust: the cached copy of {path.name} in {entry} is {problem}; reading the GGUF file again",
              file=sys.stderr)
    model, tokenizer = read_gguf(path, torch.float32)
    try:
        write_entry(model, tokenizer, entry, stamp)
    except OSError as exc:
        print(f"comptrust: could not cache the de-quantized {path.name} in {entry} ({exc}); later loads read the "
              "GGUF file again", file=sys.stderr)
        return model.to(dtype), tokenizer
    del model
    release_memory()
    # Read back, so that the first load gives the very model later loads give (config without the GGUF entry).
    return _read_entry(entry, dtype)


def entry_problem(entry: Path, stamp: dict) -> str | None:
    """None when `entry` is complete, made from the source `stamp` describes, and its files hash as recorded;
    otherwise why not ("absent" when there is no entry at all)."""
    try:
        recorded = json.loads((entry / STAMP_NAME).read_text())
    except FileNotFoundError:
        return "absent" if not entry.exists() else "incomplete"
    except (OSError, ValueError):
        return "unreadable"
    if not isinstance(recorded, dict) or recorded.get("source") != stamp:
        return "from another version of the file or of its reader"
    files = recorded.get("files")
    if not isinstance(files, dict) or not files:
        return "unreadable"
    for name, digest in files.items():
        try:
            if _file_sha256(entry / name) != digest:
                return f"damaged ({name} does not match its recorded sha256)"
        except OSError:
            return f"incomplete ({name} is missing)"
    return None


def write_entry(model: torch.nn.Module, tokenizer, entry: Path, stamp: dict) -> None:
    """Write the entry beside its final place and move it there in one rename, so that a reader never sees a
    half-written entry; another process finishing first wins and this copy is dropped."""
    from comptrust.checkpoint import save_compressed

    entry.parent.mkdir(parents=True, exist_ok=True)
    scratch = entry.parent / f".{entry.name}.{os.getpid()}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        save_compressed(model, tokenizer, scratch)  # no compression config: a plain dense safetensors model
        files = {file.name: _file_sha256(file) for file in sorted(scratch.iterdir()) if file.is_file()}
        (scratch / STAMP_NAME).write_text(json.dumps({"source": stamp, "files": files}, indent=1))
        if entry.exists() and entry_problem(entry, stamp) is None:
            return  # another process wrote it meanwhile (and may be reading it now)
        shutil.rmtree(entry, ignore_errors=True)  # a stale or damaged entry of the same source
        try:
            os.rename(scratch, entry)
        except OSError:
            if entry_problem(entry, stamp) is not None:
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _require_readers() -> None:
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModelNotFoundError(f"Reading a GGUF model needs the Python package `{module}`: pip install {module}")


def _read_entry(entry: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Our own entry, checked above: a local folder, nothing fetched, no remote code.
    tokenizer = AutoTokenizer.from_pretrained(entry, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(entry, dtype=dtype, local_files_only=True)
    copy_into_process_memory(model)  # off the entry's file mapping: memory as the GGUF read gives
    return model, tokenizer


def _file_sha256(file: Path) -> str:
    with open(file, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
