"""BitmapSparseLinear: an nn.Linear replacement for an unstructured-pruned fp32 weight, held and run in the bitmap
layout (comptrust.formats.bitmap_sparse: kept values + one bit per weight) on the CPU kernel
(csrc/cpu/bitmap_sparse_cpu.cpp), never as a dense copy.

Its checkpoint form stays the dense one: state_dict() holds `weight` (rebuilt bit-exactly, zeros included) and
`bias` as nn.Linear's does, so a saved pruned model is an ordinary safetensors model any loader reads, and loading a
state dict packs the weight again.

A pruned layer becomes one only where it is faster than the dense layer it replaces (bitmap_unsuited says why not):
fp32 weights, the AVX-512 kernel (the AVX2 one ran at 0.48-0.74x of the dense AVX2 rows at one row), and at least
MIN_SPARSITY of the weights pruned. Measured cold at 4096 x 4096, batch 1, against the same loop on the dense
weight: 50% pruned 1.62x, 30% 1.29x, 20% 1.14x, 10% 1.02x (bytes: 4 x density + 1/8 per weight).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from comptrust import ops
from comptrust.formats.bitmap_sparse import BitmapPacked, check_bitmap, kept_mask, pack_bitmap, unpack_bitmap

MIN_SPARSITY = 0.25


def bitmap_unsuited(weight: torch.Tensor) -> str | None:
    """None where a pruned weight [n, k] runs faster as a BitmapSparseLinear here than as nn.Linear, else why not."""
    if weight.dtype != torch.float32:
        return f"bitmap sparse layers hold float32 weights, this one is {weight.dtype}"
    if weight.device.type != "cpu" or ops.cpu_isa() != "avx512":
        return f"the bitmap kernel beats dense only on a CPU with AVX-512 (here: {weight.device.type}, " \
               f"{ops.cpu_isa() or 'no compiled kernels'})"
    sparsity = 1.0 - float(kept_mask(weight.detach()).float().mean())
    if sparsity < MIN_SPARSITY:
        return f"{sparsity:.0%} of the weights pruned, below the {MIN_SPARSITY:.0%} where the bitmap kernel wins"
    return None


class BitmapSparseLinear(nn.Module):
    def __init__(self, packed: BitmapPacked, bias: torch.Tensor | None = None):
        super().__init__()
        check_bitmap(packed)
        self.in_features, self.out_features = packed.in_features, packed.out_features
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"BitmapSparseLinear: bias is {tuple(bias.shape)}, expected ({self.out_features},)")
        # Not in state_dict: the checkpoint holds the dense `weight` (_save_to_state_dict).
        self.register_buffer("values", packed.values, persistent=False)
        self.register_buffer("mask", packed.mask, persistent=False)
        self.register_buffer("row_start", packed.row_start, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "BitmapSparseLinear":
        return cls(pack_bitmap(weight), bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "BitmapSparseLinear":
        return cls.from_weight(linear.weight, linear.bias)

    def packed(self) -> BitmapPacked:
        return BitmapPacked(self.values, self.mask, self.row_start, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        return unpack_bitmap(self.packed())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.values.numel() / (self.in_features * self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.bitmap_sparse_gemm(x, self.packed())
        bias = self._buffers["bias"]
        return y if bias is None else y + bias.to(y.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        weight = state_dict[key]
        if tuple(weight.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {key}: {tuple(weight.shape)} in the checkpoint, "
                              f"({self.out_features}, {self.in_features}) in BitmapSparseLinear")
            return
        packed = pack_bitmap(weight.to(device=self.values.device, dtype=torch.float32))
        self.values, self.mask, self.row_start = packed.values, packed.mask, packed.row_start
        if self.bias is not None:
            bias_key = prefix + "bias"
            if bias_key in state_dict:
                self.bias = state_dict[bias_key].detach().to(self.bias).clone()
            else:
                missing_keys.append(bias_key)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.sparsity:.0%} sparse (bitmap)")
