"""Calibration data and the layer-by-layer pass that GPTQ, SparseGPT and Wanda compress through.

Data: `nsamples` windows of `seqlen` tokens taken at seeded random offsets from a text: the built-in
sample (ours, not the perplexity text, so evaluation never sees its calibration data), a local .txt or
.jsonl file (a "text" field per line), or an HF dataset id when online.

The pass (as the reference GPTQ code runs it, generalised): the decoder blocks run one at a time on the
calibration activations. Inside a block, the linear layers that read the same input tensor form a group
(q/k/v, then o, then gate/up, then down in a Llama block) and share one set of input statistics (one
Hessian for q/k/v, not three). With true_sequential, each group is a stage: the block runs on every
sample, stopping once the group's input is seen, the group is compressed and swapped in, and later stages
see the compressed earlier ones. The block's compressed output is the next block's input.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn

from comptrust.nn.swap import name_matches

BUILTIN_CALIBRATION = "calibration_sample.txt"


# ------------------------------------------------------------------------------------------ data

def builtin_calibration_text() -> str:
    return files("comptrust.compress").joinpath("data", BUILTIN_CALIBRATION).read_text(encoding="utf-8")


def _read_jsonl(path: Path) -> str:
    texts = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"calibration file {path}: line {number} is not JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"calibration file {path}: line {number} has no string field 'text'")
            texts.append(record["text"])
    return "\n\n".join(texts)


def _hf_dataset_text(dataset_id: str, online: bool) -> str:
    if not online:
        raise ValueError(f"calibration source {dataset_id!r} is neither 'builtin' nor a local file; reading it "
                         "as a Hugging Face dataset id needs --online")
    try:
        import datasets
    except ImportError:
        raise ValueError("reading an HF dataset needs `pip install datasets`") from None
    name, _, config = dataset_id.partition(":")
    data = datasets.load_dataset(name, config or None, split="train")
    column = "text" if "text" in data.column_names else data.column_names[0]
    return "\n\n".join(str(t) for t in data[column][:20000])


def calibration_text(source: str = "builtin", online: bool = False) -> str:
    """'builtin', a path to a .txt / .jsonl file, or (online) an HF dataset id ('name' or 'name:config')."""
    if source == "builtin":
        return builtin_calibration_text()
    path = Path(source)
    if path.is_file():
        return _read_jsonl(path) if path.suffix == ".jsonl" else path.read_text(encoding="utf-8")
    return _hf_dataset_text(source, online)


def calibration_tokens(tokenizer, source: str = "builtin", nsamples: int = 128, seqlen: int = 512, seed: int = 0,
                       online: bool = False) -> torch.Tensor:
    """[nsamples, seqlen] token ids: windows at seeded random offsets of the tokenized source text."""
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"calibration: nsamples={nsamples} and seqlen={seqlen} must be positive")
    ids = tokenizer(calibration_text(source, online), return_tensors="pt")["input_ids"][0]
    if ids.numel() < seqlen:
        raise ValueError(f"calibration source {source!r} has {ids.numel()} tokens, fewer than seqlen={seqlen}; "
                         "use a shorter --calib-seqlen or a longer text")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


# ------------------------------------------------------------------------------------------ pass

class InputStatistics(Protocol):
    """What a method gathers from a layer's inputs: the Hessian (GPTQ, SparseGPT), column norms (Wanda)."""

    def add_batch(self, x: torch.Tensor) -> None: ...


class CalibratedMethod(Protocol):
    """A config of a method that compresses through this pass (GPTQConfig, AWQConfig, SparseGPTConfig,
    WandaConfig). It may also define prepare_stage(layer, groups, linears, statistics), called once a stage's
    statistics are in and before its layers are compressed (AWQ searches and folds its scales there)."""
    true_sequential: bool

    def why_ineligible(self, name: str, linear: nn.Linear) -> str | None: ...

    def statistics(self, in_features: int) -> InputStatistics: ...

    def compress(self, name: str, linear: nn.Linear, statistics: InputStatistics) -> tuple[nn.Module, dict]: ...


@dataclass
class LayerwiseResult:
    replaced: list[str] = field(default_factory=list)
    kept_dense: dict[str, str] = field(default_factory=dict)
    stats: dict[str, dict] = field(default_factory=dict)  # layer name -> the stats compress() returned
    seconds: float = 0.0


