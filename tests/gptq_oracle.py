"""Straightforward pure-torch GPTQ and SparseGPT, written the way the published reference code is: one
column at a time, each step a torch op over all rows, the rank-1 update a matmul. The oracle that
comptrust.compress.hessian.error_feedback (our C++ column loop + BLAS block updates) must reproduce, and the
baseline its speed is measured against (bench/gptq.py). The quantization grid is comptrust's (GPTQ's
min/max grid with the scale rounded to the fp16 it is stored in), so results compare bit for bit.
"""
from __future__ import annotations

import torch

from comptrust.compress.rtn import rtn_grid


def _grid(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scale, zero = rtn_grid(w.unsqueeze(1), bits, symmetric)
    return scale, zero  # [n, 1] each


def _quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0])
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    return torch.linalg.cholesky(H, upper=True)


def gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = 128, symmetric: bool = False,
         act_order: bool = False, static_groups: bool = False, percdamp: float = 0.01, blocksize: int = 128):
    """Returns (Q [n, k] in input order, loss). Mirrors GPTQ's fasterquant."""
    W = W.clone().float()
    H = H.clone()
    columns = W.shape[1]
    maxq = 2**bits - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if group_size == -1:
        scale, zero = _grid(W, bits, symmetric)
    if static_groups:
        groups = [_grid(W[:, i:i + group_size], bits, symmetric) for i in range(0, columns, group_size)]
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
    Losses = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    Hinv = _inverse_cholesky(H, percdamp)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if group_size != -1:
                if not static_groups:
                    if (i1 + i) % group_size == 0:
                        scale, zero = _grid(W[:, (i1 + i):(i1 + i + group_size)], bits, symmetric)
                else:
                    idx = i1 + i
                    if act_order:
                        idx = perm[idx]
                    scale, zero = groups[idx // group_size]
            q = _quantize(w.unsqueeze(1), scale, zero, maxq).flatten()
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if act_order:
        Q = Q[:, invperm]
    return Q, float(Losses.sum())


def sparsegpt(W: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5, prunen: int = 0, prunem: int = 0,
              bits: int = 0, group_size: int = 128, symmetric: bool = False, percdamp: float = 0.01,
              blocksize: int = 128):
    """Returns (Q [n, k], mask, loss). Mirrors SparseGPT's fasterprune; with bits, kept weights are
    quantized on a per-group grid taken as GPTQ takes it (from the block-start weights of the group)."""
    W = W.clone().float()
    H = H.clone()
    rows, columns = W.shape
    maxq = 2**bits - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Losses = torch.zeros(rows)
    Hinv = _inverse_cholesky(H, percdamp)
    mask = torch.zeros_like(W, dtype=torch.bool)
    group_size = columns if group_size == -1 else group_size
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            count_pruned = int(tmp.numel() * sparsity)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            order = torch.sort(tmp.flatten(), stable=True).indices[:count_pruned]
            mask1.view(-1)[order] = True
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                chosen = torch.sort(tmp, dim=1, stable=True).indices[:, :prunen]
                mask1.scatter_(1, i + chosen, True)
            if bits and (i1 + i) % group_size == 0:
                scale, zero = _grid(W[:, (i1 + i):(i1 + i + group_size)], bits, symmetric)
            q = w.clone()
            q[mask1[:, i]] = 0
            if bits:
                q = _quantize(q.unsqueeze(1), scale, zero, maxq).flatten()
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        Losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, mask, float(Losses.sum())


def correlated_inputs(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    """Inputs with the correlated, uneven-scale columns of real activations (GPTQ's gain comes from them)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    scale = torch.exp(torch.randn(k, generator=g))
    return (torch.randn(tokens, k, generator=g) @ mix + 0.3 * torch.randn(tokens, k, generator=g)) * scale


def _spd_inverse_factor(width: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(width, width, generator=g)
    h = a @ a.t() + width * torch.eye(width)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def block_case(n, width, bits, prune_n, prune_m, preset_mask, seed):
    """Random arguments of hessian_block_update: (w, hinv, scales, zeros, col_group, mask)."""
    g = torch.Generator().manual_seed(seed)
    groups = 3
    w = torch.randn(n, width, generator=g)
    hinv = _spd_inverse_factor(width, g)
    scales = torch.rand(n, groups, generator=g) * 0.3 + 0.05
    zeros = torch.randint(1, 2 ** max(bits, 1), (n, groups), generator=g).float()
    col_group = torch.randint(0, groups, (width,), generator=g, dtype=torch.int32)
    mask = (torch.rand(n, width, generator=g) < 0.2) if preset_mask else torch.zeros(n, width, dtype=torch.bool)
    return w, hinv, scales, zeros, col_group, mask
