"""CUDA int4_gemm (csrc/cuda/int4_gemm_cuda.cu).

Two parts:
  * a compile check that runs everywhere nvcc is installed: scripts/compile_check_cuda.sh builds every
    csrc/cuda/*.cu for sm_80 and sm_90 with warnings as errors (no GPU, no CUDA torch needed); skipped
    only when nvcc is absent and COMPTRUST_SKIP_NVCC=1;
  * GPU correctness tests, skipped unless torch sees a CUDA device and comptrust._C registered a CUDA
    kernel for comptrust::int4_gemm. They compare torch.ops.comptrust.int4_gemm on CUDA tensors with
    comptrust.reference.int4_gemm computed on CPU in fp32 from the same (already rounded) activations.

Metric: relative Frobenius error ||y - y_ref|| / ||y_ref||, and the largest elementwise error relative to
max |y_ref|, both at most TOL[dtype]:
  fp32  1e-5   (fp32 accumulation in a different order; observed ~1e-7)
  fp16  1e-3   (the output is rounded once to fp16: <= 2^-11 relative)
  bf16  8e-3   (the output is rounded once to bf16: <= 2^-8 relative)
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from comptrust import reference
from comptrust.formats import Int4Packed
from quant_cases import random_int4

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "compile_check_cuda.sh"

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# m <= 32 runs the GEMV-style kernel; above it the tiled GEMMs (quant_tiled.cuh: fp32 on the FMA tile, fp16 and
# bf16 on the tensor cores) where k and the group size are multiples of 32, else the GEMV-style kernel still.
M_SIZES = (1, 3, 7, 13, 32, 33, 70, 118)
# (n, k): tiny, odd, SmolLM2 attn / MLP; k = 40 and 136 never fit the tiled GEMMs, n = 200 overhangs its 64-wide
# column tiles by 56
NK_SHAPES = ((24, 40), (200, 136), (200, 160), (576, 576), (1536, 576))
GROUPS = (32, 128, "channel")  # 128 on k=40/136/160/576 and 32 on k=40 leave a partial last group
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------- compile check
def test_compile_check_cuda_sources():
    nvcc_missing = shutil.which("nvcc") is None and not (
        os.environ.get("CUDA_HOME") and (Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc").exists()
    ) and not os.environ.get("NVCC")
    if nvcc_missing and os.environ.get("COMPTRUST_SKIP_NVCC") == "1":
        pytest.skip("nvcc not found and COMPTRUST_SKIP_NVCC=1")
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=900, cwd="/")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"compile_check_cuda.sh failed (rc={proc.returncode}):\n{output}"
    if proc.stdout.startswith("SKIPPED"):
        pytest.skip(proc.stdout.strip())
    for src in sorted((REPO / "csrc" / "cuda").glob("*.cu")):
        assert f"OK csrc/cuda/{src.name}" in proc.stdout, output


# ---------------------------------------------------------------------------------------- GPU tests
def _cuda_op_unavailable() -> str | None:
    """None when torch.ops.comptrust.int4_gemm has a CUDA kernel and a device to run it on."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    from comptrust import ops

    if ops._C is None:
        return "comptrust._C is not built"
    try:
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("comptrust::int4_gemm", "CUDA")
    except RuntimeError as exc:
        return f"comptrust::int4_gemm is not registered: {exc}"
    if not has_cuda:
        return "comptrust._C was built without CUDA (no CUDA kernel for comptrust::int4_gemm)"
    return None


_REASON = _cuda_op_unavailable()
needs_cuda_op = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@functools.lru_cache(maxsize=None)
def _packed(n: int, k: int, group_size: int) -> Int4Packed:
    """Random packed weights (CPU tensors; cached per shape)."""
    return random_int4(n, k, group_size, seed=n * 1_000_003 + k * 1009 + group_size)[0]


