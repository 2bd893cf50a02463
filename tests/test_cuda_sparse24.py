"""CUDA sparse24_gemm / sparse24_int4_gemm (csrc/cuda/sparse24_gemm_cuda.cu, sparse24_int4_gemm_cuda.cu).

GPU correctness tests, skipped unless torch sees a CUDA device and comptrust._C registered CUDA kernels for
the two ops (the nvcc compile check of these sources is in test_cuda_int4.py). They compare the CUDA op with
comptrust.reference computed on CPU in fp32 from the same (already rounded) activations, over every kernel
path: GEMV (m <= 8); tiled (m > 8): the FMA tile, and the sparse tensor-core tile (sparse24_mma.cuh, mma.sp)
for fp16/bf16 x where k % 32 == 0 and the kept values are x's own type or int4 in groups of whole 16-value
steps (k = 160 and 576 below; k = 8, 24, 136, 144, 272 keep the FMA tile).

Metric: relative Frobenius error ||y - y_ref|| / ||y_ref||, and the largest elementwise error relative to
max |y_ref|, both at most TOL[x dtype]. The kernels widen x and the values to fp32 exactly and accumulate in
fp32, so the only rounding beyond summation order is y's, once, to x's dtype:
  fp32  1e-5   (fp32 accumulation in a different order)
  fp16  1e-3   (<= 2^-11 relative, and mostly the same rounding as the reference's)
  bf16  8e-3   (<= 2^-8 relative)
"""
from __future__ import annotations

import functools

import pytest
import torch

from comptrust import reference
from sparse24_cases import errors, int4_args, random_sparse24, random_sparse24_int4


TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
M_SIZES = (1, 3, 7, 8, 13, 118)  # GEMV with 1, 4 and 8 rows per block; tiled with ragged row tiles
# odd; n = 200 overhangs the 64-column tiles; SmolLM2 attention / MLP
FP_SHAPES = ((24, 8), (40, 24), (200, 136), (200, 160), (576, 576), (1536, 576))
# (n, k, group size in kept values): 16 and 48 on k = 160 are one and three tensor-core steps per group (48
# ends in a partial group), -1 one group per row
INT4_SHAPES = ((24, 16, 8), (40, 48, 24), (200, 144, 16), (40, 272, 128), (576, 576, 128), (1536, 576, 64),
               (200, 144, -1), (200, 160, 16), (200, 160, 48), (200, 160, -1))


# The compile check of every csrc/cuda/*.cu, these two included, is test_cuda_int4.py::test_compile_check_cuda_sources.


