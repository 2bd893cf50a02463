"""QuantLinear: an nn.Linear replacement holding int4 or int3 weights and running on comptrust's packed
kernels, never on a dequantized dense copy.

Its buffers (qweight, qzeros, scales) are the GPTQ v1 checkpoint tensors, so state_dict() is a GPTQ
checkpoint. On CPU the kernels want their own tiled layout (comptrust.formats.cpu_tiles): the layer
builds it once and from then on keeps only that form, releasing the GPTQ buffers' storage (the
weights would otherwise sit in memory twice). packed() and state_dict() rebuild the GPTQ tensors
bit-exactly from the tiles; moving the layer to another device brings them back as buffers first.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from comptrust import ops, reference
from comptrust.formats.cpu_tiles import TiledWeight, tile, untile
from comptrust.formats.int3 import INT3_PER_BLOCK, WORDS_PER_BLOCK, Int3Packed, check_int3_shapes
from comptrust.formats.int4 import INT4_PER_WORD, Int4Packed, check_int4_shapes, num_groups

_GPTQ_BUFFERS = ("qweight", "qzeros", "scales")
# Resolved once: looking the op up through torch.ops on every call costs microseconds a decode step repeats.
_GEMM_TILED = torch.ops.comptrust.gemm_tiled.default if ops.cpu_kernels_available() else None


def _gptq_shapes(bits: int, k: int, n: int, group_size: int) -> dict[str, tuple[int, int]]:
    groups = num_groups(k, group_size)
    if bits == 4:
        return {"qweight": (k // INT4_PER_WORD, n), "qzeros": (groups, n // INT4_PER_WORD), "scales": (groups, n)}
    return {"qweight": (k // INT3_PER_BLOCK * WORDS_PER_BLOCK, n),
            "qzeros": (groups, n // INT3_PER_BLOCK * WORDS_PER_BLOCK), "scales": (groups, n)}


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False,
                 symmetric: bool = False, act_bits: int | None = None, bits: int = 4):
        super().__init__()
        if bits not in (3, 4):
            raise ValueError(f"QuantLinear: bits={bits} must be 4 or 3")
        (check_int4_shapes if bits == 4 else check_int3_shapes)(in_features, out_features, group_size)
        if act_bits not in (None, 8):
            raise ValueError(f"QuantLinear: act_bits={act_bits} must be None (float activations) or 8")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.bits, self.symmetric, self.act_bits = bits, symmetric, act_bits
        for name, shape in _gptq_shapes(bits, in_features, out_features, group_size).items():
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float16 if name == "scales" else torch.int32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._tiled: TiledWeight | None = None  # the CPU kernels' form, once built (then the buffers are empty)

    @staticmethod
    def why_ineligible(name: str, linear: nn.Linear, bits: int = 4) -> str | None:
        """None if this nn.Linear can be stored as int4/int3, else the reason it stays dense."""
        unit = INT4_PER_WORD if bits == 4 else INT3_PER_BLOCK
        if linear.in_features % unit or linear.out_features % unit:
            return (f"int{bits} needs in/out features divisible by {unit}, got in={linear.in_features}, "
                    f"out={linear.out_features}")
        return None

    @classmethod
    def from_packed(cls, packed: Int4Packed | Int3Packed, bias: torch.Tensor | None = None, symmetric: bool = False,
                    act_bits: int | None = None) -> "QuantLinear":
        bits = 4 if isinstance(packed, Int4Packed) else 3
        layer = cls(packed.in_features, packed.out_features, packed.group_size, bias is not None, symmetric,
                    act_bits, bits)
        for name in _GPTQ_BUFFERS:
            expected = getattr(layer, name)
            got = getattr(packed, name)
            if got.shape != expected.shape or got.dtype != expected.dtype:
                raise ValueError(f"QuantLinear: {name} is {tuple(got.shape)} {got.dtype}, expected "
                                 f"{tuple(expected.shape)} {expected.dtype}")
            setattr(layer, name, got.contiguous())
        if bias is not None:
            layer.bias = bias.detach().to(torch.float32).clone()
        if layer.scales.device.type == "cpu" and ops.cpu_kernels_available():
            layer.tiled()  # the form it will run in, so memory reports see the final layer
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, symmetric: bool = False,
                    act_bits: int | None = None, bits: int = 4) -> "QuantLinear":
        """Round-to-nearest quantization of a dense layer."""
        from comptrust.compress.rtn import quantize_rtn  # compress depends on nn, not the reverse

        packed = quantize_rtn(linear.weight, bits, group_size, symmetric)
        return cls.from_packed(packed, linear.bias, symmetric, act_bits)

    # ------------------------------------------------------------------ the two forms of the weight
    def packed(self) -> Int4Packed | Int3Packed:
        """The GPTQ v1 tensors (rebuilt from the tiles when the layer runs on CPU)."""
        if self._tiled is not None:
            return untile(self._tiled)
        kind = Int4Packed if self.bits == 4 else Int3Packed
        return kind(self.qweight, self.qzeros, self.scales, self.group_size)

    def tiled(self) -> TiledWeight:
        """The CPU kernels' form; built on first use, after which the GPTQ buffers are released."""
        if self._tiled is None:
            self._tiled = tile(self.packed())
            for name in _GPTQ_BUFFERS:
                setattr(self, name, getattr(self, name).new_empty(0))
        return self._tiled

    def _restore_gptq_buffers(self) -> None:
        if self._tiled is not None:
            packed = untile(self._tiled)
            self._tiled = None
            for name in _GPTQ_BUFFERS:
                setattr(self, name, getattr(packed, name))

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() move buffers: give them their contents back first.
        self._restore_gptq_buffers()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._tiled is not None:
            packed = self.packed()
            for name in _GPTQ_BUFFERS:
                destination[prefix + name] = getattr(packed, name)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._restore_gptq_buffers()  # loading replaces the weight: the tiles would be stale
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear: input has {x.shape[-1]} features, layer expects {self.in_features}")
        tiled = self._tiled
        if tiled is not None and x.is_cpu:
            # The decode hot path (~200 calls per token on a small model): straight to the op, no other checks.
            y = _GEMM_TILED(x.reshape(-1, self.in_features), tiled.weight, tiled.zeros, tiled.scales, tiled.bits,
                            tiled.group_size, self.act_bits or 0)
        else:
            y = self._forward_any_device(x.reshape(-1, self.in_features))
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _forward_any_device(self, x2d: torch.Tensor) -> torch.Tensor:
        device = self.scales.device if self._tiled is None else torch.device("cpu")
        if x2d.device != device:
            raise ValueError(f"QuantLinear: input is on {x2d.device} but the layer's weights are on {device}")
        if device.type == "cpu" and ops.cpu_kernels_available():
            return ops.gemm_tiled(x2d, self.tiled(), self.act_bits)
        if self.bits == 4:
            gemm = ops.int4_gemm_a8 if self.act_bits == 8 else ops.int4_gemm
            return gemm(x2d, self.qweight, self.qzeros, self.scales, self.group_size)
        if self.act_bits == 8:
            return reference.int3_gemm_a8(x2d, self.qweight, self.qzeros, self.scales, self.group_size)
        return ops.int3_gemm(x2d, self.qweight, self.qzeros, self.scales, self.group_size)

    def kernel_tensors(self) -> tuple[torch.Tensor, ...]:
        """Tensors the layer holds outside its buffers (the CPU tiles), for memory accounting."""
        return () if self._tiled is None else (self._tiled.weight, self._tiled.zeros, self._tiled.scales)

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        acts = f"a{self.act_bits}" if self.act_bits else "float activations"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"w{self.bits}g{self.group_size} {kind}, {acts}")
