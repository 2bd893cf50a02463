"""Triton 2:4 semi-structured sparse GEMMs: y[m, n] = x[m, k] @ W^T, W [n, k] stored 2:4.

The kernels read the storage layout of comptrust/formats/sparse24.py as it is:
  meta   [n, k/8]   uint8   byte (r, b) holds sparsity group 2b in its low nibble and 2b+1 in its high
                            nibble; a nibble is idx0 | idx1 << 2 (the kept positions within the group)
  values [n, k/2]   fp32/fp16/bf16, values[r, 2g + t] = W[r, 4g + idx_t]            (sparse24_gemm)
  or the same compact [n, k/2] matrix as GPTQ v1 int4 tensors                      (sparse24_int4_gemm):
  qweight [k/16, n] int32, qzeros [groups, n/8] int32 (zero-1), scales [groups, n] fp16, with
  groups = ceil((k/2) / group_size): group_size counts KEPT values.

Each k-tile rebuilds the dense [BLOCK_K, BLOCK_N] weight tile in registers (dense row kk takes kept value
t of its sparsity group when idx_t == kk % 4, else 0) and feeds it to tl.dot. That spends the tensor
cores on the zeros too; what it saves is the memory traffic (half the values plus 1/2 bit of meta per
weight), which is what bounds decode-sized m. Sparse tensor cores (mma.sp) would need the meta reordered.

On a CUDA device the kernels are JIT-compiled; on CPU they run only under TRITON_INTERPRET=1 (the tests).
`aot_compile_ptx` compiles them to PTX without any GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

if __package__:  # imported as comptrust.kernels.sparse24_gemm
    from . import _quant_gemm
else:  # loaded by file path, as scripts/compile_check_triton.py does from a bare source checkout
    import importlib.util
    from pathlib import Path

    _spec = importlib.util.spec_from_file_location("_quant_gemm", Path(__file__).with_name("_quant_gemm.py"))
    _quant_gemm = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_quant_gemm)


@triton.jit
def _decode_positions(meta_ptr, offs_k, offs_n64, mask, k):
    """For each dense row kk of the tile and column j: (kk % 4, idx0, idx1) of kk's sparsity group in W[j]."""
    # Every dense row reads its group's meta byte (8 rows share one byte; the repeats hit L1), which keeps
    # the decoded tile in the [BLOCK_K, BLOCK_N] shape tl.dot wants without cross-lane shuffles.
    byte = tl.load(meta_ptr + offs_n64[None, :] * (k // 8) + (offs_k // 8)[:, None], mask=mask, other=0)
    nibble = (byte.to(tl.int32) >> (((offs_k // 4) % 2) * 4)[:, None]) & 0xF
    return (offs_k % 4)[:, None], nibble & 3, nibble >> 2


@triton.jit
def _dot_acc(a, w, acc, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """acc + a @ w with w first rounded to a's dtype (values of another dtype are rounded once, as F.linear
    on converted weights would be)."""
    w = w.to(a.dtype)
    if DOT_IN_FP32:
        # Only under TRITON_INTERPRET=1 with bf16 inputs, whose tl.dot Triton 3.9's interpreter gets wrong.
        # Products of bf16 values are exact in fp32, so an ieee fp32 dot is the same arithmetic as the GPU's
        # bf16 tensor-core dot with fp32 accumulation.
        return tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, w, acc, input_precision=DOT_PRECISION)


@triton.jit
def sparse24_gemm_kernel(
    x_ptr, values_ptr, meta_ptr, y_ptr,
    m, n, k,
    stride_xm, stride_xk, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    # "ieee" keeps fp32 activations exact like torch's default matmul; "tf32" trades that for tensor cores.
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # see _dot_acc; False in every compiled (GPU) launch
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kb = tl.arange(0, BLOCK_K)
    mask_m = offs_m < m
    mask_n = offs_n < n
    # int64 offsets: m * k or n * k / 2 can pass 2^31 on wide layers.
    offs_n64 = offs_n.to(tl.int64)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    value_rows = values_ptr + offs_n64[None, :] * (k // 2)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        offs_k = k0 + offs_kb
        mask_k = offs_k < k  # k % 8 == 0, so whole meta bytes are in or out
        a = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)

        wk_mask = mask_k[:, None] & mask_n[None, :]
        pos, idx0, idx1 = _decode_positions(meta_ptr, offs_k, offs_n64, wk_mask, k)
        kept0 = value_rows + ((offs_k // 4) * 2)[:, None]  # the group's first kept value
        v0 = tl.load(kept0, mask=wk_mask, other=0.0)
        v1 = tl.load(kept0 + 1, mask=wk_mask, other=0.0)
        w = tl.where(idx0 == pos, v0, tl.where(idx1 == pos, v1, 0.0))
        acc = _dot_acc(a, w, acc, DOT_PRECISION, DOT_IN_FP32)

    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def sparse24_int4_gemm_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, meta_ptr, y_ptr,
    m, n, k, group_size,
    stride_xm, stride_xk, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    # True when each tile's BLOCK_K / 2 kept values lie in one quantization group: one row of
    # scales/zeros per tile instead of a per-row gather.
    EVEN_GROUPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kb = tl.arange(0, BLOCK_K)
    mask_m = offs_m < m
    mask_n = offs_n < n
    offs_n64 = offs_n.to(tl.int64)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    zero_words_per_row = n // 8
    zero_word = offs_n // 8
    zero_shift = (offs_n % 8) * 4

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        offs_k = k0 + offs_kb
        mask_k = offs_k < k
        a = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)

        wk_mask = mask_k[:, None] & mask_n[None, :]
        pos, idx0, idx1 = _decode_positions(meta_ptr, offs_k, offs_n64, wk_mask, k)
        # Dense row kk's group keeps compact values 2*(kk//4) and 2*(kk//4) + 1: an even pair, so both
        # codes sit in one qweight word (16 dense rows per word) and in one quantization group
        # (group_size is a multiple of 8).
        compact = (offs_k // 4) * 2
        words = tl.load(qweight_ptr + (offs_k // 16)[:, None] * n + offs_n[None, :], mask=wk_mask, other=0)
        shift0 = ((compact % 8) * 4)[:, None]
        q0 = (words >> shift0) & 0xF  # & 0xF drops the sign bits an arithmetic shift drags in
        q1 = (words >> (shift0 + 4)) & 0xF

        if EVEN_GROUPS:
            g = (k0 // 2) // group_size
            s = tl.load(scales_ptr + g * n + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            zw = tl.load(qzeros_ptr + g * zero_words_per_row + zero_word, mask=mask_n, other=0)
            z = (((zw >> zero_shift) & 0xF) + 1)[None, :]  # v1 stores zero-1
        else:
            g = (compact // group_size)[:, None]
            s = tl.load(scales_ptr + g * n + offs_n[None, :], mask=wk_mask, other=0.0).to(tl.float32)
            zw = tl.load(qzeros_ptr + g * zero_words_per_row + zero_word[None, :], mask=wk_mask, other=0)
            z = ((zw >> zero_shift[None, :]) & 0xF) + 1
        # A position that is not kept takes the code z, which dequantizes to exactly 0: one dequantize
        # for both kept values and the zeros. Rows past k may dequantize to nonzero, but x is 0 there.
        q = tl.where(idx0 == pos, q0, tl.where(idx1 == pos, q1, z))
        w = (q - z).to(tl.float32) * s
        acc = _dot_acc(a, w, acc, DOT_PRECISION, DOT_IN_FP32)

    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _pick_block_k_fp(k: int) -> int:
    return max(16, min(64, _quant_gemm.next_pow2(k)))


def _pick_block_k_int4(k: int, group_size: int) -> int:
    """The widest BLOCK_K (<= 64) whose BLOCK_K / 2 kept values stay inside one group; else 64 (gather)."""
    if group_size >= k // 2:
        return _pick_block_k_fp(k)
    for bk in (64, 32):
        if group_size % (bk // 2) == 0:
            return bk
    return 64


def _dot_in_fp32(kernel, x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and _quant_gemm.is_interpreted(kernel)


def _prepare(name: str, kernel, x: torch.Tensor, n: int, note: str,
             blocks: tuple[int | None, int | None, int | None], default_block_k: int):
    """Launch checks the op-level argument rules (which include one device for all) do not cover;
    returns (y, grid, block sizes)."""
    m = x.shape[0]
    if x.device.type == "cpu" and not _quant_gemm.is_interpreted(kernel):
        raise ValueError(f"{name} (Triton): CPU tensors run only under TRITON_INTERPRET=1 set before importing "
                         f"the kernel module ({note})")
    block_m, block_n, block_k = blocks
    bm = block_m or _quant_gemm.pick_block_m(m)
    bn = block_n or 64
    bk = block_k or default_block_k
    for arg, b in (("block_m", bm), ("block_n", bn), ("block_k", bk)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name}: {arg}={b} must be a power of two >= 16 (tl.dot's minimum)")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    return y, grid, (bm, bn, bk)


def sparse24_gemm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, *, block_m: int | None = None,
                  block_n: int | None = None, block_k: int | None = None,
                  num_warps: int = _quant_gemm.DEFAULT_NUM_WARPS) -> torch.Tensor:
    """y = x @ W^T for a 2:4 weight given as kept values [n, k/2] and meta [n, k/8] uint8; y in x's dtype."""
    from comptrust.ops import _check_sparse24_gemm_args  # lazily, so comptrust.ops may import this module

    _check_sparse24_gemm_args(x, values, meta)
    (m, k), n = x.shape, values.shape[0]
    y, grid, (bm, bn, bk) = _prepare("sparse24_gemm", sparse24_gemm_kernel, x, n, f"m={m}, n={n}, k={k}",
                                     (block_m, block_n, block_k), _pick_block_k_fp(k))
    if m == 0:
        return y
    sparse24_gemm_kernel[grid](
        x, values.contiguous(), meta.contiguous(), y, m, n, k,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_PRECISION=_quant_gemm.dot_precision(x.dtype),
        DOT_IN_FP32=_dot_in_fp32(sparse24_gemm_kernel, x), num_warps=num_warps,
    )
    return y


def sparse24_int4_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                       meta: torch.Tensor, group_size: int, *, block_m: int | None = None,
                       block_n: int | None = None, block_k: int | None = None,
                       num_warps: int = _quant_gemm.DEFAULT_NUM_WARPS) -> torch.Tensor:
    """y = x @ W^T for a 2:4 weight whose kept values are GPTQ v1 int4 over the compact [n, k/2] matrix
    (group_size counted in kept values) and meta [n, k/8] uint8; y in x's dtype."""
    from comptrust.ops import _check_sparse24_int4_gemm_args

    _check_sparse24_int4_gemm_args(x, qweight, qzeros, scales, meta, group_size)
    (m, k), n = x.shape, qweight.shape[1]
    y, grid, (bm, bn, bk) = _prepare(
        "sparse24_int4_gemm", sparse24_int4_gemm_kernel, x, n,
        f"m={m}, n={n}, k={k}, group_size={group_size}", (block_m, block_n, block_k),
        _pick_block_k_int4(k, group_size))
    if m == 0:
        return y
    even_groups = group_size >= k // 2 or group_size % (bk // 2) == 0
    sparse24_int4_gemm_kernel[grid](
        x, qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), meta.contiguous(), y, m, n, k, group_size,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_GROUPS=even_groups,
        DOT_PRECISION=_quant_gemm.dot_precision(x.dtype), DOT_IN_FP32=_dot_in_fp32(sparse24_int4_gemm_kernel, x),
        num_warps=num_warps,
    )
    return y


# Variants scripts/compile_check_triton.py compiles: a constexpr branch or a dtype is only type-checked and
# lowered when compiled, so each activation dtype, mixed value dtypes and both int4 group paths get one.
AOT_CONFIGS = (
    {"kernel": "fp", "dtype": "fp16", "values": "fp16"},
    {"kernel": "fp", "dtype": "bf16", "values": "bf16"},
    {"kernel": "fp", "dtype": "fp32", "values": "fp32", "block_m": 32},
    {"kernel": "fp", "dtype": "fp16", "values": "fp32"},
    {"kernel": "fp", "dtype": "bf16", "values": "fp16"},
    {"kernel": "fp", "dtype": "fp32", "values": "bf16"},
    {"kernel": "int4", "dtype": "fp16", "even_groups": True},
    {"kernel": "int4", "dtype": "fp16", "even_groups": False},
    {"kernel": "int4", "dtype": "bf16", "even_groups": True},
    {"kernel": "int4", "dtype": "fp32", "even_groups": False, "block_m": 32},
)


def aot_compile_ptx(arch: int = 80, *, kernel: str = "fp", dtype: str = "fp16", values: str = "fp16",
                    even_groups: bool = True, block_m: int = 16, block_n: int = 64, block_k: int = 64,
                    num_warps: int = _quant_gemm.DEFAULT_NUM_WARPS,
                    num_stages: int = _quant_gemm.DEFAULT_NUM_STAGES) -> str:
    """PTX of one kernel variant for sm_<arch>: kernel "fp" (values dtype `values`) or "int4"; `dtype` is
    x's. Specialized like the usual JIT launch: contiguous x and y, 16-byte-aligned pointers and sizes."""
    dtypes = _quant_gemm.TRITON_DTYPES
    if dtype not in dtypes or values not in dtypes:
        raise ValueError(f"aot_compile_ptx: dtype={dtype!r} and values={values!r} must be in {sorted(dtypes)}")
    act = dtypes[dtype]
    # Listed in the kernels' argument order.
    sizes = {"m": "i32", "n": "i32", "k": "i32"}
    strides = {"stride_xm": "i32", "stride_xk": "constexpr", "stride_ym": "i32", "stride_yn": "constexpr",
               "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    dot = {"DOT_PRECISION": "constexpr", "DOT_IN_FP32": "constexpr"}
    constexprs = {"stride_xk": 1, "stride_yn": 1, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                  "DOT_PRECISION": "ieee", "DOT_IN_FP32": False}
    if kernel == "fp":
        fn = sparse24_gemm_kernel
        signature = {"x_ptr": act, "values_ptr": dtypes[values], "meta_ptr": "*u8", "y_ptr": act, **sizes,
                     **strides, **dot}
    elif kernel == "int4":
        fn = sparse24_int4_gemm_kernel
        signature = {"x_ptr": act, "qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16",
                     "meta_ptr": "*u8", "y_ptr": act, **sizes, "group_size": "i32", **strides,
                     "EVEN_GROUPS": "constexpr", **dot}
        constexprs["EVEN_GROUPS"] = even_groups
    else:
        raise ValueError(f"aot_compile_ptx: kernel={kernel!r} must be 'fp' or 'int4'")
    aligned = [name for name in signature if name.endswith("_ptr")] + ["n", "k", "stride_xm", "stride_ym"]
    return _quant_gemm.compile_ptx(fn, arch, signature, constexprs, aligned, num_warps, num_stages)
