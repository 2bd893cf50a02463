"""GPTQ (Frantar et al., 2022): int4 / int3 / int8 weights chosen column by column against each layer's Hessian,
each column's rounding error compensated on the columns not yet quantized (comptrust/compress/hessian.py).
The result is a GPTQ v1 layer (QuantLinear; ActOrderQuantLinear with act-order) on our packed kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from comptrust.compress.hessian import HessianAccumulator, QuantGrid, codes_of, error_feedback
from comptrust.compress.rtn import check_weight_format, pack_codes
from comptrust.formats.act_order import apply_act_order, undo_act_order
from comptrust.nn.act_order_linear import ActOrderQuantLinear
from comptrust.nn.quant_linear import QuantLinear


@dataclass(frozen=True)
class GPTQConfig:
    bits: int = 4
    group_size: int = 128       # -1: one group per output row
    symmetric: bool = False
    act_order: bool = False     # columns in order of decreasing Hessian diagonal (GPTQ's --act-order / desc_act)
    static_groups: bool = False  # group grids fixed up front in input order (no g_idx with act-order)
    damp: float = 0.01          # fraction of mean(diag H) added to the diagonal
    block_size: int = 128       # columns per lazy-batch block
    true_sequential: bool = True  # compress a block's layers stage by stage, later stages see earlier ones

    method = "gptq"
    calibrated = True

    def __post_init__(self):
        check_weight_format("GPTQConfig", self.bits, self.group_size)
        if not 0 < self.damp < 1:
            raise ValueError(f"GPTQConfig: damp={self.damp} must be in (0, 1)")
        if self.block_size <= 0:
            raise ValueError(f"GPTQConfig: block_size={self.block_size} must be positive")

    @property
    def tag(self) -> str:
        """'gptq-w4g128', with '-sym', '-act' (act-order) and '-static' (static groups) as set."""
        return (f"gptq-w{self.bits}g{self.group_size}" + ("-sym" if self.symmetric else "")
                + ("-act" if self.act_order else "") + ("-static" if self.static_groups else ""))

    def why_ineligible(self, name: str, linear: nn.Linear) -> str | None:
        return QuantLinear.why_ineligible(name, linear, self.bits)

    def statistics(self, in_features: int) -> HessianAccumulator:
        return HessianAccumulator(in_features)

    def compress(self, name: str, linear: nn.Linear, hessian: HessianAccumulator) -> tuple[nn.Module, dict]:
        group_size = linear.in_features if self.group_size == -1 else self.group_size
        grid = QuantGrid(self.bits, group_size, self.symmetric, self.static_groups)
        result = error_feedback(linear.weight, hessian.hessian, grid, act_order=self.act_order, damp=self.damp,
                                block_size=self.block_size)
        if result.perm is not None:
            codes, perm = _canonical_act_order(codes_of(result, group_size), result.perm, group_size)
            packed = pack_result(result, self.bits, group_size, codes)
            layer = ActOrderQuantLinear.from_act_order(packed, perm, linear.bias, self.symmetric)
        else:
            layer = QuantLinear.from_packed(pack_result(result, self.bits, group_size), linear.bias, self.symmetric)
        return layer, {"loss": result.loss, "damp": result.damp}


def _canonical_act_order(codes: torch.Tensor, perm: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Within a group the order of the inputs does not matter; take the order a checkpoint's g_idx gives
    back at load (ascending input), so a layer saved and loaded again sums in the same order, bit for bit."""
    original, g_idx = undo_act_order(codes, perm, group_size)
    return apply_act_order(original, g_idx, group_size)


def pack_result(result, bits: int, group_size: int, codes: torch.Tensor | None = None):
    """The GPTQ v1 packed tensors of a quantized error_feedback result (its codes, or `codes` in their place)."""
    codes = codes_of(result, group_size) if codes is None else codes
    return pack_codes(bits, codes, result.zeros.to(torch.int16), result.scales, group_size)
