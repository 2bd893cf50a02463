"""int8 weight-only format in the GPTQ v1 checkpoint layout (AutoGPTQ `QuantLinear.pack`, bits=8).

Layout (the same scheme as int4.py with bytes in place of nibbles):
  qweight [k/4, n]            int32  4 input rows per word, row 4r+i in bits 8i..8i+7
  qzeros  [groups, n/4]       int32  4 output zero points per word, stored as zero-1 (v1 convention)
  scales  [groups, n]         fp16
with groups = ceil(k / group_size). A stored byte 0..255 means zero points 1..256.
"""
from __future__ import annotations

import torch

from comptrust.formats.int4 import (WordPacked, check_word_shapes, dequantize_codes, pack_word_layout,
                                    unpack_word_layout)

INT8_PER_WORD = 4


def check_int8_shapes(in_features: int, out_features: int, group_size: int) -> None:
    """Raise ValueError naming the sizes when the layout cannot hold (in_features, out_features)."""
    check_word_shapes("int8", INT8_PER_WORD, in_features, out_features, group_size)


class Int8Packed(WordPacked):
    """The three tensors of one int8 linear layer's weight, plus its group size."""

    PER_WORD = INT8_PER_WORD


def pack_int8(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> Int8Packed:
    """Pack codes [n, k] in 0..255, zero points [n, groups] in 1..256 and scales [n, groups] (pack_word_layout)."""
    return pack_word_layout(Int8Packed, codes, zeros, scales, group_size)


def unpack_int8(packed: Int8Packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of pack_int8: (codes [n, k] uint8, zeros [n, groups] int16, scales [n, groups] fp16)."""
    return unpack_word_layout(packed)


def dequantize_int8(packed: Int8Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense [n, k] weight the packed tensors stand for (the reference every kernel is tested against)."""
    return dequantize_codes(*unpack_int8(packed), packed.group_size, dtype)
