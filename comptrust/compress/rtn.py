"""Round-to-nearest (RTN) weight-only quantization into the GPTQ v1 int4 layout.

The grid follows GPTQ's quantizer (so our RTN and later GPTQ share one definition): asymmetric ranges
always include 0 (xmin <= 0 <= xmax); symmetric uses zero point 8.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from comptrust.formats.int4 import Int4Packed, check_int4_shapes, num_groups, pack_int4

INT4_MAX = 15


@dataclass(frozen=True)
class RTNConfig:
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel (per-channel)
    symmetric: bool = False
    act_bits: int | None = None  # 8: run on int8 activations (w4a8, like llama.cpp); None: float activations

    method = "rtn"

    def __post_init__(self):
        if self.bits != 4:
            raise ValueError(f"RTNConfig: bits={self.bits} is not available yet; int4 is (int3/int8 come with "
                             "their packed kernels)")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError(f"RTNConfig: group_size={self.group_size} must be -1 or a positive multiple of 8")
        if self.act_bits not in (None, 8):
            raise ValueError(f"RTNConfig: act_bits={self.act_bits} must be None (float activations) or 8")

    @property
    def tag(self) -> str:
        """Short name carrying format and precision, e.g. 'rtn-w4g128', 'rtn-w4g-1-sym', 'rtn-w4g128-a8'."""
        return (f"rtn-w{self.bits}g{self.group_size}" + ("-sym" if self.symmetric else "")
                + (f"-a{self.act_bits}" if self.act_bits else ""))

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def quantize_int4_rtn(weight: torch.Tensor, group_size: int, symmetric: bool = False) -> Int4Packed:
    """Quantize a [out, in] weight to int4 with per-group scales and zero points, packed."""
    n, k = weight.shape
    check_int4_shapes(k, n, group_size)
    groups = num_groups(k, group_size)
    # Zero padding of a partial last group leaves its range unchanged: the range always includes 0.
    w = F.pad(weight.detach().to(torch.float32), (0, groups * group_size - k)).view(n, groups, group_size)
    xmin = w.amin(dim=-1).clamp(max=0)
    xmax = w.amax(dim=-1).clamp(min=0)
    if symmetric:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)

    scale = (xmax - xmin) / INT4_MAX
    if symmetric:
        zero = torch.full_like(scale, (INT4_MAX + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
        # GPTQ v1 stores zero-1 in 4 bits, so zero 0 cannot be stored (it would read back as 16).
        # Where the rounded zero is 0 (a group with almost no negative weight), move it to 1 and widen
        # the scale so [xmin, xmax] still fits codes 0..15.
        needs_shift = zero < 1
        scale = torch.where(needs_shift, torch.maximum(xmax / (INT4_MAX - 1), -xmin), scale)
        zero = torch.where(needs_shift, torch.ones_like(zero), zero)
    # Codes are computed with the fp16-rounded scale that is stored, so dequantization matches exactly.
    scale = scale.to(torch.float16).to(torch.float32)
    codes = torch.clamp(torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, INT4_MAX)
    codes = codes.view(n, groups * group_size)[:, :k].to(torch.uint8)
    return pack_int4(codes, zero.to(torch.int16), scale, group_size)
