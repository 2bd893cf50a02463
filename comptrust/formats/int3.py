"""int3 weight-only format in the GPTQ v1 checkpoint layout (AutoGPTQ `QuantLinear.pack`, bits=3).

Layout:
  qweight [k/32*3, n]         int32  every 32 input rows -> 3 consecutive words of one column
  qzeros  [groups, n/32*3]    int32  every 32 output zero points -> 3 consecutive words, stored as zero-1
  scales  [groups, n]         fp16
with groups = ceil(k / group_size).

Bit order. AutoGPTQ packs values v0..v31 as: v0..v9 at word0 bits 3j; v10's low 2 bits at word0 bits
30-31 and its bit 2 at word1 bit 0; v11..v20 at word1 bits 3(j-11)+1; v21's bit 0 at word1 bit 31 and
its bits 1-2 at word2 bits 0-1; v22..v31 at word2 bits 3(j-22)+2. Read as one little-endian 96-bit
integer (word0 | word1 << 32 | word2 << 64), that is simply value i at bits 3i..3i+2, which is how the
packers below compute it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from comptrust.formats.int4 import dequantize_codes, num_groups

INT3_PER_BLOCK = 32   # values per block ...
WORDS_PER_BLOCK = 3   # ... held in this many int32 words (32 * 3 bits = 96 bits, none wasted)
_MASK32 = 0xFFFFFFFF

# A block's 96 bits are handled as two int64 lanes: values 0..20 fill bits 0..62 exactly, values
# 21..31 fill bits 63..95. Bit 63 is the one that crosses: it is value 21's bit 0 and word1's bit 31.
_LOW_SHIFTS = 3 * torch.arange(21, dtype=torch.int64)
_HIGH_SHIFTS = 3 * torch.arange(11, dtype=torch.int64)


def check_int3_shapes(in_features: int, out_features: int, group_size: int) -> None:
    """Raise ValueError naming the sizes when the layout cannot hold (in_features, out_features)."""
    if in_features <= 0 or out_features <= 0:
        raise ValueError(f"int3: in_features (k={in_features}) and out_features (n={out_features}) must be positive")
    if in_features % INT3_PER_BLOCK:
        raise ValueError(f"int3: in_features k={in_features} must be a multiple of 32 (32 weights per 3 int32 words)")
    if out_features % INT3_PER_BLOCK:
        raise ValueError(
            f"int3: out_features n={out_features} must be a multiple of 32 (32 zero points per 3 int32 words)"
        )
    # A multiple of 32 keeps every 3-word block inside one group, so kernels read one zero/scale per block.
    if group_size <= 0 or group_size % INT3_PER_BLOCK:
        raise ValueError(f"int3: group_size={group_size} must be a positive multiple of 32 (k={in_features})")


@dataclass(frozen=True)
class Int3Packed:
    """The three tensors of one int3 linear layer's weight, plus its group size."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    group_size: int

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] // WORDS_PER_BLOCK * INT3_PER_BLOCK

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]


def pack_3bit_last_dim(values: torch.Tensor) -> torch.Tensor:
    """[..., 32b] ints in 0..7 -> [..., 3b] int32 words in AutoGPTQ's bits=3 order."""
    v = values.to(torch.int64).reshape(*values.shape[:-1], -1, INT3_PER_BLOCK)
    # Fields never overlap, so summing the shifted values is OR-ing them.
    low = (v[..., :21] << _LOW_SHIFTS).sum(dim=-1)     # block bits 0..62
    high = (v[..., 21:] << _HIGH_SHIFTS).sum(dim=-1)   # block bits 63..95, as bits 0..32
    words = torch.stack([low & _MASK32, (low >> 32) | ((high & 1) << 31), high >> 1], dim=-1)
    # Values above 2^31 wrap to negative int32, exactly as the bits are stored on disk.
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.reshape(*values.shape[:-1], -1)


def unpack_3bit_last_dim(words: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_3bit_last_dim: [..., 3b] int32 -> [..., 32b] uint8."""
    u = (words.to(torch.int64) & _MASK32).reshape(*words.shape[:-1], -1, WORDS_PER_BLOCK)
    w0, w1, w2 = u.unbind(dim=-1)
    # word1's bit 31 belongs to the high lane; leaving it out of the low one keeps int64 from overflowing.
    low = w0 | ((w1 & 0x7FFFFFFF) << 32)
    high = (w1 >> 31) | (w2 << 1)
    values = torch.cat([(low.unsqueeze(-1) >> _LOW_SHIFTS) & 7, (high.unsqueeze(-1) >> _HIGH_SHIFTS) & 7], dim=-1)
    return values.reshape(*words.shape[:-1], -1).to(torch.uint8)


def pack_int3(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> Int3Packed:
    """Pack quantized codes.

    codes  [n, k] integers in 0..7 (nn.Linear weight orientation: out x in)
    zeros  [n, groups] integers in 1..8 (v1 stores zero-1 in 3 bits)
    scales [n, groups] floating
    """
    n, k = codes.shape
    check_int3_shapes(k, n, group_size)
    groups = num_groups(k, group_size)
    if zeros.shape != (n, groups) or scales.shape != (n, groups):
        raise ValueError(
            f"int3: zeros {tuple(zeros.shape)} and scales {tuple(scales.shape)} must be [n={n}, groups={groups}] "
            f"for k={k}, group_size={group_size}"
        )
    if codes.min() < 0 or codes.max() > 7:
        raise ValueError(f"int3: codes must lie in 0..7, got {codes.min().item()}..{codes.max().item()}")
    if zeros.min() < 1 or zeros.max() > 8:
        raise ValueError(
            f"int3: zero points must lie in 1..8 (GPTQ v1 stores zero-1 in 3 bits), "
            f"got {zeros.min().item()}..{zeros.max().item()}"
        )
    qweight = pack_3bit_last_dim(codes).t()  # [n, k/32*3] words -> [k/32*3, n]
    qzeros = pack_3bit_last_dim((zeros - 1).t().contiguous())
    return Int3Packed(qweight.contiguous(), qzeros.contiguous(), scales.t().contiguous().to(torch.float16), group_size)


def unpack_int3(packed: Int3Packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of pack_int3: (codes [n, k] uint8, zeros [n, groups] int16, scales [n, groups] fp16)."""
    codes = unpack_3bit_last_dim(packed.qweight.t())
    zeros = unpack_3bit_last_dim(packed.qzeros).to(torch.int16) + 1
    return codes, zeros.t().contiguous(), packed.scales.t().contiguous()


def dequantize_int3(packed: Int3Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense [n, k] weight the packed tensors stand for (the reference every kernel is tested against)."""
    return dequantize_codes(*unpack_int3(packed), packed.group_size, dtype)
