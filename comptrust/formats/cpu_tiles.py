"""The CPU kernels' tiled weight layout, built once per layer from the GPTQ v1 int4/int3 tensors.

The layout is specified in csrc/include/comptrust/cpu_tiles.h: output columns in tiles of 8, each tile's
weights contiguous along the input dimension; int3 split into a 2-bit and a 1-bit plane so the kernels
decode 32 codes with a few shifts and masks. `untile` inverts it bit-exactly, so a layer kept only in this
form can still be exported as a GPTQ checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from comptrust.formats.int3 import Int3Packed, pack_3bit_last_dim, unpack_3bit_last_dim
from comptrust.formats.int4 import Int4Packed, _pack_nibbles_last_dim, _unpack_nibbles_last_dim

TILE_COLS = 8
INT3_BLOCK = 32

# int3 high plane: row 16p + 4q + i of a block goes to bit 8q + 4p + i (see cpu_tiles.h).
_P, _Q, _I = torch.meshgrid(torch.arange(2), torch.arange(4), torch.arange(4), indexing="ij")
_INT3_HIGH_BIT = (8 * _Q + 4 * _P + _I).reshape(2, 16)  # [plane, row within plane]
_INT3_LOW_SHIFT = 2 * torch.arange(16)


@dataclass(frozen=True)
class TiledWeight:
    """One layer's weight in the CPU kernels' layout (see the module docstring)."""

    weight: torch.Tensor  # bits 4: [n/8, k/8, 8] int32; bits 3: [n/8, k/32, 3, 8] int32
    zeros: torch.Tensor   # [n/8, groups, 8] uint8
    scales: torch.Tensor  # [n/8, groups, 8] float16
    bits: int
    group_size: int

    @property
    def out_features(self) -> int:
        return self.weight.shape[0] * TILE_COLS

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] * (8 if self.bits == 4 else INT3_BLOCK)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.zeros, self.scales))


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


def tile_int3(packed: Int3Packed) -> TiledWeight:
    n, k = packed.out_features, packed.in_features
    _check_columns(n)
    codes = unpack_3bit_last_dim(packed.qweight.t()).to(torch.int64)  # [n, k]
    blocks = codes.reshape(n, k // INT3_BLOCK, 2, 16)  # [column, block, plane, row]
    low = ((blocks & 3) << _INT3_LOW_SHIFT).sum(-1)  # [n, blocks, 2]
    high = ((blocks >> 2) << _INT3_HIGH_BIT).sum((-2, -1))  # [n, blocks]
    planes = _to_int32_bits(torch.cat([low, high.unsqueeze(-1)], dim=-1))  # [n, blocks, 3]
    zeros = unpack_3bit_last_dim(packed.qzeros).to(torch.int16) + 1  # [groups, n]
    return TiledWeight(
        weight=_tile_columns(planes),
        zeros=_tile_columns(zeros.t().to(torch.uint8)),
        scales=_tile_columns(packed.scales.t()),
        bits=3,
        group_size=packed.group_size,
    )


def tile(packed: Int4Packed | Int3Packed) -> TiledWeight:
    return tile_int4(packed) if isinstance(packed, Int4Packed) else tile_int3(packed)


def untile(tiled: TiledWeight) -> Int4Packed | Int3Packed:
    """The GPTQ v1 tensors a TiledWeight was built from, bit for bit."""
    scales = _untile_columns(tiled.scales)  # [n, groups]
    zeros = _untile_columns(tiled.zeros).to(torch.int16)
    if tiled.bits == 4:
        qweight = _untile_columns(tiled.weight).t().contiguous()
        qzeros = _pack_nibbles_last_dim((zeros - 1).t().contiguous())
        return Int4Packed(qweight, qzeros, scales.t().contiguous(), tiled.group_size)
    planes = _untile_columns(tiled.weight).to(torch.int64) & 0xFFFFFFFF  # [n, blocks, 3]
    low = (planes[..., :2, None] >> _INT3_LOW_SHIFT) & 3  # [n, blocks, 2, 16]
    high = (planes[..., 2, None, None] >> _INT3_HIGH_BIT) & 1  # [n, blocks, 2, 16]
    codes = (low | (high << 2)).reshape(scales.shape[0], -1)
    qweight = pack_3bit_last_dim(codes).t().contiguous()
    qzeros = pack_3bit_last_dim((zeros - 1).t().contiguous())
    return Int3Packed(qweight, qzeros.contiguous(), scales.t().contiguous(), tiled.group_size)
