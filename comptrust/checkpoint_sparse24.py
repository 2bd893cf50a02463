"""2:4 sparse checkpoints in comptrust's own layout (GPTQ v1 has no 2:4 format, and Hugging Face none either).

A Hugging Face model directory whose config.json carries, instead of a quantization_config,
    "comptrust_compression": {"format": "comptrust-sparse24", "version": 1, "method": ..., "tag": ...,
                              "layers": {"model.layers.0.mlp.up_proj": {"kind": "sparse24"}, ...}}
and whose model.safetensors holds, per listed layer (the layouts of comptrust/formats/sparse24.py):
    kind "sparse24":       name.values [out, in/2] (float32/bfloat16/float16), name.meta [out, in/8] uint8
    kind "sparse24_int4":  name.qweight [in/16, out] int32, name.qzeros [groups, out/8] int32,
                           name.scales [groups, out] float16, name.meta [out, in/8] uint8,
                           with "group_size" (kept values per group), "symmetric" and, for layers on int8
                           activations, "act_bits": 8 in the layer's entry
    name.bias when the layer has one; every other tensor dense, a tied embedding once.
Loading builds the skeleton on the meta device, checks every packed tensor's shape, dtype and metadata
(a corrupt nibble is refused by name), and swaps in Sparse24Linear / Sparse24Int4Linear.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from comptrust.checkpoint import (WEIGHTS_NAME, SavedCheckpoint, _build_skeleton, _dense_tensors, _load_dense,
                                  _module_of, _read_config, _tied_pairs, _Weights, check_out_dir, complete_tensors,
                                  finish_checkpoint)
from comptrust.compress import CompressionSummary
from comptrust.formats.int4 import Int4Packed
from comptrust.formats.sparse24 import Sparse24Int4Packed, Sparse24Packed, _decode_meta
from comptrust.memory import MappedPages, return_freed_heap
from comptrust.models import LoadedModel, ModelLoadError, ModelNotFoundError, finish_loading
from comptrust.nn.sparse24_linear import Sparse24Int4Linear, Sparse24Linear

KEY = "comptrust_compression"
FORMAT = "comptrust-sparse24"
_KEYS = {"sparse24": ("values", "meta", "bias"), "sparse24_int4": ("qweight", "qzeros", "scales", "meta", "bias")}


def sparse24_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (Sparse24Linear, Sparse24Int4Linear))}


def _entry(layer: nn.Module) -> dict:
    if isinstance(layer, Sparse24Int4Linear):
        entry = {"kind": "sparse24_int4", "group_size": layer.group_size, "symmetric": layer.symmetric}
        return entry | ({"act_bits": layer.act_bits} if layer.act_bits else {})
    return {"kind": "sparse24"}


def save_sparse24(model: nn.Module, tokenizer, out_dir, config=None, overwrite: bool = False) -> SavedCheckpoint:
    """Write a model with Sparse24Linear / Sparse24Int4Linear layers (and otherwise dense ones)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    check_out_dir(out, overwrite)
    layers = sparse24_layers(model)
    if not layers:
        raise ValueError("save_sparse24: the model has no 2:4 layers")
    tensors = {}
    for name, layer in layers.items():
        tensors.update({f"{name}.{key}": t.contiguous() for key, t in layer.state_dict().items()})
    tensors.update(_dense_tensors(model, set(layers)))
    kept_dense = {name: "dense layer" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    model_config = copy.deepcopy(model.config)
    if any(_module_of(t) in layers or _module_of(s) in layers for t, s in _tied_pairs(model).items()):
        model_config.tie_word_embeddings = False  # a packed layer has no dense weight to share
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    model_config.save_pretrained(out)
    config_file = out / "config.json"
    raw = json.loads(config_file.read_text())
    raw[KEY] = {"format": FORMAT, "version": 1, "method": getattr(config, "method", None),
                "tag": getattr(config, "tag", None), "layers": {name: _entry(m) for name, m in layers.items()}}
    config_file.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    files = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
    return SavedCheckpoint(str(out), files, sorted(layers), kept_dense)


def read_sparse24_entry(path) -> dict | None:
    """The comptrust_compression entry of a 2:4 checkpoint directory, None for any other directory."""
    try:
        entry = json.loads((Path(path) / "config.json").read_text()).get(KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return entry if isinstance(entry, dict) and entry.get("format") == FORMAT else None


def _layer(name: str, linear: nn.Linear, entry: dict, weights: _Weights, path: Path, read: MappedPages) -> nn.Module:
    kind = entry.get("kind")
    if kind not in _KEYS:
        raise ModelLoadError(f"{path}: {name}: unknown layer kind {kind!r} (expected one of {sorted(_KEYS)})")
    tensors = {key: weights.get(f"{name}.{key}") for key in _KEYS[kind] if f"{name}.{key}" in weights.location}
    missing = [f"{name}.{key}" for key in _KEYS[kind] if key != "bias" and key not in tensors]
    if missing:
        raise ModelLoadError(f"{path}: {name}: missing tensors {missing}")
    bias = tensors.get("bias")
    if (bias is None) != (linear.bias is None):
        state = "missing" if bias is None else "unexpected"
        raise ModelLoadError(f"{path}: {name}.bias: {state} for the model's layer")
    try:
        _decode_meta(tensors["meta"], f"{name}.meta")
        if kind == "sparse24":
            packed = Sparse24Packed(tensors["values"], tensors["meta"])
            layer = Sparse24Linear.from_packed(packed, bias)
        else:
            qvalues = Int4Packed(tensors["qweight"], tensors["qzeros"], tensors["scales"], int(entry["group_size"]))
            layer = Sparse24Int4Linear.from_packed(Sparse24Int4Packed(qvalues, tensors["meta"]), bias,
                                                   bool(entry.get("symmetric", False)), entry.get("act_bits"))
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{path}: {name}: {exc}") from None
    if (layer.in_features, layer.out_features) != (linear.in_features, linear.out_features):
        raise ModelLoadError(f"{path}: {name}: tensors describe a [{layer.out_features}, {layer.in_features}] layer, "
                             f"the model's is [{linear.out_features}, {linear.in_features}]")
    for tensor in tensors.values():  # read into the layer's own form: the file's pages are not needed again
        read.release(tensor)
    return layer


def sparse24_model(path: Path, skeleton: Callable[[], nn.Module]) -> tuple[nn.Module, dict]:
    """(model, comptrust_compression entry) of a directory written by save_sparse24: `skeleton()` (parameters on the
    meta device) with the dense tensors in place and its listed layers on the 2:4 kernels, ties made and every
    tensor checked present."""
    entry = read_sparse24_entry(path)
    if entry is None or not isinstance(entry.get("layers"), dict):
        raise ModelLoadError(f"{path}/config.json has no {KEY} entry of format {FORMAT!r} with its layers")
    _read_config(path)
    weights = _Weights(path)
    model = skeleton()
    listed = entry["layers"]
    for layer_name in listed:
        try:
            module = model.get_submodule(layer_name)
        except AttributeError:
            raise ModelLoadError(f"{path}: lists a 2:4 layer {layer_name!r} that {type(model).__name__} does not have")
        if not isinstance(module, nn.Linear):
            raise ModelLoadError(f"{path}: {layer_name} is a {type(module).__name__}, not an nn.Linear")
    present = _load_dense(model, weights, set(listed), path)
    read = MappedPages()
    for layer_name, layer_entry in listed.items():
        parent_name, _, child = layer_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _layer(layer_name, getattr(parent, child), layer_entry, weights, path, read))
        return_freed_heap()  # the repacking's temporaries
    complete_tensors(model, path, present, set(listed))
    return model, entry


def load_sparse24(path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                  name: str | None = None) -> LoadedModel:
    """Load a directory written by save_sparse24 onto the 2:4 kernels (dense tensors converted to dtype)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    model, entry = sparse24_model(path, lambda: _build_skeleton(path, dtype, trust_remote_code))
    listed = entry["layers"]
    tokenizer = finish_checkpoint(model, path, trust_remote_code)
    kept = {n: "dense in the checkpoint" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    tag = entry.get("tag") or "sparse24"
    summary = CompressionSummary(tag, {"checkpoint": str(path.resolve()), KEY: {k: v for k, v in entry.items()
                                                                                 if k != "layers"}},
                                 sorted(listed), kept)
    return finish_loading(model, tokenizer, name or path.name, str(path.resolve()), compression=summary)
