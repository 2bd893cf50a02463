"""Triton version of GPTQ / SparseGPT's column loop over one block (the op torch.ops.comptrust.
hessian_block_update; semantics in csrc/ops.cpp, pure-torch reference in comptrust.reference).

Rows are independent inside a block, so each program owns BLOCK_N rows and keeps their whole block
[BLOCK_N, BLOCK_W] in registers: per column it extracts the column, prunes / quantizes it, and subtracts
e * Hinv[i, j] from the later columns. Hinv rows are read from L2 (the block's Hinv is 64 KiB at 128).
Rounding is half-to-even like torch.round, built from floor so the interpreter and the GPU agree.

On a CUDA device the kernel is JIT-compiled; on CPU it runs only under TRITON_INTERPRET=1 (the tests).
`aot_compile_ptx` compiles it to PTX without any GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

if __package__:  # imported as comptrust.kernels.hessian_update
    from . import _quant_gemm
else:  # loaded by file path, as scripts/compile_check_triton.py does from a bare source checkout
    import importlib.util
    from pathlib import Path

    _spec = importlib.util.spec_from_file_location("_quant_gemm", Path(__file__).with_name("_quant_gemm.py"))
    _quant_gemm = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_quant_gemm)

BLOCK_N = 16


@triton.jit
def _round_half_even(x):
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5  # exact: r and x are within 1 of each other
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def hessian_block_update_kernel(w_ptr, hinv_ptr, scales_ptr, zeros_ptr, col_group_ptr, mask_ptr, err_ptr, loss_ptr,
                                n, width, groups_per_row, maxq,
                                QUANTIZE: tl.constexpr, PRUNE_N: tl.constexpr, PRUNE_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_W)
    row_ok = rows < n
    col_ok = cols < width
    tile_ok = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None] * width + cols[None, :]
    w = tl.load(w_ptr + offsets, mask=tile_ok, other=0.0)
    pruned = tl.load(mask_ptr + offsets, mask=tile_ok, other=0) != 0
    err = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
    diag = tl.load(hinv_ptr + cols * width + cols, mask=col_ok, other=1.0)
    loss = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(0, width):
        is_i = (cols == i)[None, :]
        if PRUNE_N > 0:
            if i % PRUNE_M == 0:
                in_group = ((cols >= i) & (cols < i + PRUNE_M))[None, :]
                score = (w * w) / (diag * diag)[None, :]
                for _ in tl.static_range(PRUNE_N):  # the smallest unpruned score, ties to the lower column
                    candidate = tl.where(in_group & (pruned == 0), score, float("inf"))
                    best = tl.argmin(candidate, axis=1, tie_break_left=True)
                    pruned = pruned | (cols[None, :] == best[:, None])
        value = tl.sum(tl.where(is_i, w, 0.0), axis=1)
        q = tl.where(tl.sum(tl.where(is_i & pruned, 1, 0), axis=1) > 0, 0.0, value)
        if QUANTIZE:
            group = tl.load(col_group_ptr + i)
            s = tl.load(scales_ptr + rows * groups_per_row + group, mask=row_ok, other=1.0)
            z = tl.load(zeros_ptr + rows * groups_per_row + group, mask=row_ok, other=0.0)
            code = tl.minimum(tl.maximum(_round_half_even(q / s) + z, 0.0), maxq)
            q = s * (code - z)
        d = tl.load(hinv_ptr + i * width + i)
        diff = value - q
        loss += (diff * diff) / (d * d)
        e = diff / d
        h = tl.load(hinv_ptr + i * width + cols, mask=col_ok & (cols > i), other=0.0)
        w = w - e[:, None] * h[None, :]  # columns <= i subtract an exact 0
        w = tl.where(is_i, q[:, None], w)
        err = tl.where(is_i, e[:, None], err)
    tl.store(w_ptr + offsets, w, mask=tile_ok)
    tl.store(err_ptr + offsets, err, mask=tile_ok)
    tl.store(mask_ptr + offsets, pruned.to(tl.int8), mask=tile_ok)
    tl.store(loss_ptr + rows, loss / 2.0, mask=row_ok)


def hessian_block_update(w: torch.Tensor, hinv: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                         col_group: torch.Tensor, bits: int, mask: torch.Tensor, prune_n: int,
                         prune_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The op on a CUDA device (or on CPU under TRITON_INTERPRET=1). w [n, B] float32 and mask [n, B] bool
    (both contiguous) are updated in place; returns (err [n, B], loss [n])."""
    n, width = w.shape
    if w.dtype != torch.float32 or not w.is_contiguous() or hinv.shape != (width, width):
        raise ValueError(f"hessian_block_update: w must be contiguous float32 [n, B] and hinv [B, B], got w "
                         f"{w.dtype} {tuple(w.shape)}, hinv {tuple(hinv.shape)}")
    if mask.shape != w.shape or mask.dtype != torch.bool or not mask.is_contiguous():
        raise ValueError(f"hessian_block_update: mask must be a contiguous bool tensor shaped like w {tuple(w.shape)}")
    if prune_n and (prune_m <= prune_n or width % prune_m):
        raise ValueError(f"hessian_block_update: {prune_n}:{prune_m} pruning needs N < M and B={width} divisible by M")
    err = torch.empty_like(w)
    loss = torch.empty(n, dtype=torch.float32, device=w.device)
    if n == 0 or width == 0:
        return err, loss.zero_()
    mask_bytes = mask.view(torch.int8)  # the kernel writes bytes 0/1 in place
    scales = scales.contiguous().float() if bits else w.new_ones(1)
    zeros = zeros.contiguous().float() if bits else w.new_zeros(1)
    col_group = col_group.to(torch.int32).contiguous() if bits else torch.zeros(1, dtype=torch.int32, device=w.device)
    hessian_block_update_kernel[(triton.cdiv(n, BLOCK_N),)](
        w, hinv.contiguous(), scales, zeros, col_group, mask_bytes, err, loss, n, width,
        scales.shape[1] if bits else 1, float(2**bits - 1) if bits else 0.0,
        QUANTIZE=bits > 0, PRUNE_N=prune_n, PRUNE_M=max(prune_m, 1), BLOCK_N=BLOCK_N,
        BLOCK_W=triton.next_power_of_2(width))
    return err, loss


