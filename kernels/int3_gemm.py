"""Triton int3 weight-only GEMM over the GPTQ v1 int3 layout: y[m, n] = x[m, k] @ W^T.

The kernel reads the checkpoint tensors as they are (comptrust/formats/int3.py,
csrc/include/comptrust/int3_layout.h):
  qweight [k/32*3, n]       int32  input rows 32b..32b+31 of column j in words 3b..3b+2 of column j
  qzeros  [groups, n/32*3]  int32  zero points of columns 32c..32c+31 in words 3c..3c+2, stored as zero-1
  scales  [groups, n]       fp16   groups = ceil(k / group_size); the last group may be partial
Inside a block the three words form one little-endian 96-bit integer with value i at bits 3i..3i+2, so
value i starts in word 3i // 32 at bit 3i % 32; values 10 and 21 (bit offsets 30 and 31) spill into the
next word. k, n and group_size are multiples of 32, so a block never straddles a group.

On a CUDA device the kernel is JIT-compiled; on CPU it runs only under TRITON_INTERPRET=1 (the tests).
`aot_compile_ptx` compiles it to PTX without any GPU, which is the compile check CI can afford.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

if __package__:  # imported as comptrust.kernels.int3_gemm
    from . import _quant_gemm
else:  # loaded by file path, as scripts/compile_check_triton.py does from a bare source checkout
    import importlib.util
    from pathlib import Path

    _spec = importlib.util.spec_from_file_location("_quant_gemm", Path(__file__).with_name("_quant_gemm.py"))
    _quant_gemm = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_quant_gemm)

_BLOCK = 32  # values per 3-word block, and the granularity of k, n and group_size
_WORDS = 3


@triton.jit
def _int3_field(lo, hi, shift):
    """The 3-bit field at bit `shift` (0..31) of the 64-bit integer hi:lo, for int32 words.

    The words are reinterpreted as unsigned so `>>` is a logical shift: an arithmetic one would copy the
    sign of a negative word into the bits a straddling field takes from `hi`. Callers pass hi = 0 unless
    the field straddles (shift > 29); the `& 31` keeps the unused shift amount in range (32 is undefined).
    """
    lo = lo.to(tl.uint32, bitcast=True)
    hi = hi.to(tl.uint32, bitcast=True)
    shift = shift.to(tl.uint32)
    return (((lo >> shift) | (hi << ((32 - shift) & 31))) & 7).to(tl.int32)


@triton.jit
def int3_gemm_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, y_ptr,
    m, n, k, group_size,
    stride_xm, stride_xk, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    # True when every BLOCK_K slice of the input dim lies inside one quantization group (BLOCK_K divides
    # group_size, or there is a single group): then a tile needs one row of scales/zeros instead of a
    # per-row gather. The wrapper's own block choice always gets this path (group sizes are multiples of 32).
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

    # Where each column's zero point lies in a qzeros row: fixed for the whole k loop.
    zero_words_per_row = n // 32 * 3
    zero_bit = (offs_n % 32) * 3
    zero_word = (offs_n // 32) * 3 + zero_bit // 32
    zero_shift = zero_bit % 32
    zero_straddles = zero_shift > 29

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        offs_k = k0 + offs_kb
        # k is a multiple of 32 (checked by the wrapper), so masking whole input rows is enough.
        mask_k = offs_k < k
        a = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)

        # Each input row loads the word its field starts in, and the next word only where the field
        # straddles (2 rows of 32); the 32 rows of a block hit the same 3 addresses, so the repeats are
        # served by L1. This keeps the unpacked tile in the [BLOCK_K, BLOCK_N] shape tl.dot wants
        # without cross-lane shuffles.
        bit = (offs_k % 32) * 3
        word_row = (offs_k // 32) * 3 + bit // 32
        shift = bit % 32
        wk_mask = mask_k[:, None] & mask_n[None, :]
        w_ptrs = qweight_ptr + word_row[:, None] * n + offs_n[None, :]
        lo = tl.load(w_ptrs, mask=wk_mask, other=0)
        hi = tl.load(w_ptrs + n, mask=wk_mask & (shift > 29)[:, None], other=0)
        q = _int3_field(lo, hi, shift[:, None])

        if EVEN_GROUPS:
            g = k0 // group_size
            s = tl.load(scales_ptr + g * n + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z_ptrs = qzeros_ptr + g * zero_words_per_row + zero_word
            z_lo = tl.load(z_ptrs, mask=mask_n, other=0)
            z_hi = tl.load(z_ptrs + 1, mask=mask_n & zero_straddles, other=0)
            z = _int3_field(z_lo, z_hi, zero_shift) + 1  # v1 stores zero-1
            w = (q - z[None, :]).to(tl.float32) * s[None, :]
        else:
            # BLOCK_K wider than the group (only with an explicit block_k): every input row picks its group.
            g = offs_k // group_size
            s = tl.load(scales_ptr + g[:, None] * n + offs_n[None, :], mask=wk_mask, other=0.0).to(tl.float32)
            z_ptrs = qzeros_ptr + g[:, None] * zero_words_per_row + zero_word[None, :]
            z_lo = tl.load(z_ptrs, mask=wk_mask, other=0)
            z_hi = tl.load(z_ptrs + 1, mask=wk_mask & zero_straddles[None, :], other=0)
            z = _int3_field(z_lo, z_hi, zero_shift[None, :]) + 1
            w = (q - z).to(tl.float32) * s
        # Rows past k hold (0 - z) * s in w, but the matching columns of `a` are 0, so they add nothing.
        # (q - z) * s in fp32 is the reference's weight exactly; fp16/bf16 inputs round it once for tl.dot.
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)

    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _pick_block_k(k: int, group_size: int) -> int:
    """The widest BLOCK_K (<= 64) inside one group. Group sizes are multiples of 32, so 32 always fits."""
    if group_size >= k:
        return min(64, _quant_gemm.next_pow2(k))
    return 64 if group_size % 64 == 0 else 32


def int3_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              group_size: int, *, block_m: int | None = None, block_n: int | None = None,
              block_k: int | None = None, num_warps: int = _quant_gemm.DEFAULT_NUM_WARPS) -> torch.Tensor:
    """y = x @ W^T for W in the GPTQ v1 int3 layout; y has x's dtype. Block sizes default to a heuristic."""
    from comptrust.ops import _check_int3_gemm_args  # lazily, so comptrust.ops may import this module

    _check_int3_gemm_args(x, qweight, qzeros, scales, group_size)
    return _quant_gemm.launch(int3_gemm_kernel, "int3_gemm", _pick_block_k, x, qweight, qzeros, scales,
                              group_size, block_m, block_n, block_k, num_warps)


# Variants scripts/compile_check_triton.py compiles: constexpr branches are only type-checked and lowered
# when taken, so each EVEN_GROUPS path and each activation dtype needs its own compile to be checked.
AOT_CONFIGS = (
    {"dtype": "fp16", "even_groups": True},
    {"dtype": "fp16", "even_groups": False, "block_k": 64},
    {"dtype": "bf16", "even_groups": True},
    {"dtype": "fp32", "even_groups": True, "block_m": 32, "block_k": 32},
)


def aot_compile_ptx(arch: int = 80, **config) -> str:
    """PTX of int3_gemm_kernel for sm_<arch> (see _quant_gemm.aot_compile_ptx for the config keys)."""
    return _quant_gemm.aot_compile_ptx(int3_gemm_kernel, arch, **config)
