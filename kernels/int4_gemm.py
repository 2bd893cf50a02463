"""Triton int4 weight-only GEMM over the GPTQ v1 layout: y[m, n] = x[m, k] @ W^T.

The kernel reads the checkpoint tensors as they are (comptrust/formats/int4.py,
csrc/include/comptrust/int4_layout.h):
  qweight [k/8, n]       int32  input row 8r+i of column j in bits 4i..4i+3 of word (r, j)
  qzeros  [groups, n/8]  int32  zero point of column j in nibble j%8 of word (g, j/8), stored as zero-1
  scales  [groups, n]    fp16   groups = ceil(k / group_size); the last group may be partial
so a GPTQ checkpoint needs no repacking and no second copy of its weights.

On a CUDA device the kernel is JIT-compiled; on CPU it runs only under TRITON_INTERPRET=1 (the tests).
`aot_compile_ptx` compiles it to PTX without any GPU, which is the compile check CI can afford.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

if __package__:  # imported as comptrust.kernels.int4_gemm
    from . import _quant_gemm
else:  # loaded by file path, as scripts/compile_check_triton.py does from a bare source checkout
    import importlib.util
    from pathlib import Path

    _spec = importlib.util.spec_from_file_location("_quant_gemm", Path(__file__).with_name("_quant_gemm.py"))
    _quant_gemm = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_quant_gemm)


@triton.jit
def int4_gemm_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, y_ptr,
    m, n, k, group_size,
    stride_xm, stride_xk, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    # True when every BLOCK_K slice of the input dim lies inside one quantization group (BLOCK_K divides
    # group_size, or there is a single group): then a tile needs one row of scales/zeros instead of a
    # per-row gather, which is the common w4g128 / per-channel case.
    EVEN_GROUPS: tl.constexpr,
    # "ieee" keeps fp32 activations exact like torch's default matmul; "tf32" trades that for tensor cores.
    # Ignored for fp16/bf16 inputs.
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kb = tl.arange(0, BLOCK_K)
    mask_m = offs_m < m
    mask_n = offs_n < n

    # int64 row offsets: m * k alone can pass 2^31 for long prompts on wide layers.
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    zero_words_per_row = n // 8
    zero_word = offs_n // 8
    zero_shift = (offs_n % 8) * 4

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        offs_k = k0 + offs_kb
        # k is a multiple of 8 (checked by the wrapper), so masking whole input rows is enough.
        mask_k = offs_k < k
        a = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)

        # Each word is loaded once per nibble (8 adjacent rows hit the same address, so the repeats are
        # served by L1) and the nibble picked by shifting: this keeps the unpacked tile in the
        # [BLOCK_K, BLOCK_N] shape tl.dot wants without cross-lane shuffles. The arithmetic shift of a
        # negative word is harmless because the & 0xF drops the sign-extended bits.
        wk_mask = mask_k[:, None] & mask_n[None, :]
        words = tl.load(qweight_ptr + (offs_k // 8)[:, None] * n + offs_n[None, :], mask=wk_mask, other=0)
        q = (words >> ((offs_k % 8) * 4)[:, None]) & 0xF

        if EVEN_GROUPS:
            g = k0 // group_size
            s = tl.load(scales_ptr + g * n + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            zw = tl.load(qzeros_ptr + g * zero_words_per_row + zero_word, mask=mask_n, other=0)
            z = ((zw >> zero_shift) & 0xF) + 1  # v1 stores zero-1
            w = (q - z[None, :]).to(tl.float32) * s[None, :]
        else:
            # group_size smaller than, or not a multiple of, BLOCK_K: every input row picks its group.
            g = offs_k // group_size
            s = tl.load(scales_ptr + g[:, None] * n + offs_n[None, :], mask=wk_mask, other=0.0).to(tl.float32)
            zw = tl.load(qzeros_ptr + g[:, None] * zero_words_per_row + zero_word[None, :], mask=wk_mask, other=0)
            z = ((zw >> zero_shift[None, :]) & 0xF) + 1
            w = (q - z).to(tl.float32) * s
        # Rows past k hold (0 - z) * s in w, but the matching columns of `a` are 0, so they add nothing.
        # Dequantizing in fp32 and rounding once to the activation dtype matches the reference's weight
        # to within one rounding of the product.
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)

    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _pick_block_k(k: int, group_size: int) -> int:
    """The widest BLOCK_K (<= 64) that keeps each k-tile inside one group. tl.dot needs K >= 16, so a group
    size with no power-of-two divisor >= 16 (e.g. 8 or 24) takes the per-row gather path at 32."""
    if group_size >= k:
        return max(16, min(64, _quant_gemm.next_pow2(k)))
    for bk in (64, 32, 16):
        if group_size % bk == 0:
            return bk
    return 32


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              group_size: int, *, block_m: int | None = None, block_n: int | None = None,
              block_k: int | None = None, num_warps: int = _quant_gemm.DEFAULT_NUM_WARPS) -> torch.Tensor:
    """y = x @ W^T for W in the GPTQ v1 int4 layout; y has x's dtype. Block sizes default to a heuristic."""
    from comptrust.ops import _check_int4_gemm_args  # lazily, so comptrust.ops may import this module

    _check_int4_gemm_args(x, qweight, qzeros, scales, group_size)
    return _quant_gemm.launch(int4_gemm_kernel, "int4_gemm", _pick_block_k, x, qweight, qzeros, scales,
                              group_size, block_m, block_n, block_k, num_warps)


# Variants scripts/compile_check_triton.py compiles: constexpr branches are only type-checked and lowered
# when taken, so each EVEN_GROUPS path and each activation dtype needs its own compile to be checked.
AOT_CONFIGS = (
    {"dtype": "fp16", "even_groups": True},
    {"dtype": "fp16", "even_groups": False, "block_k": 32},
    {"dtype": "bf16", "even_groups": True},
    {"dtype": "fp32", "even_groups": True, "block_m": 32},
)


def aot_compile_ptx(arch: int = 80, **config) -> str:
    """PTX of int4_gemm_kernel for sm_<arch> (see _quant_gemm.aot_compile_ptx for the config keys)."""
    return _quant_gemm.aot_compile_ptx(int4_gemm_kernel, arch, **config)
