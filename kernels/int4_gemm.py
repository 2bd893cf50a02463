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

_DEFAULT_NUM_WARPS = 4
_DEFAULT_NUM_STAGES = 3


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


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _pick_block_k(k: int, group_size: int) -> int:
    """The widest BLOCK_K (<= 64) that keeps each k-tile inside one group. tl.dot needs K >= 16, so a group
    size with no power-of-two divisor >= 16 (e.g. 8 or 24) takes the per-row gather path at 32."""
    if group_size >= k:
        return max(16, min(64, _next_pow2(k)))
    for bk in (64, 32, 16):
        if group_size % bk == 0:
            return bk
    return 32


def _pick_block_m(m: int) -> int:
    # tl.dot's minimum M is 16; decode (m <= 16) wastes rows rather than launching a GEMV variant.
    return 16 if m <= 16 else 32 if m <= 32 else 64


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "ieee"
    # Follow torch's own fp32 matmul setting so this kernel and F.linear agree on what fp32 means.
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _interpreted() -> bool:
    from triton.runtime.jit import JITFunction

    return not isinstance(int4_gemm_kernel, JITFunction)


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              group_size: int, *, block_m: int | None = None, block_n: int | None = None,
              block_k: int | None = None, num_warps: int = _DEFAULT_NUM_WARPS) -> torch.Tensor:
    """y = x @ W^T for W in the GPTQ v1 int4 layout; y has x's dtype. Block sizes default to a heuristic."""
    from comptrust.ops import _check_int4_gemm_args  # lazily, so comptrust.ops may import this module

    _check_int4_gemm_args(x, qweight, qzeros, scales, group_size)
    m, k = x.shape
    n = qweight.shape[1]
    devices = {t.device for t in (x, qweight, qzeros, scales)}
    if len(devices) != 1:
        raise ValueError(f"int4_gemm: x, qweight, qzeros and scales must share a device, got {sorted(map(str, devices))} "
                         f"(m={m}, n={n}, k={k}, group_size={group_size})")
    if x.device.type == "cpu" and not _interpreted():
        raise ValueError(f"int4_gemm (Triton): CPU tensors run only under TRITON_INTERPRET=1 set before importing "
                         f"this module (m={m}, n={n}, k={k}, group_size={group_size})")

    bm = block_m or _pick_block_m(m)
    bn = block_n or 64
    bk = block_k or _pick_block_k(k, group_size)
    for name, b in (("block_m", bm), ("block_n", bn), ("block_k", bk)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"int4_gemm: {name}={b} must be a power of two >= 16 (tl.dot's minimum)")
    even_groups = group_size >= k or group_size % bk == 0

    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    # The kernel indexes the weight tensors as dense row-major arrays.
    qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    int4_gemm_kernel[grid](
        x, qweight, qzeros, scales, y,
        m, n, k, group_size,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_GROUPS=even_groups, DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=num_warps,
    )
    return y


_TRITON_DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}

# Variants scripts/compile_check_triton.py compiles: constexpr branches are only type-checked and lowered
# when taken, so each EVEN_GROUPS path and each activation dtype needs its own compile to be checked.
AOT_CONFIGS = (
    {"dtype": "fp16", "even_groups": True},
    {"dtype": "fp16", "even_groups": False, "block_k": 32},
    {"dtype": "bf16", "even_groups": True},
    {"dtype": "fp32", "even_groups": True, "block_m": 32},
)


def aot_compile_ptx(arch: int = 80, *, dtype: str = "fp16", even_groups: bool = True, block_m: int = 16,
                    block_n: int = 64, block_k: int = 64, num_warps: int = _DEFAULT_NUM_WARPS,
                    num_stages: int = _DEFAULT_NUM_STAGES) -> str:
    """PTX of int4_gemm_kernel for sm_<arch>, compiled ahead of time (no GPU or driver needed).

    The specialization mirrors what the JIT produces for the usual launch: contiguous x and y (unit
    inner strides become constants) and 16-byte-aligned pointers and sizes.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction

    if dtype not in _TRITON_DTYPES:
        raise ValueError(f"aot_compile_ptx: dtype={dtype!r} must be one of {sorted(_TRITON_DTYPES)}")
    kernel = int4_gemm_kernel
    if not isinstance(kernel, JITFunction):
        # Under TRITON_INTERPRET=1 the decorator returned an interpreter wrapper; compile the same source.
        kernel = JITFunction(kernel.fn)
    act = _TRITON_DTYPES[dtype]
    signature = {
        "x_ptr": act, "qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16", "y_ptr": act,
        "m": "i32", "n": "i32", "k": "i32", "group_size": "i32",
        "stride_xm": "i32", "stride_xk": "constexpr", "stride_ym": "i32", "stride_yn": "constexpr",
        "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
        "EVEN_GROUPS": "constexpr", "DOT_PRECISION": "constexpr",
    }
    constexprs = {
        "stride_xk": 1, "stride_yn": 1, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
        "EVEN_GROUPS": even_groups, "DOT_PRECISION": "ieee",
    }
    aligned = ("x_ptr", "qweight_ptr", "qzeros_ptr", "scales_ptr", "y_ptr", "n", "k", "stride_xm", "stride_ym")
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    target = GPUTarget("cuda", arch, 32)
    options = make_backend(target).parse_options({"num_warps": num_warps, "num_stages": num_stages})
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=target, options=options.__dict__)
    return compiled.asm["ptx"]
