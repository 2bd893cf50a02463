"""Act-order (desc_act) GPTQ checkpoints, turned once at load into plain grouped layers.

GPTQ with act-order quantizes input rows in order of decreasing Hessian diagonal and gives row i the
group g_idx[i] of the position it was quantized at, so the rows of one group are scattered over k.
Sorting the rows by g_idx (stably) makes every group contiguous again; the layer then computes
    y = x @ W^T = x[:, perm] @ W[:, perm]^T
with W[:, perm] an ordinary grouped weight that the fast kernels run, and only the activations gathered.
Zero points and scales are per group, so they do not move.
"""
from __future__ import annotations

import torch


def _effective_group_size(group_size: int, in_features: int) -> int:
    return in_features if group_size == -1 else group_size


def trivial_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """g_idx of a checkpoint without act-order: row i is in group i // group_size (int32, as GPTQ saves it)."""
    g = _effective_group_size(group_size, in_features)
    return (torch.arange(in_features, dtype=torch.int32) // g).to(torch.int32)


def g_idx_is_trivial(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when g_idx puts row i in group i // group_size (group_size -1: all rows in group 0)."""
    return torch.equal(g_idx.to(torch.int64), trivial_g_idx(g_idx.numel(), group_size).to(torch.int64))


def act_order_permutation(g_idx: torch.Tensor) -> torch.Tensor:
    """The permutation perm (int64) of input rows with g_idx[perm] sorted; rows of one group keep their order."""
    if g_idx.dim() != 1:
        raise ValueError(f"g_idx must be 1-D [k], got shape {list(g_idx.shape)}")
    return torch.sort(g_idx.to(torch.int64), stable=True).indices


def check_act_order_groups(g_idx: torch.Tensor, group_size: int, name: str = "g_idx") -> None:
    """Raise ValueError unless every group holds exactly group_size rows (the last may hold the rest).

    That is what GPTQ's act-order produces; anything else would leave groups of unequal size after
    sorting, which the grouped kernels (one zero/scale per group_size rows) cannot run.
    """
    k = g_idx.numel()
    g = _effective_group_size(group_size, k)
    groups = -(-k // g)
    g64 = g_idx.to(torch.int64)
    if k and (g64.min() < 0 or g64.max() >= groups):
        raise ValueError(
            f"{name}: values must lie in 0..{groups - 1} (k={k}, group_size={group_size}), "
            f"got {g64.min().item()}..{g64.max().item()}"
        )
    counts = torch.bincount(g64, minlength=groups)
    expected = torch.full((groups,), g, dtype=counts.dtype)
    expected[-1] = k - (groups - 1) * g
    bad = (counts != expected).nonzero().flatten()
    if bad.numel():
        j = bad[0].item()
        raise ValueError(
            f"{name}: group {j} has {counts[j].item()} rows, expected {expected[j].item()} "
            f"(k={k}, group_size={group_size}; {bad.numel()} of {groups} groups have the wrong size), "
            "so sorting by g_idx does not give equal contiguous groups"
        )


def apply_act_order(codes: torch.Tensor, g_idx: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpacked codes [n, k] of an act-order layer -> (codes[:, perm] as a plain grouped weight, perm).

    Run the result on x[:, perm]. Checks the group sizes first (see check_act_order_groups).
    """
    if codes.dim() != 2 or codes.shape[1] != g_idx.numel():
        raise ValueError(f"codes {list(codes.shape)} must be [n, k] with k = len(g_idx) = {g_idx.numel()}")
    check_act_order_groups(g_idx, group_size)
    perm = act_order_permutation(g_idx)
    return codes[:, perm].contiguous(), perm


def undo_act_order(codes: torch.Tensor, perm: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of apply_act_order: permuted codes [n, k] and perm -> (codes in checkpoint row order, g_idx int32)."""
    k = codes.shape[1]
    if perm.shape != (k,) or not torch.equal(torch.sort(perm.to(torch.int64)).values, torch.arange(k)):
        raise ValueError(f"perm (shape {list(perm.shape)}) must be a permutation of 0..{k - 1} (k={k})")
    original = torch.empty_like(codes)
    original[:, perm] = codes
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = trivial_g_idx(k, group_size)
    return original, g_idx
