"""int4 weight-only format in the GPTQ v1 checkpoint layout.

Layout (identical to csrc/include/comptrust/int4_layout.h, which the kernels read):
  qweight [k/8, n]            int32  8 input rows per word, row 8r+i in bits 4i..4i+3
  qzeros  [groups, n/8]       int32  8 output zero points per word, stored as zero-1 (v1 convention)
  scales  [groups, n]         fp16
with groups = ceil(k / group_size). Keeping the checkpoint layout as the kernel layout means a GPTQ
checkpoint's tensors are used as they are, with no second copy of the weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_PER_WORD = 8
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble i of a word lives at bits 4i..4i+3


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def check_int4_shapes(in_features: int, out_features: int, group_size: int) -> None:
    """Raise ValueError naming the sizes when the layout cannot hold (in_features, out_features)."""
    if in_features <= 0 or out_features <= 0:
        raise ValueError(f"int4: in_features (k={in_features}) and out_features (n={out_features}) must be positive")
    if in_features % INT4_PER_WORD:
        raise ValueError(f"int4: in_features k={in_features} must be a multiple of 8 (8 weights per int32 word)")
    if out_features % INT4_PER_WORD:
        raise ValueError(f"int4: out_features n={out_features} must be a multiple of 8 (8 zero points per int32 word)")
    if group_size <= 0 or group_size % INT4_PER_WORD:
        raise ValueError(f"int4: group_size={group_size} must be a positive multiple of 8 (k={in_features})")


@dataclass(frozen=True)
class Int4Packed:
    """The three tensors of one int4 linear layer's weight, plus its group size."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    group_size: int

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * INT4_PER_WORD

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]


def _pack_nibbles_last_dim(values: torch.Tensor) -> torch.Tensor:
    """[..., 8w] ints in 0..15 -> [..., w] int32 words, element 8c+i in bits 4i..4i+3."""
    v = values.to(torch.int64).reshape(*values.shape[:-1], -1, INT4_PER_WORD)
    words = (v << _SHIFTS.to(torch.int64)).sum(dim=-1)
    # Values above 2^31 wrap to negative int32, exactly as the bits are stored on disk.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_nibbles_last_dim(words: torch.Tensor) -> torch.Tensor:
    """Inverse of _pack_nibbles_last_dim: [..., w] int32 -> [..., 8w] uint8."""
    nibbles = (words.unsqueeze(-1) >> _SHIFTS) & 0xF
    return nibbles.reshape(*words.shape[:-1], -1).to(torch.uint8)


def pack_int4(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> Int4Packed:
    """Pack quantized codes.

    codes  [n, k] integers in 0..15 (nn.Linear weight orientation: out x in)
    zeros  [n, groups] integers in 1..16 (v1 stores zero-1 in a nibble)
    scales [n, groups] floating
    """
    n, k = codes.shape
    check_int4_shapes(k, n, group_size)
    groups = num_groups(k, group_size)
    if zeros.shape != (n, groups) or scales.shape != (n, groups):
        raise ValueError(
            f"int4: zeros {tuple(zeros.shape)} and scales {tuple(scales.shape)} must be [n={n}, groups={groups}] "
            f"for k={k}, group_size={group_size}"
        )
    if codes.min() < 0 or codes.max() > 15:
        raise ValueError("int4: codes must lie in 0..15")
    if zeros.min() < 1 or zeros.max() > 16:
        raise ValueError("int4: zero points must lie in 1..16 (GPTQ v1 stores zero-1 in 4 bits)")
    qweight = _pack_nibbles_last_dim(codes).t()  # [n, k/8] words -> [k/8, n]
    qzeros = _pack_nibbles_last_dim((zeros - 1).t().contiguous())
    return Int4Packed(qweight.contiguous(), qzeros.contiguous(), scales.t().contiguous().to(torch.float16), group_size)


def unpack_int4(packed: Int4Packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of pack_int4: (codes [n, k] uint8, zeros [n, groups] int16, scales [n, groups] fp16)."""
    k, n = packed.in_features, packed.out_features
    codes = _unpack_nibbles_last_dim(packed.qweight.t())
    zeros = _unpack_nibbles_last_dim(packed.qzeros).to(torch.int16) + 1
    return codes, zeros.t().contiguous(), packed.scales.t().contiguous()


def dequantize_int4(packed: Int4Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense [n, k] weight the packed tensors stand for (the reference every kernel is tested against)."""
    codes, zeros, scales = unpack_int4(packed)
    k = packed.in_features
    group_of_input = torch.arange(k) // packed.group_size
    z = zeros.to(torch.float32)[:, group_of_input]
    s = scales.to(torch.float32)[:, group_of_input]
    return ((codes.to(torch.float32) - z) * s).to(dtype)
