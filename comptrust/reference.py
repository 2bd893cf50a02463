"""Pure-torch oracles of every compiled op. Slow and simple on purpose: tests compare kernels to these,
and comptrust.ops falls back to them when no compiled backend serves a device."""
from __future__ import annotations

import torch

from comptrust.formats.int3 import Int3Packed, dequantize_int3
from comptrust.formats.int4 import Int4Packed, dequantize_int4
from comptrust.formats.int8 import Int8Packed, dequantize_int8
from comptrust.formats.sparse24 import Sparse24Int4Packed, Sparse24Packed, dequantize_sparse24_int4, unpack_sparse24


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """y = x @ W^T with W the dequantized GPTQ v1 int4 weight; computed in fp32, returned in x's dtype."""
    weight = dequantize_int4(Int4Packed(qweight.cpu(), qzeros.cpu(), scales.cpu(), group_size)).to(x.device)
    return (x.to(torch.float32) @ weight.t()).to(x.dtype)


def int3_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """y = x @ W^T with W the dequantized GPTQ v1 int3 weight; computed in fp32, returned in x's dtype."""
    weight = dequantize_int3(Int3Packed(qweight.cpu(), qzeros.cpu(), scales.cpu(), group_size)).to(x.device)
    return (x.to(torch.float32) @ weight.t()).to(x.dtype)


def int8_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """y = x @ W^T with W the dequantized GPTQ v1 int8 weight; computed in fp32, returned in x's dtype."""
    weight = dequantize_int8(Int8Packed(qweight.cpu(), qzeros.cpu(), scales.cpu(), group_size)).to(x.device)
    return (x.to(torch.float32) @ weight.t()).to(x.dtype)


def sparse24_gemm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """y = x @ W^T with W the dense [n, k] form of a 2:4 weight; computed in fp32, returned in x's dtype."""
    weight = unpack_sparse24(Sparse24Packed(values.cpu(), meta.cpu())).to(device=x.device, dtype=torch.float32)
    return (x.to(torch.float32) @ weight.t()).to(x.dtype)


def sparse24_int4_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                       meta: torch.Tensor, group_size: int) -> torch.Tensor:
    """y = x @ W^T with W the dense form of a 2:4 weight whose kept values are int4; fp32, x's dtype."""
    packed = Sparse24Int4Packed(Int4Packed(qweight.cpu(), qzeros.cpu(), scales.cpu(), group_size), meta.cpu())
    weight = dequantize_sparse24_int4(packed).to(x.device)
    return (x.to(torch.float32) @ weight.t()).to(x.dtype)


