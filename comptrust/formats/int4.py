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
from typing import ClassVar

import torch

INT4_PER_WORD = 8


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def check_word_shapes(fmt: str, per_word: int, in_features: int, out_features: int, group_size: int) -> None:
    """The limits of a layout packing `per_word` values per int32 word along both dimensions (int4, int8):
    raise ValueError naming the sizes when it cannot hold (in_features, out_features)."""
    if in_features <= 0 or out_features <= 0:
        raise ValueError(f"{fmt}: in_features (k={in_features}) and out_features (n={out_features}) must be positive")
    if in_features % per_word:
        raise ValueError(f"{fmt}: in_features k={in_features} must be a multiple of {per_word} ({per_word} weights "
                         "per int32 word)")
    if out_features % per_word:
        raise ValueError(f"{fmt}: out_features n={out_features} must be a multiple of {per_word} ({per_word} zero "
                         "points per int32 word)")
    if group_size <= 0 or group_size % per_word:
        raise ValueError(f"{fmt}: group_size={group_size} must be a positive multiple of {per_word} (k={in_features})")


def check_int4_shapes(in_features: int, out_features: int, group_size: int) -> None:
    """Raise ValueError naming the sizes when the layout cannot hold (in_features, out_features)."""
    check_word_shapes("int4", INT4_PER_WORD, in_features, out_features, group_size)


@dataclass(frozen=True)
class WordPacked:
    """The three GPTQ v1 tensors of one linear layer's weight, plus its group size, for a layout with PER_WORD
    values per int32 word along the input (Int4Packed, Int8Packed)."""

    PER_WORD: ClassVar[int]
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    group_size: int

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * self.PER_WORD

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]


class Int4Packed(WordPacked):
    PER_WORD = INT4_PER_WORD


def pack_fields_last_dim(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., (32/bits)w] ints in 0..2^bits-1 -> [..., w] int32 words, element (32/bits)c+i in bits
    bits*i .. bits*i+bits-1 (GPTQ v1's packing for 4 and 8 bits)."""
    per_word = 32 // bits
    v = values.to(torch.int64).reshape(*values.shape[:-1], -1, per_word)
    words = (v << (bits * torch.arange(per_word, dtype=torch.int64))).sum(dim=-1)
    # Values above 2^31 wrap to negative int32, exactly as the bits are stored on disk.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_fields_last_dim(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_fields_last_dim: [..., w] int32 -> [..., (32/bits)w] uint8."""
    shifts = bits * torch.arange(32 // bits, dtype=torch.int64)
    values = (words.to(torch.int64).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return values.reshape(*words.shape[:-1], -1).to(torch.uint8)


def _pack_nibbles_last_dim(values: torch.Tensor) -> torch.Tensor:
    return pack_fields_last_dim(values, 4)


def _unpack_nibbles_last_dim(words: torch.Tensor) -> torch.Tensor:
    return unpack_fields_last_dim(words, 4)


def pack_word_layout(kind: type[WordPacked], codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                     group_size: int) -> WordPacked:
    """Pack quantized codes into `kind`'s layout (Int4Packed, Int8Packed; bits = 32 / kind.PER_WORD).

    codes  [n, k] integers in 0..2^bits-1 (nn.Linear weight orientation: out x in)
    zeros  [n, groups] integers in 1..2^bits (v1 stores zero-1 in `bits` bits)
    scales [n, groups] floating
    """
    bits = 32 // kind.PER_WORD
    fmt, top = f"int{bits}", 2**bits - 1
    n, k = codes.shape
    check_word_shapes(fmt, kind.PER_WORD, k, n, group_size)
    groups = num_groups(k, group_size)
    if zeros.shape != (n, groups) or scales.shape != (n, groups):
        raise ValueError(
            f"{fmt}: zeros {tuple(zeros.shape)} and scales {tuple(scales.shape)} must be [n={n}, groups={groups}] "
            f"for k={k}, group_size={group_size}"
        )
    if codes.min() < 0 or codes.max() > top:
        raise ValueError(f"{fmt}: codes must lie in 0..{top}")
    if zeros.min() < 1 or zeros.max() > top + 1:
        raise ValueError(f"{fmt}: zero points must lie in 1..{top + 1} (GPTQ v1 stores zero-1 in {bits} bits)")
    qweight = pack_fields_last_dim(codes, bits).t()  # [n, k/per_word] words -> [k/per_word, n]
    qzeros = pack_fields_last_dim((zeros.to(torch.int64) - 1).t().contiguous(), bits)
    return kind(qweight.contiguous(), qzeros.contiguous(), scales.t().contiguous().to(torch.float16), group_size)


def unpack_word_layout(packed: WordPacked) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of pack_word_layout: (codes [n, k] uint8, zeros [n, groups] int16, scales [n, groups] fp16)."""
    bits = 32 // packed.PER_WORD
    codes = unpack_fields_last_dim(packed.qweight.t(), bits)
    zeros = unpack_fields_last_dim(packed.qzeros, bits).to(torch.int16) + 1
    return codes, zeros.t().contiguous(), packed.scales.t().contiguous()


def pack_int4(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> Int4Packed:
    """Pack codes [n, k] in 0..15, zero points [n, groups] in 1..16 and scales [n, groups] (pack_word_layout)."""
    return pack_word_layout(Int4Packed, codes, zeros, scales, group_size)


def unpack_int4(packed: Int4Packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of pack_int4: (codes [n, k] uint8, zeros [n, groups] int16, scales [n, groups] fp16)."""
    return unpack_word_layout(packed)


def dequantize_int4(packed: Int4Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense [n, k] weight the packed tensors stand for (the reference every kernel is tested against)."""
    return dequantize_codes(*unpack_int4(packed), packed.group_size, dtype)


def dequantize_codes(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(code - zero) * scale of codes [n, k] with per-group zeros and scales [n, groups], in fp32, as `dtype`:
    the one definition of a grouped weight every packed format (int3, int4, int8) dequantizes by."""
    group_of_input = torch.arange(codes.shape[1]) // group_size
    z = zeros.to(torch.float32)[:, group_of_input]
    s = scales.to(torch.float32)[:, group_of_input]
    return ((codes.to(torch.float32) - z) * s).to(dtype)
