"""Compression methods. Each config is a frozen dataclass; compress_() dispatches on its type."""
from __future__ import annotations

import re

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch.nn as nn

from comptrust.compress.rtn import RTNConfig, quantize_int4_rtn, quantize_rtn
from comptrust.nn.quant_linear import QuantLinear
from comptrust.nn.swap import replace_linears

__all__ = ["RTNConfig", "CompressionSummary", "compress_", "config_from_tag", "quantize_int4_rtn", "quantize_rtn"]


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


_METHODS: dict[type, Callable] = {RTNConfig: _rtn}


def compress_(model: nn.Module, config, calib=None, skip: tuple[str, ...] = ("lm_head",),
              progress: bool = True) -> CompressionSummary:
    """Compress `model` in place with `config` (e.g. RTNConfig()); layers whose name matches an entry of
    `skip` (exact name or last component) stay dense. Returns what was replaced and what was not, and why."""
    method = _METHODS.get(type(config))
    if method is None:
        known = ", ".join(c.__name__ for c in _METHODS)
        raise TypeError(f"compress_: no method registered for {type(config).__name__}; known: {known}")
    return method(model, config, calib, skip, progress)


_TAG = re.compile(r"rtn-w(?P<bits>[34])g(?P<group>-1|\d+)(?P<flags>(?:-sym|-a8|-head)*)")


def config_from_tag(tag: str):
    """Parse the short names used on the command line: 'rtn-w4g128', 'rtn-w4g-1', 'rtn-w4g32-sym',
    'rtn-w4g128-a8' (int8 activations), 'rtn-w3g128' (int3), 'rtn-w4g128-a8-head' (lm_head quantized too)."""
    match = _TAG.fullmatch(tag)
    if match is None:
        raise ValueError(f"unknown compression tag {tag!r}; known forms: rtn-w4g128, rtn-w4g-1, rtn-w4g32-sym, "
                         "rtn-w4g128-a8, rtn-w3g128, rtn-w4g128-a8-head")
    flags = match["flags"]
    try:
        return RTNConfig(bits=int(match["bits"]), group_size=int(match["group"]), symmetric="-sym" in flags,
                         act_bits=8 if "-a8" in flags else None, lm_head="-head" in flags)
    except ValueError as exc:
        raise ValueError(f"bad compression tag {tag!r}: {exc}") from None
