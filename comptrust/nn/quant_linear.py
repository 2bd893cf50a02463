"""QuantLinear: an nn.Linear replacement holding int4, int3 or int8 weights and running on comptrust's packed
kernels, never on a dequantized dense copy. (int8 has a CPU kernel only; on other devices it runs the
pure-torch reference, which dequantizes.)

Its buffers (qweight, qzeros, scales) are the GPTQ v1 checkpoint tensors, so state_dict() is a GPTQ
checkpoint; on CPU it runs on, and keeps only, the tiled form (comptrust.nn.tiled_linear).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from comptrust import ops, reference
from comptrust.formats.cpu_tiles import TiledWeight, tile, untile
from comptrust.formats.int3 import INT3_PER_BLOCK, WORDS_PER_BLOCK, Int3Packed, check_int3_shapes
from comptrust.formats.int4 import INT4_PER_WORD, Int4Packed, check_int4_shapes, num_groups
from comptrust.formats.int8 import INT8_PER_WORD, Int8Packed, check_int8_shapes
from comptrust.nn.tiled_linear import TiledLinear

# Resolved once: looking the op up through torch.ops on every call costs microseconds a decode step repeats.
_GEMM_TILED = torch.ops.comptrust.gemm_tiled.default if ops.cpu_kernels_available() else None


_PACKED = {4: Int4Packed, 3: Int3Packed, 8: Int8Packed}
_CHECK_SHAPES = {4: check_int4_shapes, 3: check_int3_shapes, 8: check_int8_shapes}
# Inputs and outputs must be multiples of this for the layout (and the CPU tiles' 8 columns).
_UNIT = {4: INT4_PER_WORD, 3: INT3_PER_BLOCK, 8: 8}


def _gptq_shapes(bits: int, k: int, n: int, group_size: int) -> dict[str, tuple[int, int]]:
    groups = num_groups(k, group_size)
    if bits in (4, 8):
        per_word = INT4_PER_WORD if bits == 4 else INT8_PER_WORD
        return {"qweight": (k // per_word, n), "qzeros": (groups, n // per_word), "scales": (groups, n)}
    return {"qweight": (k // INT3_PER_BLOCK * WORDS_PER_BLOCK, n),
            "qzeros": (groups, n // INT3_PER_BLOCK * WORDS_PER_BLOCK), "scales": (groups, n)}


class QuantLinear(TiledLinear):
    CHECKPOINT_BUFFERS = ("qweight", "qzeros", "scales")

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False,
                 symmetric: bool = False, act_bits: int | None = None, bits: int = 4):
        if bits not in _PACKED:
            raise ValueError(f"QuantLinear: bits={bits} must be 4, 3 or 8")
        _CHECK_SHAPES[bits](in_features, out_features, group_size)
        super().__init__(in_features, out_features, bias)
        self.group_size, self.bits, self.symmetric, self.act_bits = group_size, bits, symmetric, act_bits
        for name, shape in _gptq_shapes(bits, in_features, out_features, group_size).items():
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float16 if name == "scales" else torch.int32))

    def _check_act_bits(self, value: int | None) -> None:
        if value not in (None, 8):
            raise ValueError(f"QuantLinear: act_bits={value} must be None (float activations) or 8")
        if self.bits == 8 and value == 8:
            raise ValueError("QuantLinear: int8 weights run with float activations only (act_bits=None)")

    @staticmethod
    def why_ineligible(name: str, linear: nn.Linear, bits: int = 4) -> str | None:
        """None if this nn.Linear can be stored as int4/int3/int8, else the reason it stays dense."""
        unit = _UNIT[bits]
        if linear.in_features % unit or linear.out_features % unit:
            return (f"int{bits} needs in/out features divisible by {unit}, got in={linear.in_features}, "
                    f"out={linear.out_features}")
        return None

    @classmethod
    def from_packed(cls, packed: Int4Packed | Int3Packed | Int8Packed, bias: torch.Tensor | None = None,
                    symmetric: bool = False, act_bits: int | None = None) -> "QuantLinear":
        bits = next(b for b, kind in _PACKED.items() if isinstance(packed, kind))
        layer = cls(packed.in_features, packed.out_features, packed.group_size, bias is not None, symmetric,
                    act_bits, bits)
        layer._set_buffers_from(packed, bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, symmetric: bool = False,
                    act_bits: int | None = None, bits: int = 4) -> "QuantLinear":
        """Round-to-nearest quantization of a dense layer."""
        from comptrust.compress.rtn import quantize_rtn  # compress depends on nn, not the reverse

        packed = quantize_rtn(linear.weight, bits, group_size, symmetric)
        return cls.from_packed(packed, linear.bias, symmetric, act_bits)

    # ------------------------------------------------------------------------- TiledLinear hooks
    def _packed_from_buffers(self) -> Int4Packed | Int3Packed | Int8Packed:
        return _PACKED[self.bits](self.qweight, self.qzeros, self.scales, self.group_size)

    def _tile(self, packed: Int4Packed | Int3Packed | Int8Packed) -> TiledWeight:
        return tile(packed)

    def _untile(self, tiled: TiledWeight) -> Int4Packed | Int3Packed | Int8Packed:
        return untile(tiled)

    def _kernel_call(self, tiled: TiledWeight) -> tuple:
        return _GEMM_TILED, (tiled.weight, tiled.zeros, tiled.scales, tiled.bits, tiled.group_size, self.act_bits or 0)

    def _run_packed(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return reference.int8_gemm(x2d, self.qweight, self.qzeros, self.scales, self.group_size)
        if self.bits == 4:
            gemm = ops.int4_gemm_a8 if self.act_bits == 8 else ops.int4_gemm
            return gemm(x2d, self.qweight, self.qzeros, self.scales, self.group_size)
        if self.act_bits == 8:
            return reference.int3_gemm_a8(x2d, self.qweight, self.qzeros, self.scales, self.group_size)
        return ops.int3_gemm(x2d, self.qweight, self.qzeros, self.scales, self.group_size)

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        acts = f"a{self.act_bits}" if self.act_bits else "float activations"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"w{self.bits}g{self.group_size} {kind}, {acts}")


def shared_input_tiles(layers: list[nn.Module]) -> tuple[list[TiledWeight], int] | None:
    """(the layers' tiles, act_bits) when gemm_tiled_many can run them on one x: every layer a plain QuantLinear
    (not act-order: those permute x) without bias, tiled on CPU, all of one format, width and act_bits. Else
    None."""
    if not all(type(layer) is QuantLinear for layer in layers) or not ops.cpu_kernels_available():
        return None
    same = {(layer.bits, layer.group_size, layer.in_features, layer.act_bits) for layer in layers}
    if len(same) != 1 or any(layer.bias is not None or layer.qweight.device.type != "cpu" for layer in layers):
        return None
    return [layer.tiled() for layer in layers], layers[0].act_bits or 0


def shared_input_call(layers: list[nn.Module]) -> Callable[[torch.Tensor], list[torch.Tensor]] | None:
    """One callable for several layers that read the same x (a decoder's q/k/v, gate/up): x -> their outputs,
    through ops.gemm_tiled_many, which at batch 1 runs them in one parallel region. None unless
    shared_input_tiles finds them fit. It is bound to the layers' tiles and act_bits as they are now: build it
    again after changing them."""
    shared = shared_input_tiles(layers)
    return None if shared is None else ops.bind_gemm_tiled_many(*shared)
