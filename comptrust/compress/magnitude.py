"""Magnitude pruning: drop the weights with the smallest |w|, per group of M inputs (N:M) or the given
share of each output row (unstructured). No calibration data.

2:4 runs on the 2:4 sparse kernels (Sparse24Linear / Sparse24Int4Linear); its kept values keep the model's
dtype, or with bits=4 are RTN-quantized to int4 in groups of group_size KEPT values (so g64 spans 128
inputs, like a dense g128). 4:8 and unstructured stay dense layers holding zeros (comptrust/compress/pruning.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from comptrust.compress.pruning import (SparsityPattern, check_act_bits, pattern_tag, prune_by_score, pruned_linear,
                                        quant_tag, why_ineligible)
from comptrust.formats.sparse24 import prune_magnitude_24


@dataclass(frozen=True)
class MagnitudeConfig:
    pattern: str = "2:4"      # "2:4", "4:8" or "unstructured"
    bits: int | None = None   # 4: int4 kept values (2:4 + int4, 2:4 only); None: float values
    group_size: int = 64      # kept values per int4 group (-1: one group per row); ignored without bits
    symmetric: bool = False
    lm_head: bool = False     # prune the output projection too
    sparsity: float = 0.5     # unstructured only
    act_bits: int | None = None  # 8: int4 kept values run on int8 activations

    method = "magnitude"
    calibrated = False

    def __post_init__(self):
        pattern = SparsityPattern.parse(self.pattern, self.sparsity)
        if self.bits not in (None, 4) or (self.bits and not pattern.is_24):
            raise ValueError(f"MagnitudeConfig: bits={self.bits} must be None (float values), or 4 with the 2:4 "
                             "pattern")
        if self.bits and self.group_size != -1 and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError(f"MagnitudeConfig: group_size={self.group_size} (kept values) must be -1 or a positive "
                             f"multiple of 8")
        check_act_bits("MagnitudeConfig", self.act_bits, self.bits)

    @property
    def sparsity_pattern(self) -> SparsityPattern:
        return SparsityPattern.parse(self.pattern, self.sparsity)

    @property
    def tag(self) -> str:
        """'mag-24', 'mag-24-w4g64', 'mag-24-w4g64-sym', 'mag-24-w4g64-a8', 'mag-48', 'mag-50' (unstructured
        %); '-head' when lm_head is pruned too."""
        quant = quant_tag(self.bits, self.group_size, self.symmetric, self.act_bits)
        return "mag-" + pattern_tag(self.pattern, self.sparsity) + quant + ("-head" if self.lm_head else "")

    def why_ineligible(self, name: str, linear: nn.Linear) -> str | None:
        return why_ineligible(name, linear, self.sparsity_pattern, self.bits)

    def compress(self, name: str, linear: nn.Linear) -> nn.Module:
        pattern = self.sparsity_pattern
        weight = linear.weight.detach()
        if pattern.is_24:  # keeps NaN visible and matches the 2:4 format's own rule
            pruned = prune_magnitude_24(weight, name)
        else:
            pruned = prune_by_score(weight, weight.abs().float(), pattern)
        return pruned_linear(name, linear, pruned, pattern, self.bits, self.group_size, self.symmetric, self.act_bits)
