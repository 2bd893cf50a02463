"""CUDA int3_gemm (csrc/cuda/int3_gemm_cuda.cu).

Three parts:
  * a host check of the shared packing header (csrc/include/comptrust/int3_layout.h) that the CUDA kernels
    decode with: compiled with the system C++ compiler and compared bit for bit with the Python packer;
    runs wherever a C++ compiler exists. (nvcc's compile check of every csrc/cuda/*.cu, int3 included,
    lives in test_cuda_int4.py::test_compile_check_cuda_sources.)
  * GPU correctness tests, skipped unless torch sees a CUDA device and comptrust._C registered a CUDA
    kernel for comptrust::int3_gemm. They compare torch.ops.comptrust.int3_gemm on CUDA tensors with
    comptrust.reference.int3_gemm computed on CPU in fp32 from the same (already rounded) activations.
    m runs through both kernels: the GEMV for m <= 32 (1, 2, 7, 13, 32) and the tiled GEMMs above (33, 118):
    quant_tiled.cuh's FMA tile for fp32 x and its tensor-core tile for fp16/bf16 x (sm_80+).
  * bad-input errors from csrc/int3_checks.h.

Metric: relative Frobenius error ||y - y_ref|| / ||y_ref||, and the largest elementwise error relative to
max |y_ref|, both at most TOL[dtype]:
  fp32  1e-5   (fp32 accumulation in a different order)
  fp16  1e-3   (the output is rounded once to fp16: <= 2^-11 relative)
  bf16  8e-3   (the output is rounded once to bf16: <= 2^-8 relative)
"""
from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from comptrust import reference
from comptrust.formats.int3 import Int3Packed, pack_3bit_last_dim
from quant_cases import random_int3

REPO = Path(__file__).resolve().parents[1]

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
M_SIZES = (1, 2, 7, 13, 32, 33, 118)
NK_SHAPES = ((32, 32), (96, 160), (576, 576), (1536, 576), (576, 1536))  # (n, k): tiny, odd, SmolLM2 layers
GROUPS = (32, 128, "channel")  # 128 on k=32 is more than k; on k=160/576 it leaves a partial last group
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------ host header check
_LAYOUT_PROBE = r"""
#include <cstdio>
#include "comptrust/int3_layout.h"
int main() {  // stdin: block count, then per block 3 words and the 32 values they hold
  int blocks = 0, bad = 0;
  if (std::scanf("%d", &blocks) != 1) return 2;
  for (int b = 0; b < blocks; ++b) {
    int32_t w[3];
    int v[32];
    for (int& word : w) std::scanf("%d", &word);
    for (int& value : v) std::scanf("%d", &value);
    for (int i = 0; i < 32; ++i) {
      const uint32_t u0 = static_cast<uint32_t>(w[0]), u1 = static_cast<uint32_t>(w[1]), u2 = static_cast<uint32_t>(w[2]);
      bad += comptrust::int3_at(u0, u1, u2, i) != v[i];
      bad += comptrust::int3_zero_at(w, i) != v[i] + 1;  // the same block read as a qzeros row
    }
  }
  std::printf("checked %d blocks, %d mismatches\n", blocks, bad);
  return bad != 0;
}
"""


