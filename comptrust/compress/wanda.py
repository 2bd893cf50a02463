"""Wanda (Sun et al., 2023): prune the weights with the smallest |W_ij| * ||X_j||_2, per output row
(unstructured) or per group of M inputs (N:M); no weight update. ||X_j|| comes from the calibration pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from comptrust.compress.pruning import (SparsityPattern, check_act_bits, pattern_tag, prune_by_score, pruned_linear,
                                        quant_tag, why_ineligible)


@dataclass(frozen=True)
class WandaConfig:
    pattern: str = "2:4"        # "2:4", "4:8" or "unstructured"
    sparsity: float = 0.5       # unstructured only
    bits: int | None = None     # 4: 2:4 with int4 kept values (RTN after pruning); 2:4 only
    group_size: int = 64        # kept values per int4 group
    symmetric: bool = False
    true_sequential: bool = True
    act_bits: int | None = None  # 8: int4 kept values run on int8 activations

    method = "wanda"
    calibrated = True

    def __post_init__(self):
        pattern = SparsityPattern.parse(self.pattern, self.sparsity)
        if self.bits not in (None, 4) or (self.bits and not pattern.is_24):
            raise ValueError(f"WandaConfig: bits={self.bits} must be None, or 4 with the 2:4 pattern")
        check_act_bits("WandaConfig", self.act_bits, self.bits)

    @property
    def sparsity_pattern(self) -> SparsityPattern:
        return SparsityPattern.parse(self.pattern, self.sparsity)

    @property
    def tag(self) -> str:
        """'wanda-24', 'wanda-48', 'wanda-50' (unstructured %), 'wanda-24-w4g64', 'wanda-24-w4g64-a8'."""
        return "wanda-" + pattern_tag(self.pattern, self.sparsity) + quant_tag(self.bits, self.group_size,
                                                                              self.symmetric, self.act_bits)

    def why_ineligible(self, name: str, linear: nn.Linear) -> str | None:
        return why_ineligible(name, linear, self.sparsity_pattern, self.bits)

    def statistics(self, in_features: int) -> "ColumnNorms":
        return ColumnNorms(in_features)

    def compress(self, name: str, linear: nn.Linear, norms: "ColumnNorms") -> tuple[nn.Module, dict]:
        pattern = self.sparsity_pattern
        weight = linear.weight.detach().float()
        score = weight.abs() * norms.squared.sqrt().to(torch.float32)[None, :]
        pruned = prune_by_score(weight, score, pattern)
        stats = {"sparsity": float((pruned == 0).float().mean())}
        return pruned_linear(name, linear, pruned, pattern, self.bits, self.group_size, self.symmetric,
                             self.act_bits), stats


class ColumnNorms:
    """sum over every calibration token of x_j^2, per input j (Wanda's ||X_j||_2^2)."""

    def __init__(self, in_features: int):
        self.squared = torch.zeros(in_features, dtype=torch.float64)

    def add_batch(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, self.squared.numel()).to(torch.float64)
        self.squared = self.squared.to(rows.device) + (rows * rows).sum(dim=0)
