"""The Triton int4 GEMM (kernels/int4_gemm.py) against the pure-torch reference, run on CPU through
Triton's interpreter, plus the ahead-of-time PTX compile check.

Tolerance: relative Frobenius error ||y - y_ref|| / ||y_ref||, where y_ref is the fp32 product with the
dequantized weight (comptrust.reference.int4_gemm). fp32 activations only differ by summation order
(~1e-7 measured, bound 1e-5). fp16 activations round the dequantized weight to fp16 for tl.dot and the
output to fp16, each worth up to 2^-11 relative (~3e-4 measured, bound 2e-3). A wrong nibble, zero
point or group index gives errors of order 1, far above both bounds.
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
from quant_cases import random_int4, rel_err  # noqa: E402
from triton_cases import ROOT, env_without_interpret  # noqa: E402

COMPILE_CHECK = ROOT / "scripts" / "compile_check_triton.py"


def _load_kernel_module():
    # By path, so the kernel under test is this checkout's even when pytest imports an installed comptrust.
    spec = importlib.util.spec_from_file_location("_test_int4_gemm_kernel", ROOT / "kernels" / "int4_gemm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


K = _load_kernel_module()

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _random_packed(n: int, k: int, group_size: int, seed: int):
    return random_int4(n, k, group_size, seed)[0]


def _check(m, n, k, group_size, dtype, seed=0, x=None, **blocks):
    p = _random_packed(n, k, group_size, seed)
    if x is None:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    y = K.int4_gemm(x, p.qweight, p.qzeros, p.scales, group_size, **blocks)
    ref = reference.int4_gemm(x, p.qweight, p.qzeros, p.scales, group_size)
    assert y.shape == (x.shape[0], n) and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    err = rel_err(y, ref)
    assert err < TOL[x.dtype], f"m={x.shape[0]} n={n} k={k} group_size={group_size} {x.dtype}: rel err {err:.2e}"


# (n, k, group_size): per-group sizes 8 (per-row gather path), 32 and 128, per-channel (group_size == k),
# and k not divisible by the group size (136 = 4*32 + 8, 576 = 4*128 + 64: a partial last group).
SHAPES = [
    (24, 40, 8),
    (24, 40, 40),
    (200, 136, 32),
    (200, 136, 8),
    (200, 136, 136),
    (576, 576, 128),
    (576, 576, 32),
    (576, 576, 576),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n,k,group_size", SHAPES, ids=[f"n{n}-k{k}-g{g}" for n, k, g in SHAPES])
@pytest.mark.parametrize("m", [1, 3, 7, 13])
def test_matches_reference(m, n, k, group_size, dtype):
    _check(m, n, k, group_size, dtype, seed=m * 1000 + n + k + group_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_many_row_tiles(dtype):
    # m = 118 spans several BLOCK_M tiles with a ragged last one.
    _check(118, 200, 136, 32, dtype)


@pytest.mark.parametrize("group_size,block_k", [(24, 16), (32, 16), (128, 64), (40, 32), (16, 128)])
def test_block_overrides(group_size, block_k):
    # Forces both group paths with several k-tiles per group (32/16), a group size that is not a power
    # of two (24, 40 -> gather), and a tile wider than the group (16 with block_k 128 -> gather).
    _check(13, 72, 240, group_size, torch.float32, block_m=16, block_n=32, block_k=block_k)


def test_strided_activations():
    # x as a non-contiguous view (stride_xk = 2, stride_xm != k) must be read through its strides.
    base = torch.randn(5, 2 * 136, generator=torch.Generator().manual_seed(7))
    _check(5, 200, 136, 32, torch.float32, x=base[:, ::2])
    assert not base[:, ::2].is_contiguous()


def test_negative_words_and_extreme_codes():
    # All-15 codes set bit 31 of every qweight word (negative int32); the kernel's arithmetic shift
    # must not leak the sign into the nibbles. Zeros of 1 and 16 hit both ends of the stored nibble.
    n, k, gs = 64, 64, 32
    codes = torch.full((n, k), 15)
    zeros = torch.tensor([1, 16]).repeat(n, 1)
    scales = torch.full((n, 2), 0.01)
    p = pack_int4(codes, zeros, scales, gs)
    assert (p.qweight < 0).all()
    x = torch.randn(3, k)
    y = K.int4_gemm(x, p.qweight, p.qzeros, p.scales, gs)
    ref = reference.int4_gemm(x, p.qweight, p.qzeros, p.scales, gs)
    assert rel_err(y, ref) < TOL[torch.float32]


def test_empty_batch():
    p = _random_packed(24, 40, 8, 0)
    y = K.int4_gemm(torch.empty(0, 40), p.qweight, p.qzeros, p.scales, 8)
    assert y.shape == (0, 24)


@pytest.fixture(scope="module")
def packed():
    return _random_packed(24, 40, 8, 0)


def test_rejects_k_mismatch(packed):
    with pytest.raises(ValueError, match="k=48"):
        K.int4_gemm(torch.randn(2, 48), packed.qweight, packed.qzeros, packed.scales, 8)


def test_rejects_k_not_multiple_of_8():
    with pytest.raises(ValueError, match="k=36"):
        K.int4_gemm(torch.randn(2, 36), torch.zeros(4, 8, dtype=torch.int32), torch.zeros(5, 1, dtype=torch.int32),
                    torch.ones(5, 8, dtype=torch.float16), 8)


def test_rejects_n_not_multiple_of_8():
    with pytest.raises(ValueError, match="n=12"):
        K.int4_gemm(torch.randn(2, 16), torch.zeros(2, 12, dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32),
                    torch.ones(2, 12, dtype=torch.float16), 8)


@pytest.mark.parametrize("group_size", [0, -8, 12])
def test_rejects_bad_group_size(packed, group_size):
    with pytest.raises(ValueError, match=f"group_size={group_size}"):
        K.int4_gemm(torch.randn(2, 40), packed.qweight, packed.qzeros, packed.scales, group_size)


def test_rejects_group_count_mismatch(packed):
    # Tensors packed for group_size 8 (5 groups) used as group_size 16 (3 groups).
    with pytest.raises(ValueError, match="group_size=16"):
        K.int4_gemm(torch.randn(2, 40), packed.qweight, packed.qzeros, packed.scales, 16)


def test_rejects_dtypes(packed):
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        K.int4_gemm(torch.randn(2, 40).double(), packed.qweight, packed.qzeros, packed.scales, 8)
    with pytest.raises(ValueError, match="int32"):
        K.int4_gemm(torch.randn(2, 40), packed.qweight.long(), packed.qzeros, packed.scales, 8)
    with pytest.raises(ValueError, match="float16"):
        K.int4_gemm(torch.randn(2, 40), packed.qweight, packed.qzeros, packed.scales.float(), 8)


def test_rejects_bad_rank(packed):
    with pytest.raises(ValueError, match=r"\[m, k\]"):
        K.int4_gemm(torch.randn(2, 1, 40), packed.qweight, packed.qzeros, packed.scales, 8)


def test_rejects_mixed_devices(packed):
    with pytest.raises(ValueError, match="share a device"):
        K.int4_gemm(torch.randn(2, 40, device="meta"), packed.qweight, packed.qzeros, packed.scales, 8)


def test_rejects_bad_block(packed):
    with pytest.raises(ValueError, match="block_m=8"):
        K.int4_gemm(torch.randn(2, 40), packed.qweight, packed.qzeros, packed.scales, 8, block_m=8)



def test_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import importlib.util, torch\n"
        f"spec = importlib.util.spec_from_file_location('k', {str(ROOT / 'kernels' / 'int4_gemm.py')!r})\n"
        "k = importlib.util.module_from_spec(spec); spec.loader.exec_module(k)\n"
        "from comptrust.formats import pack_int4\n"
        "p = pack_int4(torch.zeros(8, 16, dtype=torch.int64), torch.ones(8, 1, dtype=torch.int64), torch.ones(8, 1), 16)\n"
        "try:\n"
        "    k.int4_gemm(torch.randn(1, 16), p.qweight, p.qzeros, p.scales, 16)\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env_without_interpret(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ValueError:" in out.stdout and "TRITON_INTERPRET=1" in out.stdout


def test_aot_compile_check_script(triton_compile_check):
    out = triton_compile_check
    assert out.returncode == 0, out.stdout + out.stderr
    assert "kernels/int4_gemm.py sm_80" in out.stdout
    sizes = [int(line.split("PTX ")[1].split()[0]) for line in out.stdout.splitlines() if "PTX " in line]
    assert sizes and all(s > 1000 for s in sizes), out.stdout


def test_aot_compile_check_script_reports_compile_errors(tmp_path):
    # The script checks the kernels/ beside its own scripts/ folder, so a copy in a scratch tree with a
    # kernel that the real compiler rejects (tl.dot needs K >= 16) must fail loudly.
    (tmp_path / "scripts").mkdir()
    (tmp_path / "kernels").mkdir()
    (tmp_path / "scripts" / COMPILE_CHECK.name).write_text(COMPILE_CHECK.read_text())
    (tmp_path / "kernels" / "broken.py").write_text(
        "import triton, triton.language as tl\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "@triton.jit\n"
        "def broken_kernel(p):\n"
        "    a = tl.load(p + tl.arange(0, 16)[:, None] * 8 + tl.arange(0, 8)[None, :])\n"
        "    tl.store(p + tl.arange(0, 16)[:, None] * 16 + tl.arange(0, 16)[None, :], tl.dot(a, tl.trans(a)))\n"
        "def aot_compile_ptx(arch=80):\n"
        "    src = ASTSource(fn=broken_kernel, signature={'p': '*fp16'})\n"
        "    return triton.compile(src, target=GPUTarget('cuda', arch, 32)).asm['ptx']\n"
    )
    (tmp_path / "kernels" / "unchecked.py").write_text(
        "import triton\n@triton.jit\ndef unchecked_kernel(p):\n    pass\n"
    )
    out = subprocess.run([sys.executable, str(tmp_path / "scripts" / COMPILE_CHECK.name)],
                         env=env_without_interpret(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "kernels/broken.py sm_80" in out.stderr and "compile error" in out.stderr
    assert "kernels/unchecked.py: defines Triton kernels but no aot_compile_ptx" in out.stderr
