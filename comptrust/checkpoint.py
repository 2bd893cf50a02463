"""Whole-model quantized checkpoints: save ours as GPTQ v1, load GPTQ v1 and AWQ GEMM (ours or other tools').

A checkpoint is a Hugging Face model directory:
  config.json          the model's config plus "quantization_config" (quant_config.py)
  model.safetensors    every quantized linear `name` as name.qweight / .qzeros / .scales / .g_idx [/ .bias]
                       (the layouts of formats/gptq.py or formats/awq.py); every other tensor dense
  tokenizer files, generation_config.json
Loading builds the model's skeleton with its parameters on the meta device (no dense weight is ever
allocated for a quantized layer), puts the dense tensors in place, swaps each quantized nn.Linear for a
QuantLinear built from its packed tensors, then ties embeddings as the config says. Only safetensors are
read: a checkpoint that ships only pickles (.bin / .pt) is refused, never unpickled.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from comptrust.compress import CompressionSummary
from comptrust.formats.awq import from_awq_tensors
from comptrust.formats.gptq import from_gptq_tensors, read_bias, to_gptq_tensors
from comptrust.memory import MappedPages, return_freed_heap
from comptrust.models import LoadedModel, ModelLoadError, ModelNotFoundError, finish_loading
from comptrust.nn.act_order_linear import ActOrderQuantLinear
from comptrust.nn.bitmap_sparse_linear import BitmapSparseLinear, bitmap_unsuited
from comptrust.nn.quant_linear import QuantLinear
from comptrust.quant_config import OUR_KEY, CheckpointQuantization, gptq_quantization_config, parse_quantization_config

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_LAYER_KEYS = {"gptq": ("qweight", "qzeros", "scales", "g_idx", "bias"), "awq": ("qweight", "qzeros", "scales", "bias")}


# ---------------------------------------------------------------------------------------------- save

@dataclass
class SavedCheckpoint:
    path: str
    files: dict[str, int]                  # file name -> bytes on disk
    quantized: list[str]                   # layers stored as GPTQ tensors
    kept_dense: dict[str, str] = field(default_factory=dict)  # linear layers stored dense -> why

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def _quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def _layer_gptq_tensors(layer: QuantLinear) -> dict[str, torch.Tensor]:
    if isinstance(layer, ActOrderQuantLinear):
        return layer.gptq_tensors()
    return to_gptq_tensors(layer.packed(), layer.bits, layer.bias)


def _one(values: dict[str, object], what: str) -> object:
    """The value every layer shares, or a ValueError naming two layers that differ (one config must fit all)."""
    distinct = {}
    for name, value in values.items():
        distinct.setdefault(value, name)
    if len(distinct) > 1:
        (v1, n1), (v2, n2) = list(distinct.items())[:2]
        raise ValueError(f"save_quantized: layers differ in {what} ({n1}: {v1}, {n2}: {v2}); a GPTQ checkpoint "
                         "holds one quantization config for all layers")
    return next(iter(distinct))


def _common_group_size(layers: dict[str, QuantLinear], config) -> int:
    """The checkpoint's group_size: -1 when every layer has one group over all its inputs (per-channel)."""
    if config is not None:
        group_size = config.group_size
    elif all(layer.group_size == layer.in_features for layer in layers.values()):
        group_size = -1
    else:
        group_size = _one({name: layer.group_size for name, layer in layers.items()}, "group size")
    for name, layer in layers.items():
        expected = layer.in_features if group_size == -1 else group_size
        if layer.group_size != expected:
            raise ValueError(f"save_quantized: {name} has group size {layer.group_size}, but the checkpoint's is "
                             f"{group_size} (expected {expected} for in_features={layer.in_features})")
    return group_size


