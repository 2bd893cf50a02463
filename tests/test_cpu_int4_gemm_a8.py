"""w4a8: int4_gemm with activations quantized to int8 (csrc/cpu/gemm_tiled*.cpp, act_bits=8).

Against comptrust.reference.int4_gemm_a8, which quantizes x the same way in torch, the kernel differs
only by float summation order: bound 1e-5 relative (measured ~4e-7). Against the float-activation
reference the int8 rounding costs ~0.4% per element; bound 2% relative error over a whole output.
"""
import pytest
import torch

from comptrust import ops, reference
from comptrust.reference import quantize_activations_int8
from quant_cases import M_SIZES, MODEL_SHAPES, ODD_SHAPES, random_int4, rel_err


@pytest.fixture(params=["avx2", "scalar"])
def isa(request, monkeypatch):
    from comptrust import _C

    monkeypatch.setenv("COMPTRUST_CPU_ISA", request.param)
    try:
        _C.cpu_isa()
    except RuntimeError:
        pytest.skip(f"this CPU lacks {request.param}")
    return request.param


def _check(m, n, k, group_size, dtype=torch.float32, seed=0):
    packed, *_ = random_int4(n, k, group_size, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    args = (packed.qweight, packed.qzeros, packed.scales, group_size)
    y = ops.int4_gemm_a8(x, *args)
    assert y.shape == (m, n) and y.dtype == dtype
    err = rel_err(y, reference.int4_gemm_a8(x, *args))
    assert err < (1e-5 if dtype == torch.float32 else 8e-3), f"m={m} n={n} k={k} g={group_size}: {err:.2e}"
    assert rel_err(y, reference.int4_gemm(x, *args)) < 2e-2


@pytest.mark.parametrize("m", M_SIZES)
@pytest.mark.parametrize("n,k", ODD_SHAPES + MODEL_SHAPES)
def test_matches_reference(isa, m, n, k):
    _check(m, n, k, 128 if k >= 128 else 8, seed=m * 7 + n + k)


@pytest.mark.parametrize("group_size", [8, 24, 32, 64, 128, 200, 4096])
def test_group_sizes_blocks_restart_per_group(isa, group_size):
    _check(5, 40, 200, group_size)


def test_bf16_activations(isa):
    _check(3, 576, 576, 128, torch.bfloat16)


def test_random_sweep(isa):
    gen = torch.Generator().manual_seed(99)
    for case in range(30):
        m, n, k = (int(torch.randint(1, 20, (1,), generator=gen)), 8 * int(torch.randint(1, 30, (1,), generator=gen)),
                   8 * int(torch.randint(1, 60, (1,), generator=gen)))
        _check(m, n, k, 8 * int(torch.randint(1, 20, (1,), generator=gen)), seed=case)


def test_activation_quantization_blocks_and_ties():
    # k=80, group 40: blocks are [0,32) [32,40) [40,72) [72,80): a block never spans two groups.
    x = torch.zeros(1, 80)
    x[0, 31], x[0, 32], x[0, 79] = 2.0, -4.0, 1.0
    x8, scale, block = quantize_activations_int8(x, 40)
    assert block.tolist() == [0] * 32 + [1] * 8 + [2] * 32 + [3] * 8
    assert x8[0, 31] == 127 and x8[0, 32] == -127 and x8[0, 79] == 127
    assert scale[0, 0] == pytest.approx(2 / 127) and scale[0, 40] == 0  # an all-zero block
    # 127 * 0.5 / 1.0 = 63.5: half to even gives 64; the kernel must agree (checked through the product)
    x = torch.tensor([[1.0, 0.5] + [0.0] * 30])
    x8, _, _ = quantize_activations_int8(x, 32)
    assert x8[0, 1] == 64
    packed, *_ = random_int4(8, 32, 32)
    args = (packed.qweight, packed.qzeros, packed.scales, 32)
    assert rel_err(ops.int4_gemm_a8(x, *args), reference.int4_gemm_a8(x, *args)) < 1e-6


def test_zero_rows_and_bad_inputs():
    packed, *_ = random_int4(24, 40, 8)
    args = (packed.qweight, packed.qzeros, packed.scales, 8)
    assert torch.equal(ops.int4_gemm_a8(torch.zeros(2, 40), *args), torch.zeros(2, 24))
    assert ops.int4_gemm_a8(torch.zeros(0, 40), *args).shape == (0, 24)
    with pytest.raises(ValueError, match="k=48"):
        ops.int4_gemm_a8(torch.zeros(2, 48), *args)
    with pytest.raises((RuntimeError, ValueError), match="group_size=12"):
        torch.ops.comptrust.int4_gemm_a8(torch.zeros(2, 40), packed.qweight, packed.qzeros, packed.scales, 12)
