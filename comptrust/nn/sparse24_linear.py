"""Sparse24Linear and Sparse24Int4Linear: nn.Linear replacements holding a 2:4 semi-structured sparse weight
(float kept values, or int4 kept values) and running on comptrust's 2:4 kernels, never on a dense copy.

Buffers are the documented 2:4 storage layout (comptrust.formats.sparse24): values [n, k/2] + meta [n, k/8],
or the GPTQ v1 int4 tensors of the compact values + meta; on CPU the layer runs on, and keeps only, the
tiled form (comptrust.nn.tiled_linear).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from comptrust import ops, reference
from comptrust.formats.cpu_tiles import TiledSparse24, tile_sparse24, tile_sparse24_int4, untile_sparse24
from comptrust.formats.int4 import INT4_PER_WORD, Int4Packed, num_groups
from comptrust.formats.sparse24 import (
    INPUTS_PER_META_BYTE,
    KEPT,
    Sparse24Int4Packed,
    Sparse24Packed,
    check_sparse24_int4_shapes,
    pack_sparse24,
    pack_sparse24_int4,
)
from comptrust.nn.tiled_linear import TiledLinear

_SPARSE24_TILED = torch.ops.comptrust.sparse24_gemm_tiled.default if ops.cpu_kernels_available() else None
_SPARSE24_INT4_TILED = torch.ops.comptrust.sparse24_int4_gemm_tiled.default if ops.cpu_kernels_available() else None
_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TILE_COLS = 8


def _why_ineligible_24(linear: nn.Linear) -> str | None:
    if linear.in_features % INPUTS_PER_META_BYTE or linear.out_features % TILE_COLS:
        return (f"2:4 needs in_features divisible by 8 and out_features by 8, got in={linear.in_features}, "
                f"out={linear.out_features}")
    return None


class Sparse24Linear(TiledLinear):
    CHECKPOINT_BUFFERS = ("values", "meta")

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 value_dtype: torch.dtype = torch.float32):
        if in_features <= 0 or in_features % INPUTS_PER_META_BYTE or out_features <= 0 or out_features % TILE_COLS:
            raise ValueError(f"Sparse24Linear: in_features={in_features} and out_features={out_features} must be "
                             f"positive multiples of 8")
        if value_dtype not in _VALUE_DTYPES:
            raise ValueError(f"Sparse24Linear: value_dtype={value_dtype} must be float32, bfloat16 or float16")
        super().__init__(in_features, out_features, bias)
        self.register_buffer("values", torch.zeros(out_features, in_features // KEPT, dtype=value_dtype))
        self.register_buffer("meta", torch.zeros(out_features, in_features // INPUTS_PER_META_BYTE, dtype=torch.uint8))

    @staticmethod
    def why_ineligible(name: str, linear: nn.Linear) -> str | None:
        return _why_ineligible_24(linear)

    @classmethod
    def from_packed(cls, packed: Sparse24Packed, bias: torch.Tensor | None = None) -> "Sparse24Linear":
        layer = cls(packed.in_features, packed.out_features, bias is not None, packed.values.dtype)
        layer._set_buffers_from(packed, bias)
        return layer

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    value_dtype: torch.dtype | None = None, name: str = "weight") -> "Sparse24Linear":
        """The layer for a 2:4 weight [out, in] (e.g. pruned by comptrust.compress); values keep the weight's
        dtype unless value_dtype says otherwise. Raises ValueError naming the first non-2:4 group."""
        weight = weight.detach()
        return cls.from_packed(pack_sparse24(weight if value_dtype is None else weight.to(value_dtype), name), bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, value_dtype: torch.dtype | None = None,
                    name: str = "weight") -> "Sparse24Linear":
        """from_weight of an nn.Linear whose weight already is 2:4."""
        return cls.from_weight(linear.weight, linear.bias, value_dtype, name)

    def _packed_from_buffers(self) -> Sparse24Packed:
        return Sparse24Packed(self.values, self.meta)

    def _tile(self, packed: Sparse24Packed) -> TiledSparse24:
        return tile_sparse24(packed)

    def _untile(self, tiled: TiledSparse24) -> Sparse24Packed:
        return untile_sparse24(tiled)

    def _kernel_call(self, tiled: TiledSparse24) -> tuple:
        return _SPARSE24_TILED, (tiled.values, tiled.meta)

    def _run_packed(self, x2d: torch.Tensor) -> torch.Tensor:
        return ops.sparse24_gemm(x2d, self.values, self.meta)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, 2:4 "
                f"{str(self.values.dtype if self._tiled is None else self._tiled.values.dtype).removeprefix('torch.')}")


class Sparse24Int4Linear(TiledLinear):
    CHECKPOINT_BUFFERS = ("qweight", "qzeros", "scales", "meta")

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False,
                 symmetric: bool = False, act_bits: int | None = None):
        check_sparse24_int4_shapes(out_features, in_features, group_size)
        super().__init__(in_features, out_features, bias)
        self.group_size, self.symmetric, self.act_bits = group_size, symmetric, act_bits
        kept, groups = in_features // KEPT, num_groups(in_features // KEPT, group_size)
        self.register_buffer("qweight", torch.zeros(kept // INT4_PER_WORD, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // INT4_PER_WORD, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("meta", torch.zeros(out_features, in_features // INPUTS_PER_META_BYTE, dtype=torch.uint8))

    def _check_act_bits(self, value: int | None) -> None:
        if value not in (None, 8):
            raise ValueError(f"Sparse24Int4Linear: act_bits={value} must be None (float activations) or 8")

    @staticmethod
    def why_ineligible(name: str, linear: nn.Linear) -> str | None:
        if linear.in_features % 16 or linear.out_features % TILE_COLS:
            return (f"2:4+int4 needs in_features divisible by 16 and out_features by 8, got "
                    f"in={linear.in_features}, out={linear.out_features}")
        return None

    @classmethod
    def from_packed(cls, packed: Sparse24Int4Packed, bias: torch.Tensor | None = None,
                    symmetric: bool = False, act_bits: int | None = None) -> "Sparse24Int4Linear":
        """act_bits=8 runs on int8 activations (per row and block of 32 inputs): integer dot products."""
        layer = cls(packed.in_features, packed.out_features, packed.group_size, bias is not None, symmetric, act_bits)
        layer._set_buffers_from(packed, bias)
        return layer

    @classmethod
    def from_weight(cls, weight: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
                    symmetric: bool = False, name: str = "weight", act_bits: int | None = None) -> "Sparse24Int4Linear":
        """RTN int4 of the kept values of a 2:4 weight [out, in] (group_size in kept values, -1 for one group
        per row). Raises ValueError naming the first non-2:4 group."""
        gs = weight.shape[1] // KEPT if group_size == -1 else group_size
        return cls.from_packed(pack_sparse24_int4(weight.detach(), gs, symmetric, name), bias, symmetric, act_bits)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, symmetric: bool = False,
                    name: str = "weight", act_bits: int | None = None) -> "Sparse24Int4Linear":
        """from_weight of an nn.Linear whose weight already is 2:4."""
        return cls.from_weight(linear.weight, group_size, linear.bias, symmetric, name, act_bits)

    def _checkpoint_tensors(self, packed: Sparse24Int4Packed) -> dict[str, torch.Tensor]:
        q = packed.qvalues
        return {"qweight": q.qweight, "qzeros": q.qzeros, "scales": q.scales, "meta": packed.meta}

    def _packed_from_buffers(self) -> Sparse24Int4Packed:
        return Sparse24Int4Packed(Int4Packed(self.qweight, self.qzeros, self.scales, self.group_size), self.meta)

    def _tile(self, packed: Sparse24Int4Packed) -> TiledSparse24:
        return tile_sparse24_int4(packed)

    def _untile(self, tiled: TiledSparse24) -> Sparse24Int4Packed:
        return untile_sparse24(tiled)

    def _kernel_call(self, tiled: TiledSparse24) -> tuple:
        q = tiled.int4
        return _SPARSE24_INT4_TILED, (q.weight, tiled.meta, q.zeros, q.scales, q.group_size, self.act_bits or 0)

    def _run_packed(self, x2d: torch.Tensor) -> torch.Tensor:
        gemm = reference.sparse24_int4_gemm_a8 if self.act_bits == 8 else ops.sparse24_int4_gemm
        return gemm(x2d, self.qweight, self.qzeros, self.scales, self.meta, self.group_size)

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        acts = f"a{self.act_bits}" if self.act_bits else "float activations"
        return (f"in_features={self.in_features}, out_features={self.out_features}, 2:4 + "
                f"w4g{self.group_size} {kind} (group counted in kept values), {acts}")
