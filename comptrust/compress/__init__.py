"""Compression methods. Each config is a frozen dataclass; compress_() dispatches on its type.

Without calibration: RTN (rtn.py), magnitude pruning (magnitude.py). With calibration data, through the
layer-by-layer pass of calibration.py: GPTQ (gptq.py), AWQ (awq.py), SparseGPT (sparsegpt.py), Wanda (wanda.py).
"""
from __future__ import annotations

import re

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from comptrust.compress.awq import AWQConfig
from comptrust.compress.calibration import calibration_tokens, compress_layerwise
from comptrust.compress.gptq import GPTQConfig
from comptrust.compress.magnitude import MagnitudeConfig
from comptrust.compress.rtn import RTNConfig, quantize_int4_rtn, quantize_rtn
from comptrust.compress.sparsegpt import SparseGPTConfig
from comptrust.compress.wanda import WandaConfig
from comptrust.nn.quant_linear import QuantLinear
from comptrust.nn.swap import replace_linears

__all__ = ["AWQConfig", "GPTQConfig", "MagnitudeConfig", "RTNConfig", "SparseGPTConfig", "WandaConfig",
           "CompressionSummary", "calibration_tokens", "compress_", "config_from_options", "config_from_tag", "is_calibrated",
           "quantize_int4_rtn", "quantize_rtn"]


@dataclass
class CompressionSummary:
    method: str
    config: dict
    replaced: list[str] = field(default_factory=list)
    kept_dense: dict[str, str] = field(default_factory=dict)  # layer name -> why it stayed dense
    layer_stats: dict[str, dict] = field(default_factory=dict)  # calibrated methods: per-layer loss etc.
    seconds: float = 0.0


def _rtn(model: nn.Module, config: RTNConfig, calib, skip, progress) -> CompressionSummary:
    def make(name: str, linear: nn.Linear) -> nn.Module:
        return QuantLinear.from_linear(linear, config.group_size_for(linear.in_features), config.symmetric,
                                       config.act_bits, bits=config.bits)

    def eligible(name: str, linear: nn.Linear) -> str | None:
        return QuantLinear.why_ineligible(name, linear, config.bits)

    if config.lm_head:
        skip = tuple(name for name in skip if name != "lm_head")
    replaced, kept = replace_linears(model, make, skip=skip, eligible=eligible, progress=progress)
    return CompressionSummary(config.tag, {"method": config.method, **asdict(config)}, replaced, kept)


def _magnitude(model: nn.Module, config: MagnitudeConfig, calib, skip, progress) -> CompressionSummary:
    if config.lm_head:
        skip = tuple(name for name in skip if name != "lm_head")
    replaced, kept = replace_linears(model, config.compress, skip=skip, eligible=config.why_ineligible,
                                     progress=progress)
    return CompressionSummary(config.tag, {"method": config.method, **asdict(config)}, replaced, kept)


def _calibrated(model: nn.Module, config, calib, skip, progress) -> CompressionSummary:
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{type(config).__name__} needs calibration data: token ids [nsamples, seqlen], e.g. "
                         "comptrust.compress.calibration_tokens(tokenizer, 'builtin', nsamples=128, seqlen=512)")
    result = compress_layerwise(model, calib.long(), config, skip=skip, progress=progress)
    # Linears outside the decoder blocks (the lm_head) are not calibrated: they stay dense.
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name not in result.kept_dense and name not in result.replaced:
            result.kept_dense[name] = "outside the decoder blocks (not calibrated)"
    summary = CompressionSummary(config.tag, {"method": config.method, **asdict(config)}, result.replaced,
                                 result.kept_dense, result.stats, result.seconds)
    summary.config["calibration"] = {"nsamples": calib.shape[0], "seqlen": calib.shape[1]}
    return summary


_METHODS: dict[type, Callable] = {RTNConfig: _rtn, MagnitudeConfig: _magnitude, GPTQConfig: _calibrated,
                                  AWQConfig: _calibrated, SparseGPTConfig: _calibrated, WandaConfig: _calibrated}


def compress_(model: nn.Module, config, calib=None, skip: tuple[str, ...] = ("lm_head",),
              progress: bool = True) -> CompressionSummary:
    """Compress `model` in place with `config` (e.g. RTNConfig()); layers whose name matches an entry of
    `skip` (exact name or last component) stay dense. Returns what was replaced and what was not, and why."""
    method = _METHODS.get(type(config))
    if method is None:
        known = ", ".join(c.__name__ for c in _METHODS)
        raise TypeError(f"compress_: no method registered for {type(config).__name__}; known: {known}")
    return method(model, config, calib, skip, progress)


_RTN_TAG = re.compile(r"rtn-w(?P<bits>[348])g(?P<group>-1|\d+)(?P<flags>(?:-sym|-a8|-head)*)")
_GPTQ_TAG = re.compile(r"gptq-w(?P<bits>[348])g(?P<group>-1|\d+)(?P<flags>(?:-sym|-act|-static)*)")
_AWQ_TAG = re.compile(r"awq-w(?P<bits>[348])g(?P<group>-1|\d+)(?P<flags>(?:-sym|-noclip)*)")
_PATTERN = r"(?P<pattern>24|48|\d{1,2})"
_QUANT = r"(?:-w4g(?P<group>-1|\d+)(?P<sym>-sym)?(?P<a8>-a8)?)?"
_MAGNITUDE_TAG = re.compile(r"mag-" + _PATTERN + _QUANT + r"(?P<head>-head)?")
_PRUNING_TAG = re.compile(r"(?P<method>sparsegpt|wanda)-" + _PATTERN + _QUANT)
KNOWN_TAGS = ("rtn-w4g128, rtn-w4g-1, rtn-w4g32-sym, rtn-w4g128-a8, rtn-w3g128, rtn-w8g128, rtn-w4g128-a8-head, "
              "gptq-w4g128, gptq-w3g128, gptq-w8g128, gptq-w4g128-act, gptq-w4g128-act-static, gptq-w4g128-sym, "
              "awq-w4g128, awq-w3g128, awq-w4g128-noclip, "
              "mag-24, mag-24-w4g64, mag-24-w4g64-a8, mag-24-w4g64-head, mag-48, mag-50, "
              "sparsegpt-24, sparsegpt-48, sparsegpt-50, sparsegpt-24-w4g64, sparsegpt-24-w4g64-a8, "
              "wanda-24, wanda-48, wanda-50, wanda-24-w4g64-a8")


