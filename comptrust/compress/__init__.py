"""Compression methods. Each config is a frozen dataclass; compress_() dispatches on its type."""
from __future__ import annotations

import re

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch.nn as nn

from comptrust.compress.magnitude import MagnitudeConfig
from comptrust.compress.rtn import RTNConfig, quantize_int4_rtn, quantize_rtn
from comptrust.formats.sparse24 import prune_magnitude_24
from comptrust.nn.quant_linear import QuantLinear
from comptrust.nn.sparse24_linear import Sparse24Int4Linear, Sparse24Linear
from comptrust.nn.swap import replace_linears

__all__ = ["MagnitudeConfig", "RTNConfig", "CompressionSummary", "compress_", "config_from_tag", "quantize_int4_rtn",
           "quantize_rtn"]


@dataclass
class CompressionSummary:
    method: str
    config: dict
    replaced: list[str] = field(default_factory=list)
    kept_dense: dict[str, str] = field(default_factory=dict)  # layer name -> why it stayed dense


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
    layer_type = Sparse24Int4Linear if config.bits == 4 else Sparse24Linear

    def make(name: str, linear: nn.Linear) -> nn.Module:
        pruned = prune_magnitude_24(linear.weight.detach(), name)
        if config.bits == 4:
            return Sparse24Int4Linear.from_weight(pruned, config.group_size, linear.bias, config.symmetric, name)
        return Sparse24Linear.from_weight(pruned, linear.bias, name=name)

    def eligible(name: str, linear: nn.Linear) -> str | None:
        return layer_type.why_ineligible(name, linear)

    if config.lm_head:
        skip = tuple(name for name in skip if name != "lm_head")
    replaced, kept = replace_linears(model, make, skip=skip, eligible=eligible, progress=progress)
    return CompressionSummary(config.tag, {"method": config.method, **asdict(config)}, replaced, kept)


_METHODS: dict[type, Callable] = {RTNConfig: _rtn, MagnitudeConfig: _magnitude}


def compress_(model: nn.Module, config, calib=None, skip: tuple[str, ...] = ("lm_head",),
              progress: bool = True) -> CompressionSummary:
    """Compress `model` in place with `config` (e.g. RTNConfig()); layers whose name matches an entry of
    `skip` (exact name or last component) stay dense. Returns what was replaced and what was not, and why."""
    method = _METHODS.get(type(config))
    if method is None:
        known = ", ".join(c.__name__ for c in _METHODS)
        raise TypeError(f"compress_: no method registered for {type(config).__name__}; known: {known}")
    return method(model, config, calib, skip, progress)


_RTN_TAG = re.compile(r"rtn-w(?P<bits>[34])g(?P<group>-1|\d+)(?P<flags>(?:-sym|-a8|-head)*)")
_MAGNITUDE_TAG = re.compile(r"mag-24(?:-w4g(?P<group>-1|\d+)(?P<sym>-sym)?)?(?P<head>-head)?")
KNOWN_TAGS = ("rtn-w4g128, rtn-w4g-1, rtn-w4g32-sym, rtn-w4g128-a8, rtn-w3g128, rtn-w4g128-a8-head, "
              "mag-24, mag-24-w4g64, mag-24-w4g64-head")


def config_from_tag(tag: str):
    """Parse the short names used on the command line: 'rtn-w4g128', 'rtn-w4g-1', 'rtn-w4g32-sym',
    'rtn-w4g128-a8' (int8 activations), 'rtn-w3g128' (int3), 'rtn-w4g128-a8-head' (lm_head quantized too);
    'mag-24' (magnitude 2:4, float values), 'mag-24-w4g64' (2:4 with int4 values, 64 kept values per group)."""
    try:
        if match := _RTN_TAG.fullmatch(tag):
            flags = match["flags"]
            return RTNConfig(bits=int(match["bits"]), group_size=int(match["group"]), symmetric="-sym" in flags,
                             act_bits=8 if "-a8" in flags else None, lm_head="-head" in flags)
        if match := _MAGNITUDE_TAG.fullmatch(tag):
            quantized = match["group"] is not None
            return MagnitudeConfig(bits=4 if quantized else None, group_size=int(match["group"] or 64),
                                   symmetric=bool(match["sym"]), lm_head=bool(match["head"]))
    except ValueError as exc:
        raise ValueError(f"bad compression tag {tag!r}: {exc}") from None
    raise ValueError(f"unknown compression tag {tag!r}; known forms: {KNOWN_TAGS}")
