"""The CPU kernels' tiled weight layout, built once per layer from the GPTQ v1 int4/int3/int8 tensors.

The layout is specified in csrc/include/comptrust/cpu_tiles.h (2:4 weights: sparse24_tiles.h): output columns in
tiles of 8, each tile's weights contiguous along the input dimension; int3 as words whose bytes hold codes at
fixed bit positions, so the kernels decode 64 codes with one to three instructions. `untile` inverts it
bit-exactly, so a layer kept only in this form can still be exported as a GPTQ checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from comptrust.formats.int3 import Int3Packed, pack_3bit_last_dim, unpack_3bit_last_dim
from comptrust.formats.int4 import (Int4Packed, _pack_nibbles_last_dim, _unpack_nibbles_last_dim, pack_fields_last_dim,
                                    unpack_fields_last_dim)
from comptrust.formats.int8 import Int8Packed
from comptrust.formats.sparse24 import Sparse24Int4Packed, Sparse24Packed

TILE_COLS = 8
INT3_BLOCK = 32

_BYTE_SHIFT = 8 * torch.arange(4)  # byte q of a word


@dataclass(frozen=True)
class TiledWeight:
    """One layer's weight in the CPU kernels' layout (see the module docstring)."""

    weight: torch.Tensor  # bits 4: [n/8, k/8, 8] int32; bits 3: [n/8, k/32, 3, 8] int32; bits 8: [n/8, k/4, 8]
    zeros: torch.Tensor   # [n/8, groups, 8] uint8: the zero point (bits 3, 4) or zero-1 (bits 8: zero 256 fits)
    scales: torch.Tensor  # [n/8, groups, 8] float16
    bits: int
    group_size: int

    @property
    def out_features(self) -> int:
        return self.weight.shape[0] * TILE_COLS

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] * {4: 8, 3: INT3_BLOCK, 8: 4}[self.bits]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.weight, self.zeros, self.scales)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _to_int32_bits(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _tile_columns(per_column: torch.Tensor) -> torch.Tensor:
    """[n, ...] -> [n/8, ..., 8]: a tile's 8 columns become the last dimension."""
    n = per_column.shape[0]
    tiled = per_column.reshape(n // TILE_COLS, TILE_COLS, *per_column.shape[1:])
    return tiled.movedim(1, -1).contiguous()


def _untile_columns(tiled: torch.Tensor) -> torch.Tensor:
    """Inverse of _tile_columns."""
    per_column = tiled.movedim(-1, 1)
    return per_column.reshape(-1, *per_column.shape[2:])


def _check_columns(n: int) -> None:
    if n % TILE_COLS:
        raise ValueError(f"cpu tiles: out_features n={n} must be a multiple of {TILE_COLS}")


def tile_int4(packed: Int4Packed) -> TiledWeight:
    n = packed.out_features
    _check_columns(n)
    zeros = _unpack_nibbles_last_dim(packed.qzeros) + 1  # [groups, n], the zero points themselves
    return TiledWeight(
        weight=_tile_columns(packed.qweight.t()),
        zeros=_tile_columns(zeros.t()),
        scales=_tile_columns(packed.scales.t()),
        bits=4,
        group_size=packed.group_size,
    )


def _int3_words(codes: torch.Tensor) -> torch.Tensor:
    """[n, k] codes -> [n, k/32 * 3] int64 words (cpu_tiles.h): per pair of blocks A(2c, 0), A(2c, 1),
    A(2c + 1, 0), A(2c + 1, 1), N0, N1; a last block alone (k/32 odd) A(b, 0), A(b, 1), N."""
    n, k = codes.shape
    blocks = k // INT3_BLOCK
    c = codes.reshape(n, blocks, 2, 4, 4)  # [column, block, half p, byte q, i]: row 16p + 4q + i
    a = ((c[..., 0] | c[..., 1] << 3 | (c[..., 2] & 3) << 6) << _BYTE_SHIFT).sum(-1)  # [n, blocks, 2]
    nibbles = c[..., 3] | (c[..., 2] >> 2) << 3  # [n, blocks, 2, 4]
    paired = blocks - blocks % 2
    pair_nibbles = nibbles[:, :paired].reshape(n, paired // 2, 2, 2, 4)  # [n, pair, block of the pair, p, q]
    pair_n = ((pair_nibbles[:, :, 0] | pair_nibbles[:, :, 1] << 4) << _BYTE_SHIFT).sum(-1)  # [n, pair, p]
    words = [torch.cat([a[:, :paired].reshape(n, paired // 2, 4), pair_n], -1).reshape(n, -1)]
    if blocks % 2:
        last = nibbles[:, -1]  # [n, p, q]
        words += [a[:, -1], ((last[:, 0] | last[:, 1] << 4) << _BYTE_SHIFT).sum(-1, keepdim=True)]
    return torch.cat(words, -1)


def _int3_codes(words: torch.Tensor) -> torch.Tensor:
    """Inverse of _int3_words: [n, k/32 * 3] int64 words (unsigned 32-bit values) -> [n, k] codes."""
    n, blocks = words.shape[0], words.shape[1] // 3
    paired = blocks - blocks % 2
    pairs = words[:, :paired * 3].reshape(n, paired // 2, 6)
    a = pairs[..., :4].reshape(n, paired, 2)  # [n, block, p]
    pair_n = (pairs[..., 4:, None] >> _BYTE_SHIFT) & 0xFF  # [n, pair, p, q]
    nibbles = torch.stack([pair_n & 0xF, pair_n >> 4], 2).reshape(n, paired, 2, 4)  # [n, block, p, q]
    if blocks % 2:
        last_n = (words[:, -1, None] >> _BYTE_SHIFT) & 0xFF  # [n, q]
        a = torch.cat([a, words[:, None, -3:-1]], 1)
        nibbles = torch.cat([nibbles, torch.stack([last_n & 0xF, last_n >> 4], 1)[:, None]], 1)
    a_bytes = (a[..., None] >> _BYTE_SHIFT) & 0xFF  # [n, blocks, p, q]
    c2 = a_bytes >> 6 | (nibbles >> 3) << 2
    codes = torch.stack([a_bytes & 7, a_bytes >> 3 & 7, c2, nibbles & 7], -1)  # [n, blocks, p, q, i]
    return codes.reshape(n, blocks * INT3_BLOCK)


def tile_int3(packed: Int3Packed) -> TiledWeight:
    n, k = packed.out_features, packed.in_features
    _check_columns(n)
    codes = unpack_3bit_last_dim(packed.qweight.t()).to(torch.int64)  # [n, k]
    words = _to_int32_bits(_int3_words(codes)).reshape(n, k // INT3_BLOCK, 3)
    zeros = unpack_3bit_last_dim(packed.qzeros).to(torch.int16) + 1  # [groups, n]
    return TiledWeight(
        weight=_tile_columns(words),
        zeros=_tile_columns(zeros.t().to(torch.uint8)),
        scales=_tile_columns(packed.scales.t()),
        bits=3,
        group_size=packed.group_size,
    )


def tile_int8(packed: Int8Packed) -> TiledWeight:
    _check_columns(packed.out_features)
    return TiledWeight(
        weight=_tile_columns(packed.qweight.t()),
        zeros=_tile_columns(unpack_fields_last_dim(packed.qzeros, 8).t()),  # zero-1, as stored
        scales=_tile_columns(packed.scales.t()),
        bits=8,
        group_size=packed.group_size,
    )


def tile(packed: Int4Packed | Int3Packed | Int8Packed) -> TiledWeight:
    if isinstance(packed, Int8Packed):
        return tile_int8(packed)
    return tile_int4(packed) if isinstance(packed, Int4Packed) else tile_int3(packed)


def untile(tiled: TiledWeight) -> Int4Packed | Int3Packed | Int8Packed:
    """The GPTQ v1 tensors a TiledWeight was built from, bit for bit."""
    scales = _untile_columns(tiled.scales)  # [n, groups]
    if tiled.bits == 8:
        qweight = _untile_columns(tiled.weight).t().contiguous()
        qzeros = pack_fields_last_dim(_untile_columns(tiled.zeros).t().contiguous(), 8)
        return Int8Packed(qweight, qzeros, scales.t().contiguous(), tiled.group_size)
    zeros = _untile_columns(tiled.zeros).to(torch.int16)
    if tiled.bits == 4:
        qweight = _untile_columns(tiled.weight).t().contiguous()
        qzeros = _pack_nibbles_last_dim((zeros - 1).t().contiguous())
        return Int4Packed(qweight, qzeros, scales.t().contiguous(), tiled.group_size)
    words = _untile_columns(tiled.weight).to(torch.int64) & 0xFFFFFFFF  # [n, blocks, 3]
    codes = _int3_codes(words.reshape(words.shape[0], -1))
    qweight = pack_3bit_last_dim(codes).t().contiguous()
    qzeros = pack_3bit_last_dim((zeros - 1).t().contiguous())
    return Int3Packed(qweight, qzeros.contiguous(), scales.t().contiguous(), tiled.group_size)


# ------------------------------------------------------------------------------------------- 2:4
# Layout: csrc/include/comptrust/sparse24_tiles.h. Meta words: column c's nibble in bits 4c..4c+3.
_META_SHIFT = 4 * torch.arange(TILE_COLS, dtype=torch.int64)


@dataclass(frozen=True)
class TiledSparse24:
    """A 2:4 layer in the CPU kernels' layout. Float values: values [n/8, k/4, 2, 8] and int4 is None;
    int4 values: int4 holds the compact [n, k/2] matrix tiled like a dense int4 layer and values is None."""

    meta: torch.Tensor                 # [n/8, k/4] int32
    values: torch.Tensor | None = None
    int4: TiledWeight | None = None

    @property
    def out_features(self) -> int:
        return self.meta.shape[0] * TILE_COLS

    @property
    def in_features(self) -> int:
        return self.meta.shape[1] * 4

    def tensors(self) -> tuple[torch.Tensor, ...]:
        parts = (self.values,) if self.int4 is None else (self.int4.weight, self.int4.zeros, self.int4.scales)
        return (self.meta, *parts)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _tile_meta(meta: torch.Tensor) -> torch.Tensor:
    """Storage meta [n, k/8] uint8 -> [n/8, k/4] int32 (one word per tile and group)."""
    n = meta.shape[0]
    m = meta.to(torch.int64)
    nibbles = torch.stack((m & 0xF, m >> 4), dim=-1).reshape(n // TILE_COLS, TILE_COLS, -1)  # [tile, c, g]
    return _to_int32_bits((nibbles << _META_SHIFT.view(1, TILE_COLS, 1)).sum(1))


def _untile_meta(words: torch.Tensor) -> torch.Tensor:
    """Inverse of _tile_meta."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    nibbles = (w.unsqueeze(1) >> _META_SHIFT.view(1, TILE_COLS, 1)) & 0xF  # [tile, c, g]
    nibbles = nibbles.reshape(-1, nibbles.shape[-1])                      # [n, k/4]
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)


def tile_sparse24(packed: Sparse24Packed) -> TiledSparse24:
    n = packed.out_features
    _check_columns(n)
    values = packed.values.reshape(n, -1, 2)  # [n, k/4, 2]
    return TiledSparse24(meta=_tile_meta(packed.meta), values=_tile_columns(values))


def tile_sparse24_int4(packed: Sparse24Int4Packed) -> TiledSparse24:
    _check_columns(packed.out_features)
    return TiledSparse24(meta=_tile_meta(packed.meta), int4=tile_int4(packed.qvalues))


def untile_sparse24(tiled: TiledSparse24) -> Sparse24Packed | Sparse24Int4Packed:
    """The storage-layout tensors a TiledSparse24 was built from, bit for bit."""
    meta = _untile_meta(tiled.meta)
    if tiled.int4 is not None:
        return Sparse24Int4Packed(untile(tiled.int4), meta)
    values = _untile_columns(tiled.values)  # [n, k/4, 2]
    return Sparse24Packed(values.reshape(values.shape[0], -1).contiguous(), meta)
