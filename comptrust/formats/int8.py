"""int8 weight-only format in the GPTQ v1 checkpoint layout (AutoGPTQ `QuantLinear.pack`, bits=8).

Layout (the same scheme as int4.py with bytes in place of nibbles):
  qweight [k/4, n]            int32  4 input rows per word, row 4r+i in bits 8i..8i+7
  qzeros  [groups, n/4]       int32  4 output zero points per word, stored as zero-1 (v1 convention)
  scales  [groups, n]         fp16
with groups = ceil(k / group_size). A stored byte 0..255 means zero points 1..256.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from comptrust.formats.int4 import num_groups

INT8_PER_WORD = 4
_SHIFTS = torch.arange(0, 32, 8, dtype=torch.int64)  # byte i of a word lives at bits 8i..8i+7


def check_int8_shapes(in_features: int, out_features: int, group_size: int) -> None:
    """Raise ValueError naming the sizes when the layout cannot hold (in_features, out_features)."""
    if in_features <= 0 or out_features <= 0:
        raise ValueError(f"int8: in_features (k={in_features}) and out_features (n={out_features}) must be positive")
    if in_features % INT8_PER_WORD:
        raise ValueError(f"int8: in_features k={in_features} must be a multiple of 4 (4 weights per int32 word)")
    if out_features % INT8_PER_WORD:
        raise ValueError(f"int8: out_features n={out_features} must be a multiple of 4 (4 zero points per int32 word)")
    if group_size <= 0 or group_size % INT8_PER_WORD:
        raise ValueError(f"int8: group_size={group_size} must be a positive multiple of 4 (k={in_features})")


@dataclass(frozen=True)
class Int8Packed:
    """The three tensors of one int8 linear layer's weight, plus its group size."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    group_size: int

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * INT8_PER_WORD

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]


def pack_bytes_last_dim(values: torch.Tensor) -> torch.Tensor:
    """[..., 4w] ints in 0..255 -> [..., w] int32 words, element 4c+i in bits 8i..8i+7."""
    v = values.to(torch.int64).reshape(*values.shape[:-1], -1, INT8_PER_WORD)
    words = (v << _SHIFTS).sum(dim=-1)
    # Values above 2^31 wrap to negative int32, exactly as the bits are stored on disk.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_bytes_last_dim(words: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_bytes_last_dim: [..., w] int32 -> [..., 4w] uint8."""
    values = (words.to(torch.int64).unsqueeze(-1) >> _SHIFTS) & 0xFF
    return values.reshape(*words.shape[:-1], -1).to(torch.uint8)


def pack_int8(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> Int8Packed:
    """Pack quantized codes.

    codes  [n, k] integers in 0..255 (nn.Linear weight orientation: out x in)
    zeros  [n, groups] integers in 1..256 (v1 stores zero-1 in a byte)
    scales [n, groups] floating
    """
    n, k = codes.shape
    check_int8_shapes(k, n, group_size)
    groups = num_groups(k, group_size)
    if zeros.shape != (n, groups) or scales.shape != (n, groups):
        raise ValueError(
            f"int8: zeros {tuple(zeros.shape)} and scales {tuple(scales.shape)} must be [n={n}, groups={groups}] "
            f"for k={k}, group_size={group_size}"
        )
    if codes.min() < 0 or codes.max() > 255:
        raise ValueError("int8: codes must lie in 0..255")
    if zeros.min() < 1 or zeros.max() > 256:
        raise ValueError("int8: zero points must lie in 1..256 (GPTQ v1 stores zero-1 in 8 bits)")
    qweight = pack_bytes_last_dim(codes).t()  # [n, k/4] words -> [k/4, n]
    qzeros = pack_bytes_last_dim((zeros.to(torch.int64) - 1).t().contiguous())
    return Int8Packed(qweight.contiguous(), qzeros.contiguous(), scales.t().contiguous().to(torch.float16), group_size)


def unpack_int8(packed: Int8Packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of pack_int8: (codes [n, k] uint8, zeros [n, groups] int16, scales [n, groups] fp16)."""
    codes = unpack_bytes_last_dim(packed.qweight.t())
    zeros = unpack_bytes_last_dim(packed.qzeros).to(torch.int16) + 1
    return codes, zeros.t().contiguous(), packed.scales.t().contiguous()


def dequantize_int8(packed: Int8Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense [n, k] weight the packed tensors stand for (the reference every kernel is tested against)."""
    codes, zeros, scales = unpack_int8(packed)
    group_of_input = torch.arange(packed.in_features) // packed.group_size
    z = zeros.to(torch.float32)[:, group_of_input]
    s = scales.to(torch.float32)[:, group_of_input]
    return ((codes.to(torch.float32) - z) * s).to(dtype)