# ---------------------------------------------------------------------------------------- GPU tests
def _cuda_ops_unavailable() -> str | None:
    """None when both sparse24 ops have a CUDA kernel and a device to run it on."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    from comptrust import ops

    if ops._C is None:
        return "comptrust._C is not built"
    for op in ("comptrust::sparse24_gemm", "comptrust::sparse24_int4_gemm"):
        try:
            has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
        except RuntimeError as exc:
            return f"{op} is not registered: {exc}"
        if not has_cuda:
            return f"comptrust._C was built without CUDA (no CUDA kernel for {op})"
    return None


_REASON = _cuda_ops_unavailable()
needs_cuda_op = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@functools.lru_cache(maxsize=None)
def _fp_packed(n: int, k: int, dtype: torch.dtype):
    return random_sparse24(n, k, seed=n * 1_000_003 + k, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _int4_packed(n: int, k: int, group_size: int):
    return random_sparse24_int4(n, k, group_size, seed=n * 1_000_003 + k * 1009 + group_size)


def _assert_close(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, what: str) -> None:
    torch.cuda.synchronize()
    assert y.device == x.device and y.dtype == x.dtype and y.shape == ref.shape, what
    rel, worst = errors(y, ref)
    tol = TOL[x.dtype]
    assert rel <= tol and worst <= tol, (
        f"{what} {x.dtype}: relative error {rel:.3g}, max error / max|ref| {worst:.3g} (tolerance {tol:g})")


def _check_fp(x: torch.Tensor, p) -> None:
    y = torch.ops.comptrust.sparse24_gemm(x, p.values.cuda(), p.meta.cuda())
    ref = reference.sparse24_gemm(x.cpu().float(), p.values, p.meta)
    _assert_close(y, ref, x, f"sparse24_gemm m={x.shape[0]} n={p.out_features} k={p.in_features} "
                             f"values {p.values.dtype}")


def _check_int4(x: torch.Tensor, p) -> None:
    args = int4_args(p)
    y = torch.ops.comptrust.sparse24_int4_gemm(x, *(a.cuda() for a in args[:4]), args[4])
    ref = reference.sparse24_int4_gemm(x.cpu().float(), *args)
    _assert_close(y, ref, x, f"sparse24_int4_gemm m={x.shape[0]} n={p.out_features} k={p.in_features} "
                             f"group_size={p.group_size}")


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype).cuda()


@needs_cuda_op
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n,k", FP_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("m", M_SIZES, ids=lambda m: f"m{m}")
def test_sparse24_gemm_cuda_matches_reference(m, n, k, dtype):
    _check_fp(_x(m, k, dtype, m * 7919 + n + k), _fp_packed(n, k, dtype))


@needs_cuda_op
@pytest.mark.parametrize("values_dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("x_dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("m", (1, 13))
def test_sparse24_gemm_cuda_every_dtype_pair(m, x_dtype, values_dtype):
    # k = 160 at m = 13: the tensor-core tile where the two dtypes are the same 16-bit one, else the FMA tile
    _check_fp(_x(m, 160, x_dtype, m), _fp_packed(200, 160, values_dtype))


@needs_cuda_op
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n,k,group_size", INT4_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("m", M_SIZES, ids=lambda m: f"m{m}")
def test_sparse24_int4_gemm_cuda_matches_reference(m, n, k, group_size, dtype):
    _check_int4(_x(m, k, dtype, m * 7919 + n + k + group_size), _int4_packed(n, k, group_size))


@needs_cuda_op
@pytest.mark.parametrize("m", (1, 118))
def test_sparse24_cuda_llm_layer_shape(m):
    x = _x(m, 4096, torch.float32, m)
    _check_fp(x, _fp_packed(4096, 4096, torch.float16))
    _check_int4(x, _int4_packed(4096, 4096, 128))


@needs_cuda_op
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("m", (3, 13))
def test_sparse24_cuda_unaligned_and_strided(m, dtype):
    # x and values at data pointers that are not 16-byte aligned take the kernels' scalar loads.
    k = 136
    base = torch.randn(m * k + 1, generator=torch.Generator().manual_seed(3)).to(dtype).cuda()
    x_unaligned = base[1:].view(m, k)
    assert x_unaligned.data_ptr() % 16 != 0
    p = _fp_packed(200, k, dtype)
    _check_fp(x_unaligned, p)
    values = torch.cat([p.values.new_zeros(1), p.values.flatten()]).cuda()[1:].view_as(p.values)
    assert values.data_ptr() % 16 != 0
    y = torch.ops.comptrust.sparse24_gemm(x_unaligned, values, p.meta.cuda())
    _assert_close(y, reference.sparse24_gemm(x_unaligned.cpu().float(), p.values, p.meta), x_unaligned, "unaligned")
    x_strided = _x(k, m, dtype, 4).t()
    assert not x_strided.is_contiguous()
    _check_fp(x_strided, p)
    _check_int4(x_strided[:, :128], _int4_packed(40, 128, 16))


@needs_cuda_op
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=DTYPE_IDS.get)
def test_sparse24_cuda_tensor_core_tile_unaligned(dtype):
    # The mma.sp tile with x at a pointer that is not 16-byte aligned (its scalar staging loads), and with
    # values at one that is not 4-byte aligned (which sends the call to the FMA tile).
    m, k = 70, 160
    base = torch.randn(m * k + 1, generator=torch.Generator().manual_seed(8)).to(dtype).cuda()
    x_unaligned = base[1:].view(m, k)
    assert x_unaligned.data_ptr() % 16 != 0
    p = _fp_packed(200, k, dtype)
    _check_fp(x_unaligned, p)
    _check_int4(x_unaligned, _int4_packed(200, k, 48))
    values = torch.cat([p.values.new_zeros(1), p.values.flatten()]).cuda()[1:].view_as(p.values)
    assert values.data_ptr() % 4 != 0
    y = torch.ops.comptrust.sparse24_gemm(x_unaligned, values, p.meta.cuda())
    _assert_close(y, reference.sparse24_gemm(x_unaligned.cpu().float(), p.values, p.meta), x_unaligned, "unaligned")


@needs_cuda_op
def test_sparse24_cuda_deterministic_and_empty():
    p, q = _fp_packed(576, 576, torch.float32), _int4_packed(576, 576, 128)
    x = _x(13, 576, torch.float32, 5)
    values, meta = p.values.cuda(), p.meta.cuda()
    qargs = [a.cuda() for a in int4_args(q)[:4]]
    assert torch.equal(torch.ops.comptrust.sparse24_gemm(x, values, meta),
                       torch.ops.comptrust.sparse24_gemm(x, values, meta))
    assert torch.equal(torch.ops.comptrust.sparse24_int4_gemm(x[:3], *qargs, 128),
                       torch.ops.comptrust.sparse24_int4_gemm(x[:3], *qargs, 128))  # split-K, fixed order
    empty = torch.ops.comptrust.sparse24_gemm(x[:0].half(), values, meta)
    assert empty.shape == (0, 576) and empty.dtype == torch.float16 and empty.is_cuda
    empty = torch.ops.comptrust.sparse24_int4_gemm(x[:0], *qargs, 128)
    assert empty.shape == (0, 576) and empty.is_cuda


@needs_cuda_op
def test_sparse24_cuda_through_public_wrappers():
    from comptrust import ops

    p, q = _fp_packed(200, 136, torch.float32), _int4_packed(200, 144, 24)
    x = _x(3, 136, torch.float32, 6)
    y = ops.sparse24_gemm(x, p.values.cuda(), p.meta.cuda())
    _assert_close(y, reference.sparse24_gemm(x.cpu(), p.values, p.meta), x, "ops.sparse24_gemm")
    x = _x(3, 144, torch.float32, 7)
    args = int4_args(q)
    y = ops.sparse24_int4_gemm(x, *(a.cuda() for a in args[:4]), args[4])
    _assert_close(y, reference.sparse24_int4_gemm(x.cpu(), *args), x, "ops.sparse24_int4_gemm")


def _fp_bad_cases():
    """(name, build(x, values, meta) -> args, error regex) on a valid m=3, n=24, k=40 call."""
    return [
        ("x_int", lambda x, v, mt: (x.int(), v, mt), "x must be float32, bfloat16 or float16"),
        ("x_3d", lambda x, v, mt: (x[None], v, mt), r"x must be 2-D \[m, k\]"),
        ("values_int", lambda x, v, mt: (x, v.int(), mt), "values must be float32, bfloat16 or float16"),
        ("values_1d", lambda x, v, mt: (x, v.flatten(), mt), r"values must be 2-D \[n, k/2\]"),
        ("k_not_multiple_of_8", lambda x, v, mt: (x[:, :36], v, mt), "k=36"),
        ("k_mismatch", lambda x, v, mt: (torch.cat([x, x[:, :8]], 1), v, mt), r"expected \[n, k/2=24\]"),
        ("meta_int32", lambda x, v, mt: (x, v, mt.int()), "meta must be uint8"),
        ("meta_short", lambda x, v, mt: (x, v, mt[:, :4]), r"expected \[n=24, k/8=5\]"),
        ("meta_rows", lambda x, v, mt: (x, v, mt[:12]), r"expected \[n=24, k/8=5\]"),
        ("values_on_cpu", lambda x, v, mt: (x, v.cpu(), mt), "share a device"),
        ("meta_on_cpu", lambda x, v, mt: (x, v, mt.cpu()), "share a device"),
    ]


@needs_cuda_op
@pytest.mark.parametrize("name,build,message", _fp_bad_cases(), ids=[c[0] for c in _fp_bad_cases()])
def test_sparse24_gemm_cuda_rejects_bad_inputs(name, build, message):
    p = _fp_packed(24, 40, torch.float32)
    args = build(torch.randn(3, 40).cuda(), p.values.cuda(), p.meta.cuda())
    with pytest.raises(RuntimeError, match=message):
        torch.ops.comptrust.sparse24_gemm(*args)


def _int4_bad_cases():
    """(name, build(x, qweight, qzeros, scales, meta) -> args, error regex) on a valid m=3, n=24, k=48, g=8."""
    return [
        ("x_int", lambda x, w, z, s, mt: (x.int(), w, z, s, mt, 8), "x must be float32"),
        ("qweight_int64", lambda x, w, z, s, mt: (x, w.long(), z, s, mt, 8), "int32"),
        ("scales_fp32", lambda x, w, z, s, mt: (x, w, z, s.float(), mt, 8), "float16"),
        ("k_not_multiple_of_16", lambda x, w, z, s, mt: (x[:, :40], w, z, s, mt, 8), "k=40 must be a multiple of 16"),
        ("k_mismatch", lambda x, w, z, s, mt: (torch.cat([x, x[:, :16]], 1), w, z, s, mt, 8), "qweight is"),
        ("group_size_12", lambda x, w, z, s, mt: (x, w, z, s, mt, 12), "group_size=12"),
        ("group_size_0", lambda x, w, z, s, mt: (x, w, z, s, mt, 0), "group_size=0"),
        ("scales_for_other_group_size", lambda x, w, z, s, mt: (x, w, z, s, mt, 16), "group_size=16"),
        ("meta_int32", lambda x, w, z, s, mt: (x, w, z, s, mt.int(), 8), "meta must be uint8"),
        ("meta_short", lambda x, w, z, s, mt: (x, w, z, s, mt[:, :4], 8), r"expected \[n=24, k/8=6\]"),
        ("meta_on_cpu", lambda x, w, z, s, mt: (x, w, z, s, mt.cpu(), 8), "share a device"),
        ("qweight_on_cpu", lambda x, w, z, s, mt: (x, w.cpu(), z, s, mt, 8), "share a device"),
    ]


@needs_cuda_op
@pytest.mark.parametrize("name,build,message", _int4_bad_cases(), ids=[c[0] for c in _int4_bad_cases()])
def test_sparse24_int4_gemm_cuda_rejects_bad_inputs(name, build, message):
    args = int4_args(_int4_packed(24, 48, 8))
    built = build(torch.randn(3, 48).cuda(), *(a.cuda() for a in args[:4]))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.comptrust.sparse24_int4_gemm(*built)