def _to_cuda(p: Int4Packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return p.qweight.cuda(), p.qzeros.cuda(), p.scales.cuda()


def _errors(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    got, ref = got.detach().cpu().float(), ref.cpu().float()
    rel = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    worst = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    return rel, worst


def _check(x: torch.Tensor, p: Int4Packed, dtype: torch.dtype) -> None:
    """Run the CUDA op on x (a CUDA tensor of `dtype`) and compare with the fp32 CPU reference."""
    qweight, qzeros, scales = _to_cuda(p)
    y = torch.ops.comptrust.int4_gemm(x, qweight, qzeros, scales, p.group_size)
    torch.cuda.synchronize()
    assert y.device == x.device and y.dtype == dtype and y.shape == (x.shape[0], p.out_features)
    ref = reference.int4_gemm(x.cpu().float(), p.qweight, p.qzeros, p.scales, p.group_size)
    rel, worst = _errors(y, ref)
    tol = TOL[dtype]
    assert rel <= tol and worst <= tol, (
        f"m={x.shape[0]} n={p.out_features} k={p.in_features} group_size={p.group_size} {dtype}: "
        f"relative error {rel:.3g}, max error / max|ref| {worst:.3g} (tolerance {tol:g})"
    )


@needs_cuda_op
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("group", GROUPS, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("n,k", NK_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("m", M_SIZES, ids=lambda m: f"m{m}")
def test_int4_gemm_cuda_matches_reference(m, n, k, group, dtype):
    group_size = k if group == "channel" else group
    p = _packed(n, k, group_size)
    gen = torch.Generator().manual_seed(m * 7919 + n + k)
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    _check(x, p, dtype)


@needs_cuda_op
@pytest.mark.parametrize("m", (1, 118))
def test_int4_gemm_cuda_llm_layer_shape(m):
    p = _packed(4096, 4096, 128)
    x = torch.randn(m, 4096, generator=torch.Generator().manual_seed(m)).cuda()
    _check(x, p, torch.float32)


@needs_cuda_op
@pytest.mark.parametrize("m", (5, 70))
@pytest.mark.parametrize("group_size", (8, 24, 96, 4096), ids=lambda g: f"g{g}")
def test_int4_gemm_cuda_unusual_group_sizes(m, group_size):
    # 8: a group per word row; 24: groups that straddle the GEMV's 8-word-row chunks (both keep m = 70 on the
    # GEMV-style kernel: not multiples of 32); 96: three tiled k-steps per group; 4096 > k: one group.
    p = _packed(64, 288, group_size)
    x = torch.randn(m, 288, generator=torch.Generator().manual_seed(group_size + m)).cuda()
    _check(x, p, torch.float32)
    _check(x.half(), p, torch.float16)


@needs_cuda_op
def test_int4_gemm_cuda_many_rows():
    # More than 65535 * 8 rows: row blocks beyond the 65535 limit of gridDim.y.
    m = 65535 * 8 + 13
    p = _packed(24, 40, 32)
    x = torch.randn(m, 40, generator=torch.Generator().manual_seed(1)).cuda()
    _check(x, p, torch.float32)


@needs_cuda_op
def test_int4_gemm_cuda_many_rows_tiled():
    # More than 65535 row tiles of the tiled GEMM (64 rows each): grid.x beyond the 65535 limit of grid.y/z.
    m = 65535 * 64 + 13
    p = _packed(24, 32, 32)
    x = torch.randn(m, 32, generator=torch.Generator().manual_seed(2)).cuda()
    _check(x, p, torch.float32)
    _check(x.bfloat16(), p, torch.bfloat16)


@needs_cuda_op
@pytest.mark.parametrize("m,n,k", ((7, 200, 136), (50, 200, 160)), ids=("gemv", "tiled"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_int4_gemm_cuda_unaligned_and_strided_x(dtype, m, n, k):
    p = _packed(n, k, 32)
    base = torch.randn(m * k + 1, generator=torch.Generator().manual_seed(3)).to(dtype).cuda()
    x_unaligned = base[1:].view(m, k)  # contiguous, but the data pointer is not 16-byte aligned
    assert x_unaligned.data_ptr() % 16 != 0
    _check(x_unaligned, p, dtype)
    x_strided = torch.randn(k, m, generator=torch.Generator().manual_seed(4)).to(dtype).cuda().t()
    assert not x_strided.is_contiguous()
    _check(x_strided, p, dtype)


@needs_cuda_op
@pytest.mark.parametrize("m", (13, 118))
def test_int4_gemm_cuda_deterministic_and_empty(m):
    p = _packed(576, 576, 128)
    qweight, qzeros, scales = _to_cuda(p)
    x = torch.randn(m, 576, generator=torch.Generator().manual_seed(5)).cuda()
    for xd in (x, x.bfloat16()):  # m = 118: the FMA and the tensor-core tiles
        y1 = torch.ops.comptrust.int4_gemm(xd, qweight, qzeros, scales, 128)
        y2 = torch.ops.comptrust.int4_gemm(xd, qweight, qzeros, scales, 128)
        assert torch.equal(y1, y2)  # split-K is reduced in a fixed order, no atomics
    empty = torch.ops.comptrust.int4_gemm(x[:0].half(), qweight, qzeros, scales, 128)
    assert empty.shape == (0, 576) and empty.dtype == torch.float16 and empty.is_cuda


@needs_cuda_op
def test_int4_gemm_cuda_through_public_wrapper():
    from comptrust import ops

    p = _packed(200, 136, 32)
    x = torch.randn(3, 136, generator=torch.Generator().manual_seed(6)).cuda()
    y = ops.int4_gemm(x, *_to_cuda(p), 32)
    ref = reference.int4_gemm(x.cpu(), p.qweight, p.qzeros, p.scales, 32)
    rel, worst = _errors(y, ref)
    assert y.is_cuda and rel <= TOL[torch.float32] and worst <= TOL[torch.float32]


def _bad_cases():
    """(name, build(x, qweight, qzeros, scales) -> args, error regex) on a valid m=3, n=24, k=40, g=32 call."""
    return [
        ("scales_fp32", lambda x, w, z, s: (x, w, z, s.float(), 32), "scales must be float16"),
        ("qweight_int64", lambda x, w, z, s: (x, w.long(), z, s, 32), "qweight must be int32"),
        ("x_int", lambda x, w, z, s: (x.int(), w, z, s, 32), "x must be float32"),
        ("x_3d", lambda x, w, z, s: (x[None], w, z, s, 32), "x must be 2-D"),
        ("k_not_multiple_of_8", lambda x, w, z, s: (x[:, :36], w, z, s, 32), "must be a multiple of 8"),
        ("k_mismatch", lambda x, w, z, s: (torch.cat([x, x[:, :8]], 1), w, z, s, 32), "qweight is"),
        ("group_size_12", lambda x, w, z, s: (x, w, z, s, 12), "group_size=12"),
        ("group_size_0", lambda x, w, z, s: (x, w, z, s, 0), "group_size=0"),
        ("scales_for_other_group_size", lambda x, w, z, s: (x, w, z, s, 16), "scales is"),
        ("qzeros_wrong_shape", lambda x, w, z, s: (x, w, z[:, :1].repeat(1, 2), s, 32), "qzeros is"),
        ("qweight_on_cpu", lambda x, w, z, s: (x, w.cpu(), z, s, 32), "one device"),
        ("scales_on_cpu", lambda x, w, z, s: (x, w, z, s.cpu(), 32), "one device"),
    ]


@needs_cuda_op
@pytest.mark.parametrize("name,build,message", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_int4_gemm_cuda_rejects_bad_inputs(name, build, message):
    p = _packed(24, 40, 32)
    x = torch.randn(3, 40).cuda()
    args = build(x, *_to_cuda(p))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.comptrust.int4_gemm(*args)