def _pattern(text: str) -> dict:
    """'24' -> 2:4, '48' -> 4:8, anything else an unstructured percentage."""
    if text in ("24", "48"):
        return {"pattern": f"{text[0]}:{text[1]}"}
    return {"pattern": "unstructured", "sparsity": int(text) / 100}


def _quant(match) -> dict:
    quantized = match["group"] is not None
    return {"bits": 4 if quantized else None, "group_size": int(match["group"] or 64), "symmetric": bool(match["sym"]),
            "act_bits": 8 if match["a8"] else None}


def config_from_tag(tag: str):
    """Parse the short names used on the command line: 'rtn-w4g128', 'rtn-w4g-1', 'rtn-w4g32-sym',
    'rtn-w4g128-a8' (int8 activations), 'rtn-w3g128' (int3), 'rtn-w8g128' (int8), 'rtn-w4g128-a8-head' (lm_head quantized too);
    'gptq-w4g128' with -sym, -act (act-order), -static (static groups); 'awq-w4g128' with -sym, -noclip;
    pruning 'mag-', 'sparsegpt-', 'wanda-' + '24' (2:4), '48' (4:8) or a percentage (unstructured, e.g. '50'), with '-w4g64' for int4
    kept values (64 kept values per group), then '-a8' to run them on int8 activations."""
    try:
        if match := _RTN_TAG.fullmatch(tag):
            flags = match["flags"]
            return RTNConfig(bits=int(match["bits"]), group_size=int(match["group"]), symmetric="-sym" in flags,
                             act_bits=8 if "-a8" in flags else None, lm_head="-head" in flags)
        if match := _GPTQ_TAG.fullmatch(tag):
            flags = match["flags"]
            return GPTQConfig(bits=int(match["bits"]), group_size=int(match["group"]), symmetric="-sym" in flags,
                              act_order="-act" in flags, static_groups="-static" in flags)
        if match := _AWQ_TAG.fullmatch(tag):
            flags = match["flags"]
            return AWQConfig(bits=int(match["bits"]), group_size=int(match["group"]), symmetric="-sym" in flags,
                             clip="-noclip" not in flags)
        if match := _MAGNITUDE_TAG.fullmatch(tag):
            return MagnitudeConfig(**_pattern(match["pattern"]), **_quant(match), lm_head=bool(match["head"]))
        if match := _PRUNING_TAG.fullmatch(tag):
            kind = SparseGPTConfig if match["method"] == "sparsegpt" else WandaConfig
            return kind(**_pattern(match["pattern"]), **_quant(match))
    except ValueError as exc:
        raise ValueError(f"bad compression tag {tag!r}: {exc}") from None
    raise ValueError(f"unknown compression tag {tag!r}; known forms: {KNOWN_TAGS}")


_DEFAULT_GROUP = {"rtn": 128, "gptq": 128, "awq": 128, "magnitude": 64, "sparsegpt": 64, "wanda": 64}
_OPTION_METHODS = {"act_order": ("gptq",), "static_groups": ("gptq",), "damp": ("gptq", "sparsegpt"),
                   "pattern": ("magnitude", "sparsegpt", "wanda"), "sparsity": ("magnitude", "sparsegpt", "wanda"),
                   "lm_head": ("rtn", "magnitude")}


def config_from_options(method: str, bits: int | None = None, group_size: int | None = None, symmetric: bool = False,
                        **options):
    """The config the `comptrust compress` flags describe, e.g. config_from_options("gptq", bits=4,
    group_size=128, act_order=True) or ("sparsegpt", pattern="unstructured", sparsity=0.6). Options that
    do not apply to the method are refused rather than ignored."""
    if method not in _DEFAULT_GROUP:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(_DEFAULT_GROUP)}")
    given = {name: value for name, value in options.items() if value is not None}
    for name in given:
        if name not in _OPTION_METHODS:
            raise ValueError(f"unknown option {name!r}")
        if method not in _OPTION_METHODS[name]:
            raise ValueError(f"--{name.replace('_', '-')} applies to {', '.join(_OPTION_METHODS[name])}, not {method}")
    group_size = _DEFAULT_GROUP[method] if group_size is None else group_size
    if method == "rtn":
        return RTNConfig(bits=bits or 4, group_size=group_size, symmetric=symmetric, **given)
    if method == "gptq":
        return GPTQConfig(bits=bits or 4, group_size=group_size, symmetric=symmetric, **given)
    if method == "awq":
        return AWQConfig(bits=bits or 4, group_size=group_size, symmetric=symmetric, **given)
    kind = {"magnitude": MagnitudeConfig, "sparsegpt": SparseGPTConfig, "wanda": WandaConfig}[method]
    return kind(bits=bits, group_size=group_size, symmetric=symmetric, **given)


def is_calibrated(config) -> bool:
    """True for methods that need calibration data (GPTQ, SparseGPT, Wanda)."""
    return getattr(config, "calibrated", False)