def int3_gemm_a8(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """int3_gemm with x first quantized to int8 like int4_gemm_a8."""
    x8, scale, _ = quantize_activations_int8(x.cpu(), group_size)
    return int3_gemm((x8 * scale).to(x.device), qweight, qzeros, scales, group_size).to(x.dtype)


ACT_BLOCK = 32  # inputs per int8 activation scale (see csrc/cpu/int4_gemm_a8_cpu.cpp)


def quantize_activations_int8(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of x [m, k] per row and per block of up to 32 inputs, blocks restarting
    at each weight group. Returns (x8 as float, per-input scale, block id of each input)."""
    k = x.shape[1]
    position = torch.arange(k)
    group = position // group_size
    key = group * (group_size // ACT_BLOCK + 1) + (position - group * group_size) // ACT_BLOCK
    _, block = torch.unique_consecutive(key, return_inverse=True)
    xf = x.to(torch.float32)
    amax = torch.zeros(x.shape[0], int(block.max()) + 1).scatter_reduce(
        1, block.expand_as(xf), xf.abs(), reduce="amax", include_self=True)
    # A true division, as the kernel does: torch computes `127.0 / amax` as 127 * (1 / amax), which rounds
    # differently and would move rounding ties of x * inv to the other integer.
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    x8 = torch.round(xf * inv[:, block])  # round half to even, like the kernel's nearbyint
    return x8, (amax / 127.0)[:, block], block


def sparse24_int4_gemm_a8(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                          meta: torch.Tensor, group_size: int) -> torch.Tensor:
    """sparse24_int4_gemm with x first quantized to int8, its blocks restarting at each group of
    2 * group_size inputs (group_size counts kept values)."""
    x8, scale, _ = quantize_activations_int8(x.cpu(), 2 * group_size)
    return sparse24_int4_gemm((x8 * scale).to(x.device), qweight, qzeros, scales, meta, group_size).to(x.dtype)


def int4_gemm_a8(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """int4_gemm with x first quantized to int8 (w4a8): the product of the dequantized activations."""
    x8, scale, _ = quantize_activations_int8(x.cpu(), group_size)
    return int4_gemm((x8 * scale).to(x.device), qweight, qzeros, scales, group_size).to(x.dtype)


def hessian_block_update(w: torch.Tensor, hinv: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                         col_group: torch.Tensor, bits: int, mask: torch.Tensor, prune_n: int,
                         prune_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ / SparseGPT's column loop over one block, written as the reference implementations write it:
    one column at a time, each step a torch op over all rows. Updates w (to the quantized / pruned values)
    and mask in place; returns (err [n, B], loss [n]). See the op's schema in csrc/ops.cpp."""
    width = w.shape[1]
    maxq = 2**bits - 1
    diag = torch.diagonal(hinv)
    err = torch.empty_like(w)
    losses = torch.zeros_like(w)
    for i in range(width):
        if prune_n and i % prune_m == 0:
            score = w[:, i:i + prune_m] ** 2 / diag[i:i + prune_m] ** 2
            # Smallest scores first, ties to the lower column (stable), as the compiled kernel picks them.
            order = torch.sort(score, dim=1, stable=True).indices
            mask[:, i:i + prune_m].scatter_(1, order[:, :prune_n], True)
        value = w[:, i].clone()
        q = torch.where(mask[:, i], torch.zeros_like(value), value)
        if bits:
            s = scales[:, col_group[i]]
            z = zeros[:, col_group[i]]
            q = s * (torch.clamp(torch.round(q / s) + z, 0, maxq) - z)
        d = hinv[i, i]
        losses[:, i] = (value - q) ** 2 / (d * d)
        e = (value - q) / d
        err[:, i] = e
        w[:, i + 1:] -= e[:, None] * hinv[i, i + 1:][None, :]
        w[:, i] = q
    return err, losses.sum(dim=1) / 2


def residual_rms_norm(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                      eps: float) -> torch.Tensor:
    """hidden += delta in place (when given), then transformers' LlamaRMSNorm of hidden's rows."""
    if delta is not None:
        hidden.add_(delta)
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(hidden.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The Llama MLP's activation: F.silu(gate) * up."""
    return torch.nn.functional.silu(gate) * up


def rotary(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for one tensor: states * cos + rotate_half(states) * sin."""
    half = states.shape[-1] // 2
    return states * cos + torch.cat((-states[..., half:], states[..., :half]), dim=-1) * sin


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
                     value_cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position: int,
                     scale: float) -> torch.Tensor:
    """One token's attention step (schema in csrc/ops.cpp): rotary on q and k, k and v into the caches
    [kv_heads, max_len, head_dim] at `position`, grouped-query attention over positions 0..position."""
    kv_heads, _, head_dim = key_cache.shape[-3:]
    keys, values = key_cache.view(kv_heads, -1, head_dim), value_cache.view(kv_heads, -1, head_dim)
    cos, sin = cos.reshape(head_dim), sin.reshape(head_dim)
    keys[:, position] = rotary(k.reshape(kv_heads, head_dim), cos, sin)
    values[:, position] = v.reshape(kv_heads, head_dim)
    query = rotary(q.reshape(1, -1, 1, head_dim), cos, sin)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, keys[None, :, :position + 1], values[None, :, :position + 1], scale=scale,
        enable_gqa=query.shape[1] != kv_heads)
    return out.reshape(q.shape)
