"""QuantLinear: an nn.Linear replacement holding int4 weights in the GPTQ v1 layout and running on
comptrust's packed int4 kernels (comptrust.ops.int4_gemm), never on a dequantized dense copy."""
from __future__ import annotations

import torch
import torch.nn as nn

from comptrust import ops
from comptrust.formats.int4 import INT4_PER_WORD, Int4Packed, check_int4_shapes, num_groups


class QuantLinear(nn.Module):
    bits = 4

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False,
                 symmetric: bool = False, act_bits: int | None = None):
        super().__init__()
        check_int4_shapes(in_features, out_features, group_size)
        if act_bits not in (None, 8):
            raise ValueError(f"QuantLinear: act_bits={act_bits} must be None (float activations) or 8")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.symmetric, self.act_bits = symmetric, act_bits
        groups = num_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(in_features // INT4_PER_WORD, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // INT4_PER_WORD, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @staticmethod
    def why_ineligible(name: str, linear: nn.Linear) -> str | None:
        """None if this nn.Linear can be stored as int4, else the reason it stays dense."""
        if linear.in_features % INT4_PER_WORD or linear.out_features % INT4_PER_WORD:
            return (f"int4 needs in/out features divisible by 8, got in={linear.in_features}, "
                    f"out={linear.out_features}")
        return None

    @classmethod
    def from_packed(cls, packed: Int4Packed, bias: torch.Tensor | None = None, symmetric: bool = False,
                    act_bits: int | None = None) -> "QuantLinear":
        layer = cls(packed.in_features, packed.out_features, packed.group_size, bias is not None, symmetric, act_bits)
        for name in ("qweight", "qzeros", "scales"):
            expected = getattr(layer, name)
            got = getattr(packed, name)
            if got.shape != expected.shape or got.dtype != expected.dtype:
                raise ValueError(f"QuantLinear: {name} is {tuple(got.shape)} {got.dtype}, expected "
                                 f"{tuple(expected.shape)} {expected.dtype}")
            setattr(layer, name, got.contiguous())
        if bias is not None:
            layer.bias = bias.detach().to(torch.float32).clone()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, symmetric: bool = False,
                    act_bits: int | None = None) -> "QuantLinear":
        """Round-to-nearest quantization of a dense layer."""
        from comptrust.compress.rtn import quantize_int4_rtn  # compress depends on nn, not the reverse

        packed = quantize_int4_rtn(linear.weight, group_size, symmetric)
        return cls.from_packed(packed, linear.bias, symmetric, act_bits)

    def packed(self) -> Int4Packed:
        return Int4Packed(self.qweight, self.qzeros, self.scales, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear: input has {x.shape[-1]} features, layer expects {self.in_features}")
        gemm = ops.int4_gemm_a8 if self.act_bits == 8 else ops.int4_gemm
        y = gemm(x.reshape(-1, self.in_features), self.qweight, self.qzeros, self.scales, self.group_size)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        acts = f"a{self.act_bits}" if self.act_bits else "float activations"
        return f"in_features={self.in_features}, out_features={self.out_features}, w4g{self.group_size} {kind}, {acts}"
