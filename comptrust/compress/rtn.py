"""Round-to-nearest (RTN) weight-only quantization into the GPTQ v1 int4 / int3 / int8 layouts.

The grid follows GPTQ's quantizer (so our RTN and later GPTQ share one definition): asymmetric ranges
always include 0 (xmin <= 0 <= xmax); symmetric uses zero point 2^(bits-1) (8 for int4, 4 for int3,
128 for int8).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from comptrust.formats.int3 import Int3Packed, check_int3_shapes, pack_int3
from comptrust.formats.int4 import Int4Packed, check_int4_shapes, num_groups, pack_int4
from comptrust.formats.int8 import Int8Packed, check_int8_shapes, pack_int8

INT4_MAX = 15
_PACKERS = {4: (check_int4_shapes, pack_int4), 3: (check_int3_shapes, pack_int3), 8: (check_int8_shapes, pack_int8)}
# Inputs per packed unit: groups hold whole words (int3 packs 32 inputs in 3 words).
_GROUP_UNIT = {4: 8, 3: 32, 8: 4}


def check_weight_format(owner: str, bits: int, group_size: int) -> None:
    """The packed formats' limits, shared by every quantizer's config: int4, int3 or int8, groups of whole words."""
    if bits not in _PACKERS:
        raise ValueError(f"{owner}: bits={bits} is not available; int4, int3 and int8 are (the packed kernels' "
                         "formats)")
    unit = _GROUP_UNIT[bits]
    if group_size != -1 and (group_size <= 0 or group_size % unit):
        raise ValueError(f"{owner}: group_size={group_size} must be -1 or a positive multiple of {unit} for int{bits}")


@dataclass(frozen=True)
class RTNConfig:
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel (per-channel)
    symmetric: bool = False
    act_bits: int | None = None  # 8: run on int8 activations (w4a8, like llama.cpp); None: float activations
    # Quantize the output projection too. Off by default (GPTQ/AWQ keep it dense), but on a small model's
    # CPU decode the fp32 lm_head is the largest single read: SmolLM2's is 113 MB of its 513.
    lm_head: bool = False

    method = "rtn"

    def __post_init__(self):
        check_weight_format("RTNConfig", self.bits, self.group_size)
        if self.act_bits not in (None, 8):
            raise ValueError(f"RTNConfig: act_bits={self.act_bits} must be None (float activations) or 8")
        if self.bits == 8 and self.act_bits == 8:
            raise ValueError("RTNConfig: int8 weights run with float activations only (act_bits=None)")

    @property
    def tag(self) -> str:
        """Short name carrying format and precision, e.g. 'rtn-w4g128', 'rtn-w4g-1-sym', 'rtn-w4g128-a8', 'rtn-w4g128-a8-head'."""
        return (f"rtn-w{self.bits}g{self.group_size}" + ("-sym" if self.symmetric else "")
                + (f"-a{self.act_bits}" if self.act_bits else "") + ("-head" if self.lm_head else ""))

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def quantize_int4_rtn(weight: torch.Tensor, group_size: int, symmetric: bool = False) -> Int4Packed:
    """Quantize a [out, in] weight to int4 with per-group scales and zero points, packed."""
    return quantize_rtn(weight, 4, group_size, symmetric)


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int,
                 symmetric: bool = False) -> Int4Packed | Int3Packed | Int8Packed:
    """Quantize a [out, in] weight to int4, int3 or int8 with per-group scales and zero points, packed."""
    if bits not in _PACKERS:
        raise ValueError(f"quantize_rtn: bits={bits} must be 4, 3 or 8")
    check_shapes, pack = _PACKERS[bits]
    top = 2**bits - 1
    n, k = weight.shape
    check_shapes(k, n, group_size)
    groups = num_groups(k, group_size)
    # Zero padding of a partial last group leaves its range unchanged: the range always includes 0.
    w = F.pad(weight.detach().to(torch.float32), (0, groups * group_size - k)).view(n, groups, group_size)
    scale, zero = rtn_grid(w, bits, symmetric)
    codes = torch.clamp(torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, top)
    codes = codes.view(n, groups * group_size)[:, :k].to(torch.uint8)  # 0..255 fits for int8 too
    return pack(codes, zero.to(torch.int16), scale, group_size)


def pack_codes(bits: int, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
               group_size: int) -> Int4Packed | Int3Packed | Int8Packed:
    """The GPTQ v1 packed form of codes [n, k], zeros and scales [n, groups] at `bits` (4, 3 or 8)."""
    if bits not in _PACKERS:
        raise ValueError(f"pack_codes: bits={bits} must be 4, 3 or 8")
    return _PACKERS[bits][1](codes, zeros, scales, group_size)


def rtn_grid(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantization grid of each group: w [..., group_size] float32 -> (scale, zero), both float32 [...].
    scale is already rounded to the fp16 that GPTQ v1 stores, so codes computed with it dequantize exactly;
    zero is an integer in 1..2^bits - 1 (stored as zero - 1). GPTQ and SparseGPT use this grid too."""
    top = 2**bits - 1
    xmin = w.amin(dim=-1).clamp(max=0)
    xmax = w.amax(dim=-1).clamp(min=0)
    if symmetric:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)

    scale = (xmax - xmin) / top
    if symmetric:
        zero = torch.full_like(scale, (top + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
        # GPTQ v1 stores zero-1 in `bits` bits, so zero 0 cannot be stored (it would read back as 2^bits).
        # Where the rounded zero is 0 (a group with almost no negative weight), move it to 1 and widen
        # the scale so [xmin, xmax] still fits codes 0..top.
        needs_shift = zero < 1
        scale = torch.where(needs_shift, torch.maximum(xmax / (top - 1), -xmin), scale)
        zero = torch.where(needs_shift, torch.ones_like(zero), zero)
    # Codes are computed with the fp16-rounded scale that is stored, so dequantization matches exactly.
    return scale.to(torch.float16).to(torch.float32), zero