def test_int3_layout_header_matches_python_packer(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src, exe = tmp_path / "probe.cpp", tmp_path / "probe"
    src.write_text(_LAYOUT_PROBE)
    build = subprocess.run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{REPO / 'csrc' / 'include'}",
                            str(src), "-o", str(exe)], capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    # Random blocks plus all-7 (every word -1) and alternating 0/7, which set the straddling fields' bits.
    values = torch.randint(0, 8, (300, 32), generator=torch.Generator().manual_seed(0))
    values[0] = 7
    values[1] = torch.arange(32) % 2 * 7
    values[2] = (torch.arange(32) + 1) % 2 * 7
    words = pack_3bit_last_dim(values)
    assert (words < 0).any()
    lines = [str(len(values))] + [" ".join(map(str, w.tolist() + v.tolist())) for w, v in zip(words, values)]
    run = subprocess.run([str(exe)], input="\n".join(lines), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "300 blocks, 0 mismatches" in run.stdout


# ---------------------------------------------------------------------------------------- GPU tests
def _cuda_op_unavailable() -> str | None:
    """None when torch.ops.comptrust.int3_gemm has a CUDA kernel and a device to run it on."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    from comptrust import ops

    if ops._C is None:
        return "comptrust._C is not built"
    try:
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("comptrust::int3_gemm", "CUDA")
    except RuntimeError as exc:
        return f"comptrust::int3_gemm is not registered: {exc}"
    if not has_cuda:
        return "comptrust._C was built without CUDA (no CUDA kernel for comptrust::int3_gemm)"
    return None


_REASON = _cuda_op_unavailable()
needs_cuda_op = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@functools.lru_cache(maxsize=None)
def _packed(n: int, k: int, group_size: int) -> Int3Packed:
    """Random packed weights (CPU tensors; cached per shape)."""
    return random_int3(n, k, group_size, seed=n * 1_000_003 + k * 1009 + group_size)[0]


def _to_cuda(p: Int3Packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return p.qweight.cuda(), p.qzeros.cuda(), p.scales.cuda()


def _errors(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    got, ref = got.detach().cpu().float(), ref.cpu().float()
    rel = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    worst = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    return rel, worst


def _check(x: torch.Tensor, p: Int3Packed, dtype: torch.dtype) -> None:
    """Run the CUDA op on x (a CUDA tensor of `dtype`) and compare with the fp32 CPU reference."""
    qweight, qzeros, scales = _to_cuda(p)
    y = torch.ops.comptrust.int3_gemm(x, qweight, qzeros, scales, p.group_size)
    torch.cuda.synchronize()
    assert y.device == x.device and y.dtype == dtype and y.shape == (x.shape[0], p.out_features)
    ref = reference.int3_gemm(x.cpu().float(), p.qweight, p.qzeros, p.scales, p.group_size)
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
def test_int3_gemm_cuda_matches_reference(m, n, k, group, dtype):
    group_size = k if group == "channel" else group
    p = _packed(n, k, group_size)
    gen = torch.Generator().manual_seed(m * 7919 + n + k)
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    _check(x, p, dtype)


@needs_cuda_op
@pytest.mark.parametrize("m", (1, 118))
def test_int3_gemm_cuda_llm_layer_shape(m):
    p = _packed(4096, 4096, 128)
    x = torch.randn(m, 4096, generator=torch.Generator().manual_seed(m)).cuda()
    _check(x, p, torch.float32)


@needs_cuda_op
@pytest.mark.parametrize("m", (5, 70))
@pytest.mark.parametrize("group_size", (64, 96, 4096), ids=lambda g: f"g{g}")
def test_int3_gemm_cuda_unusual_group_sizes(m, group_size):
    # k = 288 is 9 blocks: the GEMV's 8 split-K warps get uneven slices that start mid-group (96 = 3
    # blocks); 4096 > k is one group. m = 5 runs the GEMV, m = 70 the tiled GEMM with a ragged row tile.
    p = _packed(96, 288, group_size)
    x = torch.randn(m, 288, generator=torch.Generator().manual_seed(group_size + m)).cuda()
    _check(x, p, torch.float32)


@needs_cuda_op
def test_int3_gemm_cuda_extreme_codes_and_zeros():
    # All-7 codes make every qweight word -1; zeros 1 and 8 are both ends of the stored field.
    from comptrust.formats.int3 import pack_int3

    n, k = 96, 96
    zeros = torch.tensor([1, 8, 1]).repeat(n, 1)
    zeros[1::2] = torch.tensor([8, 1, 8])
    p = pack_int3(torch.full((n, k), 7), zeros, torch.full((n, 3), 0.01), 32)
    for m in (3, 40):
        _check(torch.randn(m, k, generator=torch.Generator().manual_seed(m)).cuda(), p, torch.float32)


@needs_cuda_op
def test_int3_gemm_cuda_many_rows():
    # More than 65535 row tiles of the GEMM (64 rows each): grid.x beyond the 65535 limit of grid.y/z.
    m = 65535 * 64 + 13
    p = _packed(32, 32, 32)
    x = torch.randn(m, 32, generator=torch.Generator().manual_seed(1)).cuda()
    _check(x, p, torch.float32)


@needs_cuda_op
@pytest.mark.parametrize("m", (7, 50))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_int3_gemm_cuda_unaligned_and_strided_x(dtype, m):
    n, k = 96, 160
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
def test_int3_gemm_cuda_deterministic_and_empty(m):
    p = _packed(576, 576, 128)
    qweight, qzeros, scales = _to_cuda(p)
    x = torch.randn(m, 576, generator=torch.Generator().manual_seed(5)).cuda()
    for xd in (x, x.bfloat16()):  # m = 118: the FMA and the tensor-core tiles
        y1 = torch.ops.comptrust.int3_gemm(xd, qweight, qzeros, scales, 128)
        y2 = torch.ops.comptrust.int3_gemm(xd, qweight, qzeros, scales, 128)
        assert torch.equal(y1, y2)  # split-K is reduced in a fixed order, no atomics
    empty = torch.ops.comptrust.int3_gemm(x[:0].half(), qweight, qzeros, scales, 128)
    assert empty.shape == (0, 576) and empty.dtype == torch.float16 and empty.is_cuda


@needs_cuda_op
def test_int3_gemm_cuda_through_public_wrapper():
    from comptrust import ops

    if not hasattr(ops, "int3_gemm"):
        pytest.skip("comptrust.ops has no int3_gemm wrapper")
    p = _packed(96, 160, 32)
    x = torch.randn(3, 160, generator=torch.Generator().manual_seed(6)).cuda()
    y = ops.int3_gemm(x, *_to_cuda(p), 32)
    ref = reference.int3_gemm(x.cpu(), p.qweight, p.qzeros, p.scales, 32)
    rel, worst = _errors(y, ref)
    assert y.is_cuda and rel <= TOL[torch.float32] and worst <= TOL[torch.float32]


def _bad_cases():
    """(name, build(x, qweight, qzeros, scales) -> args, error regex) on a valid m=3, n=64, k=96, g=32 call."""
    return [
        ("scales_fp32", lambda x, w, z, s: (x, w, z, s.float(), 32), "scales must be float16"),
        ("qweight_int64", lambda x, w, z, s: (x, w.long(), z, s, 32), "qweight must be int32"),
        ("qzeros_int16", lambda x, w, z, s: (x, w, z.short(), s, 32), "qzeros must be int32"),
        ("x_int", lambda x, w, z, s: (x.int(), w, z, s, 32), "x must be float32"),
        ("x_3d", lambda x, w, z, s: (x[None], w, z, s, 32), "x must be 2-D"),
        ("k_not_multiple_of_32", lambda x, w, z, s: (x[:, :80], w, z, s, 32), "k=80 .* multiple of 32"),
        ("k_mismatch", lambda x, w, z, s: (torch.cat([x, x[:, :32]], 1), w, z, s, 32),
         r"qweight is \[9, 64\] but x has k=128 \(expected \[12, n\]\)"),
        ("n_not_multiple_of_32", lambda x, w, z, s: (x, w[:, :48], z, s[:, :48], 32), "n=48 .* multiple of 32"),
        ("group_size_16", lambda x, w, z, s: (x, w, z, s, 16), "group_size=16"),
        ("group_size_0", lambda x, w, z, s: (x, w, z, s, 0), "group_size=0"),
        ("scales_for_other_group_size", lambda x, w, z, s: (x, w, z, s, 64), r"scales is \[3, 64\], expected \[2, 64\]"),
        ("qzeros_int4_shape", lambda x, w, z, s: (x, w, torch.zeros_like(z[:, :1]).repeat(1, 8), s, 32),
         r"qzeros is \[3, 8\], expected \[3, 6\]"),
        ("qweight_on_cpu", lambda x, w, z, s: (x, w.cpu(), z, s, 32), "one device"),
        ("scales_on_cpu", lambda x, w, z, s: (x, w, z, s.cpu(), 32), "one device"),
    ]


@needs_cuda_op
@pytest.mark.parametrize("name,build,message", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_int3_gemm_cuda_rejects_bad_inputs(name, build, message):
    p = _packed(64, 96, 32)
    x = torch.randn(3, 96).cuda()
    args = build(x, *_to_cuda(p))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.comptrust.int3_gemm(*args)
