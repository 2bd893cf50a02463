"""SparseGPT (Frantar & Alistarh, 2023): prune by w^2 / [H^-1]_jj^2 block by block and compensate the
error on the remaining weights with the same column update as GPTQ (comptrust/compress/hessian.py);
optionally quantize the kept weights to int4 in the same pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from comptrust.compress.gptq import pack_result
from comptrust.compress.hessian import HessianAccumulator, QuantGrid, error_feedback
from comptrust.compress.pruning import SparsityPattern, check_act_bits, pattern_tag, pruned_linear, quant_tag, why_ineligible
from comptrust.formats.int4 import pack_int4
from comptrust.formats.sparse24 import Sparse24Int4Packed, pack_sparse24
from comptrust.nn.quant_linear import QuantLinear
from comptrust.nn.sparse24_linear import Sparse24Int4Linear


@dataclass(frozen=True)
class SparseGPTConfig:
    pattern: str = "2:4"        # "2:4", "4:8" (N kept of M) or "unstructured"
    sparsity: float = 0.5       # unstructured only
    bits: int | None = None     # 4: int4 kept values, quantized jointly with the pruning
    group_size: int = 64        # int4 group: kept values for 2:4 (64 kept = 128 inputs), inputs otherwise
    symmetric: bool = False
    damp: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    act_bits: int | None = None  # 8: the int4 layers run on int8 activations

    method = "sparsegpt"
    calibrated = True

    def __post_init__(self):
        SparsityPattern.parse(self.pattern, self.sparsity)
        if self.bits not in (None, 4):
            raise ValueError(f"SparseGPTConfig: bits={self.bits} must be None (float values) or 4")
        if self.bits and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError(f"SparseGPTConfig: group_size={self.group_size} must be a positive multiple of 8")
        check_act_bits("SparseGPTConfig", self.act_bits, self.bits)
        if not 0 < self.damp < 1:
            raise ValueError(f"SparseGPTConfig: damp={self.damp} must be in (0, 1)")
        if self.block_size % max(SparsityPattern.parse(self.pattern, self.sparsity).prune_m, 1):
            raise ValueError(f"SparseGPTConfig: block_size={self.block_size} must be a multiple of the pattern's M")

    @property
    def sparsity_pattern(self) -> SparsityPattern:
        return SparsityPattern.parse(self.pattern, self.sparsity)

    @property
    def tag(self) -> str:
        """'sparsegpt-24', 'sparsegpt-48', 'sparsegpt-50' (unstructured %), with '-w4g64' for joint int4
        ('-a8': on int8 activations)."""
        return "sparsegpt-" + pattern_tag(self.pattern, self.sparsity) + quant_tag(self.bits, self.group_size,
                                                                                  self.symmetric, self.act_bits)

    def why_ineligible(self, name: str, linear: nn.Linear) -> str | None:
        if self.bits == 4 and not self.sparsity_pattern.is_24:
            return QuantLinear.why_ineligible(name, linear, 4)
        return why_ineligible(name, linear, self.sparsity_pattern, self.bits)

    def statistics(self, in_features: int) -> HessianAccumulator:
        return HessianAccumulator(in_features)

    def compress(self, name: str, linear: nn.Linear, hessian: HessianAccumulator) -> tuple[nn.Module, dict]:
        pattern = self.sparsity_pattern
        # 2:4 + int4 groups count kept values; the column loop's groups count inputs (twice as many).
        input_group = self.group_size * 2 if pattern.is_24 else self.group_size
        grid = QuantGrid(4, input_group, self.symmetric) if self.bits else None
        result = error_feedback(linear.weight, hessian.hessian, grid, sparsity=pattern.sparsity,
                                prune_n=pattern.prune_n, prune_m=pattern.prune_m, damp=self.damp,
                                block_size=self.block_size)
        stats = {"loss": result.loss, "damp": result.damp, "sparsity": float(result.mask.float().mean())}
        if not self.bits:
            return pruned_linear(name, linear, result.weight, pattern), stats
        if not pattern.is_24:  # pruned weights sit on the grid as exact zeros: an ordinary int4 layer
            return QuantLinear.from_packed(pack_result(result, 4, input_group), linear.bias, self.symmetric,
                                           self.act_bits), stats
        return _sparse24_int4_layer(name, linear, result, self.group_size, self.symmetric, self.act_bits), stats


def _sparse24_int4_layer(name: str, linear: nn.Linear, result, group_size: int, symmetric: bool,
                         act_bits: int | None) -> nn.Module:
    """A 2:4 result whose kept values lie on int4 grids of 2 * group_size inputs, as Sparse24Int4Linear:
    compact value j is kept from inputs 4 * (j // 2) .. + 3, which lie in input group j // group_size, so
    the kept-value groups reuse the input groups' grids."""
    compact = pack_sparse24(result.weight, name)
    kept = compact.values.shape[1]
    scales = result.scales.repeat_interleave(group_size, dim=1)[:, :kept]
    zeros = result.zeros.repeat_interleave(group_size, dim=1)[:, :kept]
    codes = (torch.round(compact.values / scales) + zeros).to(torch.uint8)
    qvalues = pack_int4(codes, result.zeros.to(torch.int16), result.scales, group_size)
    return Sparse24Int4Linear.from_packed(Sparse24Int4Packed(qvalues, compact.meta), linear.bias, symmetric, act_bits)