def _tied_pairs(model: nn.Module) -> dict[str, str]:
    """{target: source} parameter names the model's config ties (e.g. lm_head.weight -> embed_tokens.weight)."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    return expand(all_submodels=True) if callable(expand) else {}


def _module_of(tensor_name: str) -> str:
    return tensor_name.rpartition(".")[0]


def _dense_tensors(model: nn.Module, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Every persistent parameter/buffer outside the quantized layers, each storage written once.

    A tied weight appears under two names with one storage; safetensors refuses to write shared storage,
    and Hugging Face loaders expect the tie target absent and re-tie it from the config. The first name
    in state_dict order is kept (for Llama-style models: the embedding, not lm_head.weight).
    """
    out, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if _module_of(key) in quantized:
            continue
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tuple(tensor.stride()), tensor.dtype)
        if view in seen:
            continue
        seen.add(view)
        tensor = tensor.detach().contiguous()
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # a view into a larger storage (sliced/fused weights): write its own copy
        out[key] = tensor
    return out


def check_out_dir(out, overwrite: bool = False) -> None:
    """Raise FileExistsError where save_quantized would refuse to write (callers check before slow work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose a new directory or pass overwrite=True "
                              "(comptrust compress --force) to replace the checkpoint files in it")


def save_quantized(model: nn.Module, tokenizer, out_dir, config=None, overwrite: bool = False) -> SavedCheckpoint:
    """Write `model` (compressed with QuantLinear layers) as a GPTQ v1 checkpoint directory.

    `config` is the compression config it was made with (e.g. RTNConfig); it names the method in the
    checkpoint and is checked against the layers. Without it, bits / group size / symmetry are read
    from the layers. Refuses a non-empty out_dir unless overwrite=True (files of the same names are
    replaced; others are left alone).
    """
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    layers = _quant_layers(model)
    if not layers:
        raise ValueError("save_quantized: the model has no QuantLinear layers; compress it first "
                         "(comptrust.compress_) or save a dense model with save_pretrained")
    bits = _one({n: m.bits for n, m in layers.items()}, "bits")
    symmetric = _one({n: m.symmetric for n, m in layers.items()}, "symmetry")
    act_bits = _one({n: m.act_bits for n, m in layers.items()}, "activation bits")
    group_size = _common_group_size(layers, config)
    if config is not None and (config.bits, config.symmetric, getattr(config, "act_bits", None)) != (bits, symmetric,
                                                                                                  act_bits):
        raise ValueError(f"save_quantized: config {config} does not describe the model's layers "
                         f"(bits={bits}, symmetric={symmetric}, act_bits={act_bits})")
    desc_act = any(isinstance(m, ActOrderQuantLinear) for m in layers.values())

    tensors = {}
    for name, layer in layers.items():
        tensors.update({f"{name}.{key}": t.contiguous() for key, t in _layer_gptq_tensors(layer).items()})
    tensors.update(_dense_tensors(model, set(layers)))
    kept_dense = {name: "not quantized" for name, m in model.named_modules()
                  if isinstance(m, nn.Linear) and name not in layers}

    model_config = copy.deepcopy(model.config)
    # A tie across a quantized layer cannot hold (a QuantLinear has no dense weight to share): say so in
    # the config, or loaders would try to tie lm_head to the embedding.
    if any(_module_of(t) in layers or _module_of(s) in layers for t, s in _tied_pairs(model).items()):
        model_config.tie_word_embeddings = False
    method = getattr(config, "method", None)  # unknown when re-saving a loaded checkpoint without its config
    tag = getattr(config, "tag", None) or (f"w{bits}g{group_size}" + ("-sym" if symmetric else "")
                                           + (f"-a{act_bits}" if act_bits else ""))
    ours = {"method": method, "tag": tag, "act_bits": act_bits, "quantized_modules": sorted(layers),
            "kept_dense": kept_dense}
    model_config.quantization_config = gptq_quantization_config(
        bits, group_size, symmetric, desc_act, lm_head=any(n.split(".")[-1] == "lm_head" for n in layers), ours=ours)

    files = _write_checkpoint(out, tensors, model_config, model, tokenizer)
    return SavedCheckpoint(str(out), files, sorted(layers), kept_dense)


def _write_checkpoint(out: Path, tensors: dict[str, torch.Tensor], model_config, model: nn.Module,
                      tokenizer) -> dict[str, int]:
    """model.safetensors, config.json, the model's generation config and the tokenizer's files into `out`, by our
    own writer rather than save_pretrained (which refuses a model loaded from GGUF, the embedded default);
    {file name: bytes} of what was written."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    model_config.save_pretrained(out)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out)
    tokenizer_files = tokenizer.save_pretrained(str(out)) if tokenizer is not None else ()
    written = [WEIGHTS_NAME, "config.json"] + (["generation_config.json"] if generation_config is not None else [])
    written += [Path(f).name for f in tokenizer_files if Path(f).is_file()]
    return {name: (out / name).stat().st_size for name in dict.fromkeys(written)}


