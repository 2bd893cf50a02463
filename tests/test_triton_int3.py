"""The Triton int3 GEMM (kernels/int3_gemm.py) against the pure-torch reference, run on CPU through
Triton's interpreter, plus its ahead-of-time PTX compile check.

Tolerance: relative Frobenius error ||y - y_ref|| / ||y_ref||, where y_ref is the fp32 product with the
dequantized weight (comptrust.reference.int3_gemm). The kernel builds the same fp32 weight, so fp32
activations differ only by summation order (~2e-7 measured, bound 1e-5). fp16 activations round the weight
to fp16 for tl.dot and the output to fp16, each worth up to 2^-11 relative (~2e-4 measured, bound 2e-3).
A wrong 3-bit field, zero point or group index gives errors of order 1, far above both bounds; the
one-hot test below checks every field position exactly.
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
from comptrust.formats.int3 import dequantize_int3, pack_int3  # noqa: E402
from quant_cases import random_int3, rel_err  # noqa: E402
from triton_cases import ROOT, env_without_interpret  # noqa: E402



def _load_kernel_module():
    # By path, so the kernel under test is this checkout's even when pytest imports an installed comptrust.
    spec = importlib.util.spec_from_file_location("_test_int3_gemm_kernel", ROOT / "kernels" / "int3_gemm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


K = _load_kernel_module()

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _check(m, n, k, group_size, dtype, seed=0, x=None, **blocks):
    p = random_int3(n, k, group_size, seed)[0]
    if x is None:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    y = K.int3_gemm(x, p.qweight, p.qzeros, p.scales, group_size, **blocks)
    ref = reference.int3_gemm(x, p.qweight, p.qzeros, p.scales, group_size)
    assert y.shape == (x.shape[0], n) and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    err = rel_err(y, ref)
    assert err < TOL[x.dtype], f"m={x.shape[0]} n={n} k={k} group_size={group_size} {x.dtype}: rel err {err:.2e}"


# (n, k, group_size), small enough for the interpreter: one block each way; n = 96 (not a multiple of the
# 64-column tile); group sizes 32, 64 with a partial last group (160 = 2*64 + 32), 96 (not a power of
# two: 3 groups, the last partial) and per-channel (group_size == k, and > k).
SHAPES = [
    (32, 32, 32),
    (96, 160, 32),
    (96, 160, 64),
    (96, 160, 160),
    (64, 224, 96),
    (32, 96, 256),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n,k,group_size", SHAPES, ids=[f"n{n}-k{k}-g{g}" for n, k, g in SHAPES])
@pytest.mark.parametrize("m", [1, 3, 13])
def test_matches_reference(m, n, k, group_size, dtype):
    _check(m, n, k, group_size, dtype, seed=m * 1000 + n + k + group_size)


# SmolLM2-135M layer shapes (q/o with w3g128, k/v per-channel); ~1-2 s each in the interpreter.
@pytest.mark.parametrize("m,n,k,group_size,dtype", [
    (1, 576, 576, 128, torch.float16),
    (7, 576, 576, 128, torch.float32),
    (3, 192, 576, 576, torch.float16),
], ids=["q-m1-g128-fp16", "q-m7-g128-fp32", "kv-m3-channel-fp16"])
def test_model_shapes(m, n, k, group_size, dtype):
    _check(m, n, k, group_size, dtype, seed=m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_many_row_tiles(dtype):
    # m = 118 spans two BLOCK_M tiles with a ragged last one.
    _check(118, 96, 160, 32, dtype)


@pytest.mark.parametrize("group_size,block_k", [(32, 128), (96, 64), (32, 16), (64, 64)])
def test_block_overrides(group_size, block_k):
    # 128 and 64 on groups of 32 and 96: tiles wider than or misaligned with a group (per-row gather path);
    # 16: half a 3-word block per k-tile; 64 on 64: the one-group-per-tile path with 2 blocks per tile.
    _check(13, 64, 288, group_size, torch.float32, block_m=16, block_n=32, block_k=block_k)


def test_every_field_position_exactly():
    # x = identity rows make y = W^T column by column. With power-of-two scales every product and sum is
    # exact, so y must equal the dequantized weight bit for bit: a field read from the wrong bits (values
    # 10 and 21 straddle two words) or the wrong zero point cannot hide inside a tolerance.
    n, k, gs = 64, 64, 32
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 8, (n, k), generator=g)
    zeros = torch.randint(1, 9, (n, 2), generator=g)
    scales = 2.0 ** torch.randint(-4, 2, (n, 2), generator=g).float()
    p = pack_int3(codes, zeros, scales, gs)
    y = K.int3_gemm(torch.eye(k), p.qweight, p.qzeros, p.scales, gs)
    assert torch.equal(y, dequantize_int3(p).t())
    assert torch.equal(y, ((codes - zeros.repeat_interleave(gs, 1)) * scales.repeat_interleave(gs, 1)).t().float())


def test_negative_words_and_extreme_codes():
    # All-7 codes set every bit of every qweight word (-1 as int32): a logical/arithmetic shift mix-up would
    # leak the sign into the straddling fields. Zeros of 1 and 8 (stored 0 and 7) hit both ends of the field,
    # and the second layer alternates codes 0 and 7 so neighbouring fields differ.
    n, k, gs = 64, 96, 32
    zeros = torch.tensor([1, 8, 8]).repeat(n, 1)
    zeros[1::2] = torch.tensor([8, 1, 1])
    scales = torch.full((n, 3), 0.01)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(4))
    for codes in (torch.full((n, k), 7), (torch.arange(k) % 2 * 7).repeat(n, 1)):
        p = pack_int3(codes, zeros, scales, gs)
        assert (p.qweight < 0).any()
        y = K.int3_gemm(x, p.qweight, p.qzeros, p.scales, gs)
        ref = reference.int3_gemm(x, p.qweight, p.qzeros, p.scales, gs)
        assert rel_err(y, ref) < TOL[torch.float32]
    assert (pack_int3(torch.full((n, k), 7), zeros, scales, gs).qweight == -1).all()


def test_strided_activations():
    # x as a non-contiguous view (stride_xk = 2, stride_xm != k) must be read through its strides.
    base = torch.randn(5, 2 * 160, generator=torch.Generator().manual_seed(7))
    _check(5, 96, 160, 32, torch.float32, x=base[:, ::2])
    assert not base[:, ::2].is_contiguous()


def test_empty_batch():
    p = random_int3(32, 64, 32)[0]
    y = K.int3_gemm(torch.empty(0, 64, dtype=torch.float16), p.qweight, p.qzeros, p.scales, 32)
    assert y.shape == (0, 32) and y.dtype == torch.float16


# -------------------------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def packed():
    return random_int3(32, 64, 32)[0]  # k = 64: qweight [6, 32], qzeros [2, 3], scales [2, 32]


def test_rejects_k_mismatch(packed):
    with pytest.raises(ValueError, match=r"qweight is \(6, 32\) but x has k=96 \(expected \[9, n\]\)"):
        K.int3_gemm(torch.randn(2, 96), packed.qweight, packed.qzeros, packed.scales, 32)


def test_rejects_k_not_multiple_of_32(packed):
    with pytest.raises(ValueError, match="k=40 .* multiple of 32"):
        K.int3_gemm(torch.randn(2, 40), packed.qweight, packed.qzeros, packed.scales, 32)


def test_rejects_n_not_multiple_of_32():
    with pytest.raises(ValueError, match="n=24 .* multiple of 32"):
        K.int3_gemm(torch.randn(2, 32), torch.zeros(3, 24, dtype=torch.int32), torch.zeros(1, 3, dtype=torch.int32),
                    torch.ones(1, 24, dtype=torch.float16), 32)


@pytest.mark.parametrize("group_size", [0, -32, 16, 48])
def test_rejects_bad_group_size(packed, group_size):
    with pytest.raises(ValueError, match=f"group_size={group_size} must be a positive multiple of 32"):
        K.int3_gemm(torch.randn(2, 64), packed.qweight, packed.qzeros, packed.scales, group_size)


def test_rejects_group_count_mismatch(packed):
    # Tensors packed for group_size 32 (2 groups) used as per-channel (1 group).
    with pytest.raises(ValueError, match=r"scales is \(2, 32\), expected \[1, 32\] .*group_size=64"):
        K.int3_gemm(torch.randn(2, 64), packed.qweight, packed.qzeros, packed.scales, 64)


def test_rejects_qzeros_shape(packed):
    # An int4-style qzeros ([groups, n/8]) for int3 weights.
    with pytest.raises(ValueError, match=r"qzeros is \(2, 4\), expected \[2, 3\]"):
        K.int3_gemm(torch.randn(2, 64), packed.qweight, torch.zeros(2, 4, dtype=torch.int32), packed.scales, 32)


def test_rejects_dtypes(packed):
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        K.int3_gemm(torch.randn(2, 64).double(), packed.qweight, packed.qzeros, packed.scales, 32)
    with pytest.raises(ValueError, match="qweight must be int32"):
        K.int3_gemm(torch.randn(2, 64), packed.qweight.long(), packed.qzeros, packed.scales, 32)
    with pytest.raises(ValueError, match="qzeros must be int32"):
        K.int3_gemm(torch.randn(2, 64), packed.qweight, packed.qzeros.short(), packed.scales, 32)
    with pytest.raises(ValueError, match="scales must be float16"):
        K.int3_gemm(torch.randn(2, 64), packed.qweight, packed.qzeros, packed.scales.float(), 32)


def test_rejects_bad_rank(packed):
    with pytest.raises(ValueError, match=r"x must be 2-D \[m, k\]"):
        K.int3_gemm(torch.randn(2, 1, 64), packed.qweight, packed.qzeros, packed.scales, 32)
    with pytest.raises(ValueError, match=r"qweight must be 2-D \[k/32\*3, n\]"):
        K.int3_gemm(torch.randn(2, 64), packed.qweight.flatten(), packed.qzeros, packed.scales, 32)


def test_rejects_mixed_devices(packed):
    with pytest.raises(ValueError, match="share a device"):
        K.int3_gemm(torch.randn(2, 64, device="meta"), packed.qweight, packed.qzeros, packed.scales, 32)


def test_rejects_bad_block(packed):
    with pytest.raises(ValueError, match="block_k=24"):
        K.int3_gemm(torch.randn(2, 64), packed.qweight, packed.qzeros, packed.scales, 32, block_k=24)


# -------------------------------------------------------------------------------- without the interpreter

def test_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import importlib.util, torch\n"
        f"spec = importlib.util.spec_from_file_location('k', {str(ROOT / 'kernels' / 'int3_gemm.py')!r})\n"
        "k = importlib.util.module_from_spec(spec); spec.loader.exec_module(k)\n"
        "w, z, s = torch.zeros(3, 32, dtype=torch.int32), torch.zeros(1, 3, dtype=torch.int32), "
        "torch.ones(1, 32, dtype=torch.float16)\n"
        "try:\n"
        "    k.int3_gemm(torch.randn(1, 32), w, z, s, 32)\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env_without_interpret(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ValueError:" in out.stdout and "TRITON_INTERPRET=1" in out.stdout


def test_aot_compile_check_covers_int3(triton_compile_check):
    # Every AOT_CONFIGS variant (both group paths, fp16/bf16/fp32) lowers to PTX for sm_80.
    out = triton_compile_check
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if "kernels/int3_gemm.py sm_80" in line]
    assert len(lines) == len(K.AOT_CONFIGS), out.stdout
    assert all(line.startswith("ok") and int(line.split("PTX ")[1].split()[0]) > 1000 for line in lines), out.stdout