class _StopForward(Exception):
    """Raised by a hook once a stage's inputs are recorded: the rest of the block need not run."""


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder blocks (model.model.layers in Llama/Gemma/Qwen/Mistral...)."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (count is None or len(module) == count):
            return name, module
    raise ValueError(f"{type(model).__name__}: no list of {count} decoder layers found; the layer-by-layer "
                     "calibration needs a decoder-only model with a ModuleList of blocks")


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _block_inputs(model: nn.Module, layers: nn.ModuleList, tokens: torch.Tensor):
    """Per sample, the hidden states entering block 0; per block, the other arguments it is called with
    (masks, rotary embeddings: the same for every sample of one length). One full forward for the latter,
    then the embeddings only."""
    kwargs_per_layer: list[dict | None] = [None] * len(layers)
    inputs: list[torch.Tensor] = []

    def record(index):
        def hook(module, args, kwargs):
            if kwargs_per_layer[index] is None:
                kwargs_per_layer[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                kwargs_per_layer[index]["_extra_args"] = args[1:]
            if index == 0:
                inputs.append(_hidden_of(args, kwargs).detach().clone())
                if all(kw is not None for kw in kwargs_per_layer):
                    raise _StopForward
        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    tokens = tokens.to(next(model.parameters()).device)
    try:
        for sample in tokens:
            try:
                model(input_ids=sample.unsqueeze(0), use_cache=False)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return inputs, kwargs_per_layer


def _run_block(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    extra = kwargs.get("_extra_args", ())
    out = layer(hidden, *extra, **{k: v for k, v in kwargs.items() if k != "_extra_args"})
    return out[0] if isinstance(out, tuple) else out


@dataclass
class InputGroup:
    """Linears of one block that read the same input tensor, and the submodule that produced it (e.g. the
    RMSNorm before q/k/v), or None when the input is not a module's output (attention output, act * up)."""
    names: list[str]
    producer: str | None = None


def _input_groups(layer: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor,
                  kwargs: dict) -> list[InputGroup]:
    """Linears grouped by the input tensor they read, in execution order: q/k/v, o, gate/up, down."""
    # The tensors themselves are kept (not their addresses): a freed tensor's memory can be reused.
    seen: list[tuple[str, torch.Tensor]] = []
    outputs: list[tuple[str, torch.Tensor]] = []
    handles = [module.register_forward_hook(lambda m, args, out, name=name: seen.append((name, args[0])))
               for name, module in linears.items()]
    handles += [module.register_forward_hook(lambda m, args, out, name=name: outputs.append((name, out)))
                for name, module in layer.named_modules() if name and name not in linears]
    try:
        _run_block(layer, hidden, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[InputGroup] = []
    previous = None
    for name, tensor in seen:
        if any(name in group.names for group in groups):
            continue
        if tensor is not previous:
            producer = next((module for module, out in outputs if out is tensor), None)
            groups.append(InputGroup([], producer))
        groups[-1].names.append(name)
        previous = tensor
    missing = [name for name in linears if not any(name in group.names for group in groups)]
    return groups + ([InputGroup(missing)] if missing else [])


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _gather(layer: nn.Module, linears: dict[str, nn.Linear], groups: list[InputGroup], method: CalibratedMethod,
            hidden_states: list[torch.Tensor], kwargs: dict) -> dict[str, InputStatistics]:
    """Run the block on every sample and feed each input group's statistics (one per group: its layers read
    the same tensor), stopping each run once the last group has been fed. Returns {first layer: statistics}."""
    statistics = {group.names[0]: method.statistics(linears[group.names[0]].in_features) for group in groups}
    fed: set[str] = set()

    def feed(name: str, x: torch.Tensor) -> None:
        statistics[name].add_batch(x)
        fed.add(name)
        if len(fed) == len(statistics):
            raise _StopForward

    handles = [linears[first].register_forward_hook(lambda m, args, out, first=first: feed(first, args[0]))
               for first in statistics]
    try:
        for hidden in hidden_states:
            fed.clear()
            try:
                _run_block(layer, hidden, kwargs)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return statistics


@torch.inference_mode()
def compress_layerwise(model: nn.Module, tokens: torch.Tensor, method: CalibratedMethod,
                       skip: tuple[str, ...] = ("lm_head",), progress: bool = True) -> LayerwiseResult:
    """Compress every eligible nn.Linear inside the decoder blocks, block by block, on `tokens`
    [nsamples, seqlen], with `method` (see CalibratedMethod). Layers outside the blocks are left alone."""
    started = time.perf_counter()
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise ValueError(f"compress_layerwise: calibration tokens must be [nsamples, seqlen], got "
                         f"{tuple(tokens.shape)}")
    was_training = model.training
    model.eval()
    prefix, layers = decoder_layers(model)
    result = LayerwiseResult()
    hidden_states, kwargs_per_layer = _block_inputs(model, layers, tokens)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(layers), desc="calibrated compression", unit="block")
    for index, layer in enumerate(layers):
        kwargs = kwargs_per_layer[index]
        linears = {}
        for name, module in layer.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            full = f"{prefix}.{index}.{name}"
            if name_matches(full, skip):
                result.kept_dense[full] = "skipped by name"
                continue
            why = method.why_ineligible(full, module)
            if why:
                result.kept_dense[full] = why
                continue
            linears[name] = module
        groups = _input_groups(layer, linears, hidden_states[0], kwargs)
        # True sequential: one pass per input group, so each group sees the compressed groups before it.
        for stage in ([[g] for g in groups] if method.true_sequential else [groups]):
            statistics = _gather(layer, linears, stage, method, hidden_states, kwargs)
            prepare = getattr(method, "prepare_stage", None)
            if prepare is not None:  # AWQ: scale search and folding, before any layer of the stage changes
                prepare(layer, stage, linears, statistics)
            for group in stage:
                for name in group.names:
                    full = f"{prefix}.{index}.{name}"
                    replacement, stats = method.compress(full, linears[name], statistics[group.names[0]])
                    _set_submodule(layer, name, replacement)
                    result.replaced.append(full)
                    result.stats[full] = stats
        hidden_states = [_run_block(layer, hidden, kwargs) for hidden in hidden_states]
        if bar is not None:
            losses = [s["loss"] for n, s in result.stats.items() if n.startswith(f"{prefix}.{index}.") and "loss" in s]
            bar.set_postfix(block=index, loss=f"{sum(losses):.3g}" if losses else "-")
            bar.update()
    if bar is not None:
        bar.close()
    model.train(was_training)
    result.seconds = time.perf_counter() - started
    return result