def _save_dense(model: nn.Module, tokenizer, out: Path, config, overwrite: bool) -> SavedCheckpoint:
    """A model whose layers are nn.Linear (or bitmap layers, saved dense): an ordinary safetensors model, for a
    pruned one (`config` given) with a "comptrust_compression" entry in config.json saying what made its zeros."""
    check_out_dir(out, overwrite)
    model_config = copy.deepcopy(model.config)
    if hasattr(model_config, "quantization_config"):  # how the source was stored (e.g. GGUF), not these weights
        del model_config.quantization_config
    if config is not None:
        model_config.comptrust_compression = {"method": getattr(config, "method", None),
                                              "tag": getattr(config, "tag", None)}
    files = _write_checkpoint(out, _dense_tensors(model, set()), model_config, model, tokenizer)
    kept = {name: "dense layer" if isinstance(m, nn.Linear) else "saved dense (runs on the bitmap kernel)"
            for name, m in model.named_modules() if isinstance(m, (nn.Linear, BitmapSparseLinear))}
    return SavedCheckpoint(str(out), files, [], kept)


def save_compressed(model: nn.Module, tokenizer, out_dir, config=None, overwrite: bool = False) -> SavedCheckpoint:
    """Save a compressed model as its layers allow: QuantLinear layers as a GPTQ v1 checkpoint
    (save_quantized), 2:4 layers in our 2:4 layout (comptrust.checkpoint_sparse24), pruning that kept
    nn.Linear layers (unstructured, 4:8) as a dense safetensors model, and a dense model (config None) as a plain
    one. Mixing packed kinds is refused."""
    from comptrust.checkpoint_sparse24 import save_sparse24, sparse24_layers

    quantized, sparse = _quant_layers(model), sparse24_layers(model)
    if quantized and sparse:
        raise ValueError(f"save_compressed: the model mixes int4/int3 layers ({next(iter(quantized))}) and 2:4 layers "
                         f"({next(iter(sparse))}); one checkpoint holds one kind")
    if quantized:
        return save_quantized(model, tokenizer, out_dir, config, overwrite)
    if sparse:
        return save_sparse24(model, tokenizer, out_dir, config, overwrite)
    return _save_dense(model, tokenizer, Path(out_dir), config, overwrite)


# ---------------------------------------------------------------------------------------------- load

