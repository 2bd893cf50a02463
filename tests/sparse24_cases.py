"""Shared test inputs for the 2:4 sparse kernels (CPU, Triton and CUDA): random_* prune real-valued weights
(some groups keep fewer than 2 nonzeros), uniform_* draw every kept-pair pattern, int4 code and zero point."""
from __future__ import annotations

import torch

from quant_cases import random_int4
from comptrust.formats.sparse24 import (
    Sparse24Int4Packed,
    Sparse24Packed,
    pack_sparse24,
    pack_sparse24_int4,
    prune_magnitude_24,
)


def random_24_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """A seeded randn [n, k] weight, magnitude-pruned to 2:4, with ~1/5 of the kept entries zeroed too, so
    some groups keep fewer than 2 nonzeros and the packer tops them up with zero positions (the kernels must
    not special-case those)."""
    g = torch.Generator().manual_seed(seed)
    pruned = prune_magnitude_24(torch.randn(n, k, generator=g))
    return torch.where(torch.rand(n, k, generator=g) > 0.2, pruned, torch.zeros(()))


def random_sparse24(n: int, k: int, seed: int, dtype: torch.dtype = torch.float32) -> Sparse24Packed:
    return pack_sparse24(random_24_weight(n, k, seed).to(dtype))


def random_sparse24_int4(n: int, k: int, group_size: int, seed: int) -> Sparse24Int4Packed:
    """group_size counts kept values; -1 is one group per row (k/2)."""
    return pack_sparse24_int4(random_24_weight(n, k, seed), group_size)


# 2:4: the 6 valid metadata nibbles (idx0 < idx1), drawn uniformly so every kept-pair pattern occurs.
VALID_24_NIBBLES = torch.tensor([i0 | (i1 << 2) for i0 in range(4) for i1 in range(i0 + 1, 4)])


def random_meta24(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    nibbles = VALID_24_NIBBLES[torch.randint(0, 6, (n, k // 4), generator=g)]
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)


def uniform_sparse24(n: int, k: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Sparse24Packed:
    """A random 2:4 weight in the storage layout: normal kept values, every kept-pair pattern."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, k // 2, generator=g).to(dtype)
    return Sparse24Packed(values, random_meta24(n, k, g))


def uniform_sparse24_int4(n: int, k: int, group_size: int, seed: int = 0) -> Sparse24Int4Packed:
    """A random 2:4 weight with int4 kept values: every code, zero point and kept-pair pattern."""
    qvalues = random_int4(n, k // 2, group_size, seed)[0]
    return Sparse24Int4Packed(qvalues, random_meta24(n, k, torch.Generator().manual_seed(seed + 7)))


def int4_args(p: Sparse24Int4Packed) -> tuple:
    """(qweight, qzeros, scales, meta, group_size): the trailing arguments of sparse24_int4_gemm."""
    q = p.qvalues
    return q.qweight, q.qzeros, q.scales, p.meta, q.group_size


def errors(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(||y - ref|| / ||ref||, max |y - ref| / max |ref|), in float64."""
    y, ref = y.detach().cpu().double(), ref.detach().cpu().double()
    rel = ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    worst = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    return rel, worst
