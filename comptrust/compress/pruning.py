"""What pruning methods share: the sparsity patterns, choosing weights by score, and the module a pruned
weight becomes.

Patterns: "2:4" runs on the 2:4 sparse kernels (Sparse24Linear, or Sparse24Int4Linear with int4 kept
values); "4:8" and unstructured ("50%", any rate) run on the bitmap kernel (BitmapSparseLinear: kept values and a
bit per weight) where it beats dense here (fp32, AVX-512, at least 25% pruned: bitmap_unsuited), and otherwise stay
nn.Linear with zeros in it, so the report's bytes and speed are the dense model's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from comptrust.nn.bitmap_sparse_linear import BitmapSparseLinear, bitmap_unsuited
from comptrust.nn.sparse24_linear import Sparse24Int4Linear, Sparse24Linear

_NM = re.compile(r"(?P<n>\d+):(?P<m>\d+)")


@dataclass(frozen=True)
class SparsityPattern:
    """N:M (prune_n of every prune_m consecutive inputs) or unstructured (`sparsity` of each layer)."""
    prune_n: int = 0
    prune_m: int = 0
    sparsity: float = 0.0

    @classmethod
    def parse(cls, pattern: str, sparsity: float = 0.5) -> "SparsityPattern":
        """'2:4' / '4:8' (N kept of M: prune M - N) or 'unstructured' with `sparsity`."""
        if pattern == "unstructured":
            if not 0.0 < sparsity < 1.0:
                raise ValueError(f"unstructured sparsity={sparsity} must be in (0, 1)")
            return cls(sparsity=sparsity)
        match = _NM.fullmatch(pattern)
        if not match or not 0 < int(match["n"]) < int(match["m"]):
            raise ValueError(f"sparsity pattern {pattern!r} must be 'N:M' with 0 < N < M (e.g. 2:4, 4:8) or "
                             "'unstructured'")
        kept, group = int(match["n"]), int(match["m"])
        return cls(prune_n=group - kept, prune_m=group)

    @property
    def is_24(self) -> bool:
        return (self.prune_n, self.prune_m) == (2, 4)

    def name(self) -> str:
        if self.prune_m:
            return f"{self.prune_m - self.prune_n}:{self.prune_m}"
        return f"{self.sparsity:.0%} unstructured"


def pattern_tag(pattern: str, sparsity: float) -> str:
    """The pattern's part of a tag: '24', '48', or the unstructured percentage ('50')."""
    return pattern.replace(":", "") if pattern != "unstructured" else f"{round(sparsity * 100)}"


def quant_tag(bits: int | None, group_size: int, symmetric: bool, act_bits: int | None) -> str:
    """'-w4g64' (+ '-sym', '-a8') for int4 kept values; '' for float ones."""
    if not bits:
        return ""
    return f"-w4g{group_size}" + ("-sym" if symmetric else "") + ("-a8" if act_bits else "")


def prune_by_score(weight: torch.Tensor, score: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Zero the lowest-scoring weights: per group of M inputs (N:M), or the `sparsity` share of each row
    (unstructured, Wanda's per-output comparison group). Ties go to the lower input index."""
    n, k = weight.shape
    if pattern.prune_m:
        if k % pattern.prune_m:
            raise ValueError(f"{pattern.name()} pruning needs in_features={k} divisible by {pattern.prune_m}")
        grouped = score.reshape(n, k // pattern.prune_m, pattern.prune_m)
        order = torch.sort(grouped, dim=-1, stable=True).indices[..., :pattern.prune_n]
        mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, order, True).reshape(n, k)
    else:
        count = int(k * pattern.sparsity)
        order = torch.sort(score, dim=1, stable=True).indices[:, :count]
        mask = torch.zeros_like(score, dtype=torch.bool).scatter_(1, order, True)
    return weight.masked_fill(mask, 0)


def check_act_bits(owner: str, act_bits: int | None, bits: int | None) -> None:
    """act_bits=8 (int8 activations) needs int4 kept values."""
    if act_bits not in (None, 8):
        raise ValueError(f"{owner}: act_bits={act_bits} must be None (float activations) or 8")
    if act_bits and bits != 4:
        raise ValueError(f"{owner}: act_bits=8 needs int4 values (bits=4)")


def pruned_linear(name: str, linear: nn.Linear, weight: torch.Tensor, pattern: SparsityPattern,
                  bits: int | None = None, group_size: int = 64, symmetric: bool = False,
                  act_bits: int | None = None) -> nn.Module:
    """The module a pruned weight runs as: 2:4 on the sparse kernels (int4 kept values with bits=4,
    RTN-quantized in groups of group_size kept values; act_bits=8 runs them on int8 activations), other
    patterns as a BitmapSparseLinear where that is faster here, else a dense nn.Linear."""
    weight = weight.to(linear.weight.dtype)
    if pattern.is_24:
        if bits == 4:
            return Sparse24Int4Linear.from_weight(weight, group_size, linear.bias, symmetric, name, act_bits)
        return Sparse24Linear.from_weight(weight, linear.bias, name=name)
    if bitmap_unsuited(weight) is None:
        return BitmapSparseLinear.from_weight(weight, linear.bias)
    dense = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                      dtype=linear.weight.dtype, device=linear.weight.device)
    dense.weight.data.copy_(weight)
    if linear.bias is not None:
        dense.bias.data.copy_(linear.bias)
    return dense


def why_ineligible(name: str, linear: nn.Linear, pattern: SparsityPattern, bits: int | None) -> str | None:
    if pattern.is_24:
        return (Sparse24Int4Linear if bits == 4 else Sparse24Linear).why_ineligible(name, linear)
    if pattern.prune_m and linear.in_features % pattern.prune_m:
        return f"{pattern.name()} needs in_features divisible by {pattern.prune_m}, got {linear.in_features}"
    return None
