"""What the Triton weight-only GEMMs (int4_gemm.py, int3_gemm.py) share: block-size choice, the launch
with its argument checks, and ahead-of-time compilation to PTX. The kernels themselves take the same
arguments (x, qweight, qzeros, scales, y, sizes, strides, BLOCK_*, EVEN_GROUPS, DOT_PRECISION) and differ
only in how they unpack codes and zero points.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import triton

DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 3
TRITON_DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def pick_block_m(m: int) -> int:
    # tl.dot's minimum M is 16; decode (m <= 16) wastes rows rather than launching a GEMV variant.
    return 16 if m <= 16 else 32 if m <= 32 else 64


def dot_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "ieee"
    # Follow torch's own fp32 matmul setting so these kernels and F.linear agree on what fp32 means.
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def is_interpreted(kernel) -> bool:
    """True when triton.jit returned the interpreter's wrapper (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.jit import JITFunction

    return not isinstance(kernel, JITFunction)


def launch(kernel, name: str, pick_block_k: Callable[[int, int], int], x: torch.Tensor, qweight: torch.Tensor,
           qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, block_m: int | None,
           block_n: int | None, block_k: int | None, num_warps: int) -> torch.Tensor:
    """Run `kernel` on already validated tensors; block sizes default to the heuristics."""
    m, k = x.shape
    n = qweight.shape[1]
    devices = {t.device for t in (x, qweight, qzeros, scales)}
    if len(devices) != 1:
        raise ValueError(f"{name}: x, qweight, qzeros and scales must share a device, got {sorted(map(str, devices))} "
                         f"(m={m}, n={n}, k={k}, group_size={group_size})")
    if x.device.type == "cpu" and not is_interpreted(kernel):
        raise ValueError(f"{name} (Triton): CPU tensors run only under TRITON_INTERPRET=1 set before importing "
                         f"the kernel module (m={m}, n={n}, k={k}, group_size={group_size})")

    bm = block_m or pick_block_m(m)
    bn = block_n or 64
    bk = block_k or pick_block_k(k, group_size)
    for arg, b in (("block_m", bm), ("block_n", bn), ("block_k", bk)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name}: {arg}={b} must be a power of two >= 16 (tl.dot's minimum)")
    even_groups = group_size >= k or group_size % bk == 0

    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    # The kernels index the weight tensors as dense row-major arrays.
    qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    kernel[grid](
        x, qweight, qzeros, scales, y,
        m, n, k, group_size,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_GROUPS=even_groups, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=num_warps,
    )
    return y


def aot_compile_ptx(kernel, arch: int = 80, *, dtype: str = "fp16", even_groups: bool = True, block_m: int = 16,
                    block_n: int = 64, block_k: int = 64, num_warps: int = DEFAULT_NUM_WARPS,
                    num_stages: int = DEFAULT_NUM_STAGES) -> str:
    """PTX of `kernel` for sm_<arch>, compiled ahead of time (no GPU or driver needed).

    The specialization mirrors what the JIT produces for the usual launch: contiguous x and y (unit
    inner strides become constants) and 16-byte-aligned pointers and sizes.
    """
    if dtype not in TRITON_DTYPES:
        raise ValueError(f"aot_compile_ptx: dtype={dtype!r} must be one of {sorted(TRITON_DTYPES)}")
    act = TRITON_DTYPES[dtype]
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
    return compile_ptx(kernel, arch, signature, constexprs, aligned, num_warps, num_stages)


def compile_ptx(kernel, arch: int, signature: dict[str, str], constexprs: dict, aligned, num_warps: int,
                num_stages: int) -> str:
    """PTX of `kernel` for sm_<arch> with the given Triton signature; arguments named in `aligned` are
    declared 16-byte aligned (pointers) or divisible by 16 (sizes, strides), as the JIT would specialize."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):
        # Under TRITON_INTERPRET=1 the decorator returned an interpreter wrapper; compile the same source.
        kernel = JITFunction(kernel.fn)
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    target = GPUTarget("cuda", arch, 32)
    options = make_backend(target).parse_options({"num_warps": num_warps, "num_stages": num_stages})
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=target, options=options.__dict__)
    return compiled.asm["ptx"]