class _Weights:
    """Tensor name -> safetensors file, read one tensor at a time (the files are memory-mapped)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        files = self._files(path)
        self._handles, self.location = {}, {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as exc:  # SafetensorError for a truncated or non-safetensors file
                raise ModelLoadError(f"{file}: not a readable safetensors file ({exc})") from None
            self._handles[file] = handle
            for key in handle.keys():
                self.location[key] = file

    @staticmethod
    def _files(path: Path) -> list[Path]:
        if (path / WEIGHTS_NAME).is_file():
            return [path / WEIGHTS_NAME]
        if (path / WEIGHTS_INDEX_NAME).is_file():
            try:
                weight_map = json.loads((path / WEIGHTS_INDEX_NAME).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"{path / WEIGHTS_INDEX_NAME}: not a safetensors index ({exc})") from None
            files = sorted({path / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelLoadError(f"{path}: shards named in {WEIGHTS_INDEX_NAME} are missing: {missing}")
            return files
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:  # AutoGPTQ names its file after the model, e.g. gptq_model-4bit-128g.safetensors
            return files
        if files:
            raise ModelLoadError(f"{path}: several .safetensors files but no {WEIGHTS_INDEX_NAME} saying which "
                                 f"tensor is where: {[f.name for f in files]}")
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickles:
            raise ModelLoadError(f"{path}: the weights are only in pickle files {pickles}; comptrust never loads "
                                 "pickles (they can run code). Convert them to safetensors first.")
        raise ModelLoadError(f"{path}: no {WEIGHTS_NAME} (or other .safetensors weights) in the checkpoint")

    def keys(self) -> list[str]:
        return list(self.location)

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self.location[key]].get_tensor(key)


def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{str(path)!r} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{config_file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file}: expected a JSON object")
    return config


def sparsify_pruned_checkpoint(model: nn.Module, path) -> list[str]:
    """For a pruned model saved dense by save_compressed (config.json has a comptrust_compression entry and no packed
    layers): its linears go back onto the bitmap kernel where that beats dense here, as they ran when pruned
    (comptrust.nn.bitmap_sparse_linear.bitmap_unsuited; lm_head stays). Returns the layers converted."""
    from comptrust.nn.swap import replace_linears

    entry = _read_config(Path(path)).get("comptrust_compression")
    if not isinstance(entry, dict) or "format" in entry:  # not ours, or a packed layout (2:4)
        return []
    read = MappedPages()

    def to_bitmap(name: str, linear: nn.Linear) -> BitmapSparseLinear:
        layer = BitmapSparseLinear.from_linear(linear)
        read.release(linear.weight)  # where it was read from a checkpoint's file: not needed again
        return layer

    converted, _ = replace_linears(model, to_bitmap, eligible=lambda name, linear: bitmap_unsuited(linear.weight),
                                   progress=False)
    return converted


def read_checkpoint_quantization(path) -> CheckpointQuantization | None:
    """The validated quantization_config of a model directory, or None for a dense one."""
    path = Path(path)
    raw = _read_config(path).get("quantization_config")
    return None if raw is None else parse_quantization_config(raw, str(path))


def _build_skeleton(path: Path, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The model with parameters on the meta device; buffers (rotary tables) are computed for real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path}/config.json: transformers cannot read it: {str(exc).splitlines()[0]}") from None
    # Our loader, not transformers', handles the quantization: build a plain model from the config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # accelerate (already a dependency, for GGUF) puts only parameters on meta: buffers such as the rotary
    # tables are not in checkpoints and must be computed at construction, as they are here.
    with init_empty_weights(include_buffers=False):
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        except ValueError as exc:
            raise ModelLoadError(f"{path}: no causal-LM class for this config: {str(exc).splitlines()[0]}") from None


def _quantized_layers(keys: list[str], model: nn.Module, path: Path) -> list[str]:
    """The layers the checkpoint stores packed, each checked to be an nn.Linear. A layer counts as packed
    when it has a .qweight or a .qzeros, so one that lost its qweight is reported as such, by name."""
    names = sorted({_module_of(k) for k in keys if k.endswith((".qweight", ".qzeros"))})
    arch = type(model).__name__
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ModelLoadError(f"{path}: {name}.* tensors are for a layer {name!r} that {arch} does not have "
                                 "(is the checkpoint for another architecture?)") from None
        if not isinstance(module, nn.Linear):
            raise ModelLoadError(f"{path}: {name}.qweight would quantize a {type(module).__name__}, but only nn.Linear "
                                 "layers can be quantized")
    return names


def _load_dense(model: nn.Module, weights: _Weights, quantized: set[str], path: Path) -> set[str]:
    """Put every checkpoint tensor outside the quantized layers into the model; returns the names loaded."""
    expected = dict(model.named_parameters(remove_duplicate=False))
    expected.update(model.named_buffers(remove_duplicate=False))
    ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    state = {}
    for key in weights.keys():
        if _module_of(key) in quantized:
            continue
        target = expected.get(key)
        if target is None:
            if key.split(".")[-1] in ("inv_freq", "original_inv_freq") or key in ignore:
                continue  # rotary tables some older checkpoints saved; the model computes its own
            raise ModelLoadError(f"{path}: tensor {key} is not part of {type(model).__name__} "
                                 "(is the checkpoint for another architecture?)")
        tensor = weights.get(key)
        if tuple(tensor.shape) != tuple(target.shape):
            raise ModelLoadError(f"{path}: {key}: expected shape {list(target.shape)}, got {list(tensor.shape)}")
        if tensor.is_floating_point() != target.is_floating_point():
            raise ModelLoadError(f"{path}: {key}: expected a {target.dtype} tensor, got {tensor.dtype}")
        state[key] = tensor.to(target.dtype)
    # assign=True hands the tensors over instead of copying into the meta placeholders.
    model.load_state_dict(state, strict=False, assign=True)
    return set(state)


def _layer_tensors(weights: _Weights, name: str, method: str, path: Path) -> dict[str, torch.Tensor]:
    prefix = name + "."
    local = {k[len(prefix):]: k for k in weights.keys() if k.startswith(prefix)}
    unexpected = sorted(set(local) - set(_LAYER_KEYS[method]))
    if unexpected:
        raise ModelLoadError(f"{path}: {name}: unexpected tensors {[prefix + k for k in unexpected]} for a "
                             f"{method} layer (expected {', '.join(_LAYER_KEYS[method])})")
    return {k: weights.get(full) for k, full in local.items()}


def _quant_layer(linear: nn.Linear, tensors: dict, name: str, quant: CheckpointQuantization) -> QuantLinear:
    k, n = linear.in_features, linear.out_features
    if quant.quant_method == "awq":
        packed, perm = from_awq_tensors(tensors, quant.group_size, k, n, name), None
        bias = read_bias(tensors, n, name)
    else:
        packed, perm, bias = from_gptq_tensors(tensors, quant.bits, quant.group_size, k, n, name)
    if bias is None and linear.bias is not None:
        raise ValueError(f"{name}.bias: missing (expected [{n}]; the model's layer has a bias)")
    if bias is not None and linear.bias is None and not bias.any():
        bias = None  # some GPTQ writers store an all-zero bias for every layer
    if perm is not None:
        return ActOrderQuantLinear.from_act_order(packed, perm, bias, quant.symmetric, quant.act_bits)
    return QuantLinear.from_packed(packed, bias, quant.symmetric, quant.act_bits)


def _tie(model: nn.Module, present: set[str], quantized: set[str]) -> None:
    """Tie what the config ties, from whichever side the checkpoint holds (it wrote one of the two)."""
    for target, source in _tied_pairs(model).items():
        if _module_of(target) in quantized or _module_of(source) in quantized:
            continue  # a packed layer has no dense weight to share
        if source not in present:
            target, source = source, target
        if source not in present:
            continue  # both missing: reported by _check_complete
        if target in present and not torch.equal(model.get_parameter(target), model.get_parameter(source)):
            continue  # both stored and different: the checkpoint does not tie them (transformers does the same)
        parent, _, leaf = target.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, model.get_parameter(source))
        present.add(target)


def _check_complete(model: nn.Module, path: Path) -> None:
    missing = [(name, t) for name, t in list(model.named_parameters(remove_duplicate=False))
               + list(model.named_buffers(remove_duplicate=False)) if t.is_meta]
    if missing:
        listed = "; ".join(f"{name} (expected {list(t.shape)} {str(t.dtype).removeprefix('torch.')})"
                           for name, t in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(f"{path}: the checkpoint is missing tensors: {listed}{more}")


def quantized_model(path: Path, skeleton: Callable[[], nn.Module]):
    """(model, quantization, quantized layer names) of a GPTQ v1 / AWQ GEMM checkpoint directory: `skeleton()`
    (parameters on the meta device, of the dtype the dense tensors take) with the dense tensors in place, each
    quantized nn.Linear swapped for a QuantLinear built from its packed tensors, ties made and every tensor checked
    present."""
    quant = read_checkpoint_quantization(path)
    if quant is None:
        raise ModelLoadError(f"{path}/config.json has no quantization_config: not a quantized checkpoint "
                             "(load it with comptrust.load_model)")
    weights = _Weights(path)
    model = skeleton()
    quantized = _quantized_layers(weights.keys(), model, path)
    if not quantized:
        raise ModelLoadError(f"{path}: config.json says {quant.quant_method}, but no tensor ends in .qweight")
    listed = quant.modules
    if listed is not None and sorted(listed) != quantized:
        absent, extra = sorted(set(listed) - set(quantized)), sorted(set(quantized) - set(listed))
        raise ModelLoadError(f"{path}: config.json's quantized_modules and the packed tensors disagree; "
                             f"missing: {[n + '.qweight' for n in absent[:5]]}, not listed: {extra[:5]}")
    present = _load_dense(model, weights, set(quantized), path)
    read = MappedPages()
    for layer_name in quantized:
        parent_name, _, child = layer_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        tensors = _layer_tensors(weights, layer_name, quant.quant_method, path)
        try:
            layer = _quant_layer(getattr(parent, child), tensors, layer_name, quant)
        except ValueError as exc:
            raise ModelLoadError(f"{path}: {exc}") from None
        setattr(parent, child, layer)
        for tensor in tensors.values():  # read into the layer's own form: the file's pages are not needed again
            read.release(tensor)
        return_freed_heap()  # the repacking's temporaries
    complete_tensors(model, path, present, set(quantized))
    return model, quant, quantized


def load_dense_tensors(path: Path, skeleton: Callable[[], nn.Module]) -> nn.Module:
    """`skeleton()` filled from a checkpoint without packed layers (dense, or pruned and saved dense: those layers
    go back onto the bitmap kernel, sparsify_pruned_checkpoint), ties made and every tensor checked present."""
    weights = _Weights(path)
    model = skeleton()
    complete_tensors(model, path, _load_dense(model, weights, set(), path), set())
    sparsify_pruned_checkpoint(model, path)
    return model


def load_quantized(path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                   name: str | None = None) -> LoadedModel:
    """Load a GPTQ v1 or AWQ GEMM checkpoint directory onto comptrust's packed kernels.

    Dense tensors (embeddings, norms, layers left unquantized) are converted to `dtype`; the packed
    layers keep their fp16 scales. Errors name the file or tensor at fault (ModelNotFoundError for a
    missing directory/config, ModelLoadError for everything the files get wrong or we do not support).
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    model, quant, quantized = quantized_model(path, lambda: _build_skeleton(path, dtype, trust_remote_code))
    tokenizer = finish_checkpoint(model, path, trust_remote_code)
    kept = {n: "not quantized in the checkpoint" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    # The report's row for this model: the layers listed once (in `quantized`), not again in the config.
    config = {key: value for key, value in quant.raw.items() if key != OUR_KEY}
    ours = {key: value for key, value in (quant.raw.get(OUR_KEY) or {}).items()
            if key not in ("quantized_modules", "kept_dense")}
    summary = CompressionSummary(quant.tag, {"checkpoint": str(path.resolve()), **config, OUR_KEY: ours},
                                 quantized, kept)
    return finish_loading(model, tokenizer, name or path.name, str(path.resolve()), quantization=quant,
                          compression=summary)


def complete_tensors(model: nn.Module, path: Path, present: set[str], packed: set[str]) -> None:
    """Ties, then the check that no tensor was left on the meta device: how every checkpoint load ends."""
    _tie(model, present, packed)
    _check_complete(model, path)


def finish_checkpoint(model: nn.Module, path: Path, trust_remote_code: bool):
    """What a checkpoint load for transformers ends with once complete_tensors is done: the generation config;
    returns the tokenizer."""
    generation_file = path / "generation_config.json"
    if generation_file.is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return _load_tokenizer(path, trust_remote_code)


def _load_tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: no usable tokenizer files in the checkpoint ({str(exc).splitlines()[0]})") \
            from None
