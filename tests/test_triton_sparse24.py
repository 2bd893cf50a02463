"""The Triton 2:4 sparse GEMMs (kernels/sparse24_gemm.py) against the pure-torch reference, run on CPU
through Triton's interpreter, plus the ahead-of-time PTX compile check.

Metric: relative Frobenius error ||y - y_ref|| / ||y_ref|| and the largest elementwise error relative to
max |y_ref|, where y_ref is the fp32 product with the dense (dequantized) weight, comptrust.reference. Both
must stay under TOL[x dtype] (measured worst Frobenius / elementwise over this file's cases in brackets):
  fp32  1e-5  only the summation order differs; fp16/bf16 values widen exactly (2e-7 / 4e-7)
  fp16  2e-3  the weight is rounded to fp16 for tl.dot when it is not fp16 already (fp32 values, int4
              dequantized in fp32), and y to fp16 like the reference's, each <= 2^-11 relative
              (3.5e-4 / 8.4e-4; fp16 values 5e-6 / 2e-5)
  bf16  2e-2  the same with bf16's 2^-8 spacing, and Triton 3.9's interpreter converts fp32 to bf16 by
              truncation rather than round-to-nearest (also with fp_downcast_rounding="rtne"), which about
              doubles the error a GPU would show (7e-3 / 1.1e-2)
A wrong meta nibble, kept-value index, zero point or group gives errors of order 1, far above these.

bf16 under the interpreter: Triton 3.9's interpreter also computes bf16 tl.dot wrongly (errors ~1e9), so
the kernels widen the (already bf16-rounded) operands to fp32 there (see _dot_acc); the GPU path keeps the
bf16 dot and is covered by the PTX compile check.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

# triton.jit picks the interpreter when the decorator runs, so this must precede loading the kernel module.
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from comptrust import reference  # noqa: E402
from comptrust.formats import pack_int4  # noqa: E402
from comptrust.formats.sparse24 import Sparse24Int4Packed  # noqa: E402
from sparse24_cases import errors, int4_args, random_sparse24, random_sparse24_int4  # noqa: E402
from triton_cases import ROOT, env_without_interpret  # noqa: E402

KERNEL_PATH = ROOT / "kernels" / "sparse24_gemm.py"


def _load_kernel_module():
    # By path, so the kernel under test is this checkout's even when pytest imports an installed comptrust.
    spec = importlib.util.spec_from_file_location("_test_sparse24_gemm_kernel", KERNEL_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


K = _load_kernel_module()

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
M_SIZES = (1, 3, 7, 13, 33)  # 33: a second BLOCK_M tile with a ragged end
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _assert_close(y, ref, x, what):
    assert y.shape == ref.shape and y.dtype == x.dtype, f"{what}: {y.shape} {y.dtype}"
    assert torch.isfinite(y).all(), what
    rel, worst = errors(y, ref)
    tol = TOL[x.dtype]
    assert rel <= tol and worst <= tol, f"{what} {x.dtype}: rel err {rel:.2e}, max err {worst:.2e} (tol {tol:g})"


def _check_fp(x, p, **blocks):
    y = K.sparse24_gemm(x, p.values, p.meta, **blocks)
    ref = reference.sparse24_gemm(x, p.values, p.meta)
    _assert_close(y, ref, x, f"sparse24_gemm m={x.shape[0]} n={p.out_features} k={p.in_features} "
                             f"values {p.values.dtype}")


def _check_int4(x, p, **blocks):
    y = K.sparse24_int4_gemm(x, *int4_args(p), **blocks)
    ref = reference.sparse24_int4_gemm(x, *int4_args(p))
    _assert_close(y, ref, x, f"sparse24_int4_gemm m={x.shape[0]} n={p.out_features} k={p.in_features} "
                             f"group_size={p.group_size}")


# ------------------------------------------------------------------------------------------- float values
# (n, k): n not a power of two; k = 8 (one meta byte per row, a single partial tile), 24, 40, 136
# (several k-tiles at BLOCK_K 64 with a partial last one).
FP_SHAPES = ((24, 8), (40, 24), (200, 40), (24, 136), (200, 136))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n,k", FP_SHAPES, ids=[f"n{n}-k{k}" for n, k in FP_SHAPES])
@pytest.mark.parametrize("m", M_SIZES, ids=lambda m: f"m{m}")
def test_sparse24_gemm_matches_reference(m, n, k, dtype):
    seed = m * 1000 + n + k
    _check_fp(_x(m, k, dtype, seed), random_sparse24(n, k, seed, dtype))


# Values of another dtype than x: fp32 values with half activations (rounded to x's dtype for tl.dot),
# half values with fp32 activations (widened exactly).
MIXED = ((torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.float16),
         (torch.float32, torch.bfloat16), (torch.float32, torch.float16))


@pytest.mark.parametrize("x_dtype,values_dtype", MIXED,
                         ids=[f"x{DTYPE_IDS[a]}-v{DTYPE_IDS[b]}" for a, b in MIXED])
@pytest.mark.parametrize("m", (1, 13))
def test_sparse24_gemm_mixed_value_dtypes(m, x_dtype, values_dtype):
    _check_fp(_x(m, 136, x_dtype, m), random_sparse24(40, 136, m + 1, values_dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_sparse24_gemm_real_shape(dtype):
    # SmolLM2-135M's attention projection (576 x 576) at decode size.
    _check_fp(_x(1, 576, dtype, 5), random_sparse24(576, 576, 6, dtype))


@pytest.mark.parametrize("block_k", (16, 32, 128))
def test_sparse24_gemm_block_overrides(block_k):
    # 16: one meta byte pair per tile, nine tiles; 128: one tile wider than k.
    _check_fp(_x(13, 136, torch.float32, 7), random_sparse24(72, 136, 8), block_m=16, block_n=32, block_k=block_k)


def test_sparse24_gemm_strided_activations():
    base = torch.randn(5, 2 * 136, generator=torch.Generator().manual_seed(9))
    x = base[:, ::2]
    assert not x.is_contiguous()
    _check_fp(x, random_sparse24(40, 136, 10))


def test_sparse24_gemm_empty_batch():
    p = random_sparse24(24, 40, 0)
    y = K.sparse24_gemm(torch.empty(0, 40), p.values, p.meta)
    assert y.shape == (0, 24)


# --------------------------------------------------------------------------------------------- int4 values
# (n, k, group_size in kept values): k a multiple of 16; groups of 8 and 24 (narrower than / not dividing
# a tile's kept values: per-row gather), 16 and 32 (whole tiles), 128 on k/2 = 136 (a partial last group),
# 24 on k/2 = 72 (three groups), and -1 = one group per row.
INT4_SHAPES = ((24, 16, 8), (40, 48, 24), (200, 144, 8), (200, 144, 16), (40, 272, 32), (40, 272, 128),
               (200, 144, -1))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n,k,group_size", INT4_SHAPES, ids=[f"n{n}-k{k}-g{g}" for n, k, g in INT4_SHAPES])
@pytest.mark.parametrize("m", M_SIZES, ids=lambda m: f"m{m}")
def test_sparse24_int4_gemm_matches_reference(m, n, k, group_size, dtype):
    seed = m * 1000 + n + k + group_size
    _check_int4(_x(m, k, dtype, seed), random_sparse24_int4(n, k, group_size, seed))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_sparse24_int4_gemm_real_shape(dtype):
    _check_int4(_x(1, 576, dtype, 11), random_sparse24_int4(576, 576, 128, 12))


@pytest.mark.parametrize("group_size,block_k", [(8, 16), (16, 32), (24, 16), (32, 16), (32, 128), (40, 64)])
def test_sparse24_int4_gemm_block_overrides(group_size, block_k):
    # Even path with several tiles per group (8/16, 16/32, 24/16, 32/16) and the gather path with a tile
    # wider than a group (32/128) or a group that does not divide the tile (40/64).
    p = random_sparse24_int4(72, 240, group_size, 13)
    _check_int4(_x(13, 240, torch.float32, 14), p, block_m=16, block_n=32, block_k=block_k)


def test_sparse24_int4_gemm_negative_words_and_extreme_zeros():
    # All-15 codes set bit 31 of every qweight word (negative int32): the arithmetic shift must not leak
    # the sign into the codes. Zero points 1 and 16 hit both ends of the stored nibble.
    n, k, gs = 64, 128, 32
    meta = random_sparse24(n, k, 15).meta
    codes = torch.full((n, k // 2), 15)
    zeros = torch.tensor([1, 16]).repeat(n, 1)
    p = Sparse24Int4Packed(pack_int4(codes, zeros, torch.full((n, 2), 0.01), gs), meta)
    assert (p.qvalues.qweight < 0).all()
    _check_int4(_x(3, k, torch.float32, 16), p)


def test_sparse24_int4_gemm_strided_activations_and_empty_batch():
    p = random_sparse24_int4(40, 144, 24, 17)
    base = torch.randn(5, 2 * 144, generator=torch.Generator().manual_seed(18))
    _check_int4(base[:, ::2], p)
    y = K.sparse24_int4_gemm(torch.empty(0, 144), *int4_args(p))
    assert y.shape == (0, 40)


# ---------------------------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def fp_packed():
    return random_sparse24(24, 40, 0)


@pytest.fixture(scope="module")
def int4_packed():
    return random_sparse24_int4(24, 48, 8, 0)


def test_sparse24_gemm_rejects_bad_inputs(fp_packed):
    v, meta = fp_packed.values, fp_packed.meta
    cases = [
        ((torch.randn(2, 40).double(), v, meta), "x must be float32, bfloat16 or float16"),
        ((torch.randn(2, 40), v.double(), meta), "values must be float32, bfloat16 or float16"),
        ((torch.randn(2, 40), v, meta.to(torch.int32)), "meta must be uint8"),
        ((torch.randn(2, 40), v, meta[:, :4]), r"meta is \(24, 4\), expected \[n=24, k/8=5\]"),
        ((torch.randn(2, 40), v, meta[:12]), r"meta is \(12, 5\)"),
        ((torch.randn(2, 48), v, meta), r"values is \(24, 20\), expected \[n, k/2=24\]"),
        ((torch.randn(2, 36), v, meta), "k=36"),
        ((torch.randn(2, 1, 40), v, meta), r"x must be 2-D \[m, k\]"),
        ((torch.randn(2, 40), v[None], meta), r"values must be 2-D \[n, k/2\]"),
        ((torch.randn(2, 40, device="meta"), v, meta), "must share a device"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            K.sparse24_gemm(*args)


def test_sparse24_int4_gemm_rejects_bad_inputs(int4_packed):
    qw, qz, sc, meta, gs = int4_args(int4_packed)
    x = torch.randn(2, 48)
    cases = [
        ((x.double(), qw, qz, sc, meta, gs), "x must be float32, bfloat16 or float16"),
        ((x, qw.long(), qz, sc, meta, gs), "int32"),
        ((x, qw, qz, sc.float(), meta, gs), "float16"),
        ((x, qw, qz, sc, meta.to(torch.int32), gs), "meta must be uint8"),
        ((x, qw, qz, sc, meta[:, :4], gs), r"meta is \(24, 4\), expected \[n=24, k/8=6\]"),
        ((torch.randn(2, 40), qw, qz, sc, meta, gs), "k=40 must be a multiple of 16"),
        ((torch.randn(2, 64), qw, qz, sc, meta, gs), "k/2=32"),
        ((x, qw, qz, sc, meta, 12), "group_size=12"),
        ((x, qw, qz, sc, meta, 16), "group_size=16"),  # tensors packed for 8 (3 groups), used as 16
        ((x, qw, qz, sc, meta, 0), "group_size=0"),
        ((x, qw, qz, sc, meta.to("meta"), gs), "must share a device"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            K.sparse24_int4_gemm(*args)


def test_rejects_bad_block(fp_packed, int4_packed):
    with pytest.raises(ValueError, match="block_m=8"):
        K.sparse24_gemm(torch.randn(2, 40), fp_packed.values, fp_packed.meta, block_m=8)
    with pytest.raises(ValueError, match="block_k=48"):
        K.sparse24_int4_gemm(torch.randn(2, 48), *int4_args(int4_packed), block_k=48)


# ------------------------------------------------------------------------------- without the interpreter

def test_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import importlib.util, torch\n"
        f"spec = importlib.util.spec_from_file_location('k', {str(KERNEL_PATH)!r})\n"
        "k = importlib.util.module_from_spec(spec); spec.loader.exec_module(k)\n"
        "from comptrust.formats.sparse24 import pack_sparse24, pack_sparse24_int4\n"
        "w = torch.zeros(8, 16)\n"
        "p, q = pack_sparse24(w), pack_sparse24_int4(w, 8)\n"
        "calls = (lambda: k.sparse24_gemm(torch.randn(1, 16), p.values, p.meta),\n"
        "         lambda: k.sparse24_int4_gemm(torch.randn(1, 16), q.qvalues.qweight, q.qvalues.qzeros,\n"
        "                                      q.qvalues.scales, q.meta, 8))\n"
        "for call in calls:\n"
        "    try:\n"
        "        call()\n"
        "    except ValueError as e:\n"
        "        print('ValueError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env_without_interpret(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("ValueError:")]
    assert len(lines) == 2 and all("TRITON_INTERPRET=1" in line for line in lines), out.stdout
    assert "sparse24_gemm (Triton)" in lines[0] and "sparse24_int4_gemm (Triton)" in lines[1]


def test_aot_compile_check_script(triton_compile_check):
    out = triton_compile_check
    assert out.returncode == 0, out.stdout + out.stderr
    ours = [line for line in out.stdout.splitlines() if "kernels/sparse24_gemm.py sm_80" in line]
    assert len(ours) == len(K.AOT_CONFIGS), out.stdout
    assert all(line.startswith("ok ") and int(line.split("PTX ")[1].split()[0]) > 1000 for line in ours), out.stdout