AOT_CONFIGS = ({"quantize": True, "prune_n": 0, "prune_m": 1}, {"quantize": False, "prune_n": 2, "prune_m": 4},
               {"quantize": True, "prune_n": 2, "prune_m": 4})


def aot_compile_ptx(arch: int = 80, *, quantize: bool = True, prune_n: int = 0, prune_m: int = 1,
                    block_w: int = 128, num_warps: int = 4) -> str:
    """PTX of the kernel for sm_<arch> at block width `block_w`, with or without quantization and pruning."""
    signature = {"w_ptr": "*fp32", "hinv_ptr": "*fp32", "scales_ptr": "*fp32", "zeros_ptr": "*fp32",
                 "col_group_ptr": "*i32", "mask_ptr": "*i8", "err_ptr": "*fp32", "loss_ptr": "*fp32", "n": "i32",
                 "width": "i32", "groups_per_row": "i32", "maxq": "fp32", "QUANTIZE": "constexpr",
                 "PRUNE_N": "constexpr", "PRUNE_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_W": "constexpr"}
    constexprs = {"QUANTIZE": quantize, "PRUNE_N": prune_n, "PRUNE_M": prune_m, "BLOCK_N": BLOCK_N,
                  "BLOCK_W": block_w}
    aligned = [name for name in signature if name.endswith("_ptr")]
    return _quant_gemm.compile_ptx(hessian_block_update_kernel, arch, signature, constexprs, aligned, num_warps, 1)
