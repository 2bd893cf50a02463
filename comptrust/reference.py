"""Pure-torch oracles of every compiled op. Slow and simple on purpose: tests compare kernels to these,
and comptrust.ops falls back to them when no compiled backend serves a device."""
from __future__ import annotations

import torch

from comptrust.formats.int4 import Int4Packed, dequantize_int4


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """y = x @ W^T with W the dequantized GPTQ v1 int4 weight; computed in fp32, returned in x's dtype."""
    weight = dequantize_int4(Int4Packed(qweight.cpu(), qzeros.cpu(), scales.cpu(), group_size)).to(x.device)
    return (x.to(torch.float32) @ weight.t()).to(x.dtype)
