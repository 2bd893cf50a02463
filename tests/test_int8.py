"""int8 weights: the GPTQ v1 bits=8 layout (comptrust.formats.int8), its CPU tiles and the tiled kernel's int8
paths (direct for batch < 8, dequantized panel from 8, dequantized blocks through torch's GEMM from 64),
QuantLinear and RTN at 8 bits.

Float activations differ from the dequantized reference only by summation order (bound 1e-5 relative); a
wrong byte, zero offset, scale or group gives errors of order 1.
"""
import pytest
import torch
import torch.nn as nn

from comptrust import ops, reference
from comptrust.compress import RTNConfig, compress_, config_from_tag
from comptrust.compress.rtn import quantize_rtn
from comptrust.formats import from_gptq_tensors, to_gptq_tensors
from comptrust.formats.cpu_tiles import tile, untile
from comptrust.formats.int8 import Int8Packed, dequantize_int8, pack_int8, unpack_int8
from comptrust.nn import QuantLinear
from quant_cases import MODEL_SHAPES, random_int8, rel_err

ODD_SHAPES = ((8, 4), (24, 36), (200, 132), (40, 100), (16, 1028))
M_SIZES = (1, 2, 3, 5, 8, 13, 70)


def _check(m, n, k, group_size, dtype=torch.float32, seed=0, tol=1e-5):
    packed = random_int8(n, k, group_size, seed)[0]
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    y = ops.gemm_tiled(x, tile(packed))
    assert y.shape == (m, n) and y.dtype == dtype
    ref = reference.int8_gemm(x, packed.qweight, packed.qzeros, packed.scales, group_size)
    err = rel_err(y, ref)
    assert err < tol, f"int8 m={m} n={n} k={k} g={group_size} {dtype}: rel err {err:.2e}"


# ------------------------------------------------------------------------------------------ format
def test_bytes_sit_where_gptq_v1_puts_them():
    # Row 4r+i of column j in bits 8i..8i+7 of qweight[r, j]; zero-1 of column j in byte j%4 of qzeros[g, j/4].
    codes = torch.zeros(8, 8, dtype=torch.int64)
    codes[3, 6] = 0xAB                                   # column 3, input 6: word row 1, byte 2
    packed = pack_int8(codes, torch.ones(8, 2, dtype=torch.int64), torch.ones(8, 2), 4)
    assert packed.qweight[1, 3].item() & 0xFFFFFFFF == 0xAB << 16
    zeros = torch.tensor([[1], [2], [256], [17]])
    packed = pack_int8(torch.zeros(4, 4, dtype=torch.int64), zeros, torch.ones(4, 1), 4)
    assert packed.qzeros[0, 0].item() & 0xFFFFFFFF == 0 | (1 << 8) | (255 << 16) | (16 << 24)


@pytest.mark.parametrize("group_size", [4, 32, 128, "channel"])
def test_pack_unpack_and_tiles_are_bit_exact(group_size):
    n, k = 200, 260
    g = k if group_size == "channel" else group_size
    packed, codes, zeros, scales = random_int8(n, k, g, seed=3)
    got_codes, got_zeros, got_scales = unpack_int8(packed)
    assert torch.equal(got_codes.long(), codes) and torch.equal(got_zeros.long(), zeros)
    assert torch.equal(got_scales, scales.half())
    back = untile(tile(packed))
    assert isinstance(back, Int8Packed)
    for name in ("qweight", "qzeros", "scales"):
        assert torch.equal(getattr(back, name), getattr(packed, name)), name


def test_gptq_tensors_round_trip_with_act_order():
    packed = random_int8(64, 96, 32, seed=5)[0]
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(0))
    g_idx = torch.empty(96, dtype=torch.int32)
    g_idx[perm] = (torch.arange(96) // 32).to(torch.int32)
    tensors = to_gptq_tensors(packed, 8)
    tensors["g_idx"] = g_idx
    imported, got_perm, _ = from_gptq_tensors(tensors, 8, 32, 96, 64, "layer")
    exported = to_gptq_tensors(imported, 8, perm=got_perm)
    for key in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(exported[key], tensors[key]), key


@pytest.mark.parametrize("change,message", [
    (lambda t: t.update(qweight=t["qweight"][:-1]), r"layer.qweight: expected \[24, 64\] int32"),
    (lambda t: t.update(qzeros=t["qzeros"][:, :-1]), r"layer.qzeros: expected \[3, 16\] int32"),
    (lambda t: t.update(scales=t["scales"].float()), r"layer.scales: expected \[3, 64\] float16"),
])
def test_malformed_int8_tensors_are_named(change, message):
    tensors = to_gptq_tensors(random_int8(64, 96, 32)[0], 8)
    change(tensors)
    with pytest.raises(ValueError, match=message):
        from_gptq_tensors(tensors, 8, 32, 96, 64, "layer")


def test_pack_rejects_out_of_range_codes_and_zeros():
    with pytest.raises(ValueError, match="0..255"):
        pack_int8(torch.full((4, 4), 256), torch.ones(4, 1), torch.ones(4, 1), 4)
    with pytest.raises(ValueError, match="1..256"):
        pack_int8(torch.zeros(4, 4), torch.zeros(4, 1), torch.ones(4, 1), 4)
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_int8(torch.zeros(4, 6), torch.ones(4, 1), torch.ones(4, 1), 6)


# ------------------------------------------------------------------------------------------ kernel
@pytest.mark.parametrize("m", M_SIZES)
def test_kernel_matches_reference_odd_and_model_shapes(isa, m):
    for n, k in ODD_SHAPES + MODEL_SHAPES:
        _check(m, n, k, 128 if k % 128 == 0 else 4 if k % 8 else 8, seed=m + n + k)


@pytest.mark.parametrize("group_size", [4, 12, 32, 100, 128, "channel"])
@pytest.mark.parametrize("m", [1, 5, 9, 64])
def test_group_sizes_including_partial_last_group(isa, group_size, m):
    k = 300  # not a multiple of most group sizes: the last group is partial
    _check(m, 64, k, k if group_size == "channel" else group_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_activations(isa, dtype):
    _check(3, 576, 576, 128, dtype, tol=8e-3)
    _check(11, 576, 576, 128, dtype, tol=8e-3)
    _check(70, 576, 576, 128, dtype, tol=8e-3)


def test_extreme_codes_and_zero_256(isa):
    n, k = 16, 64
    for code, zero in ((0, 256), (255, 1), (255, 256), (128, 128)):
        packed = pack_int8(torch.full((n, k), code), torch.full((n, 2), zero), torch.full((n, 2), 2.0**-7), 32)
        x = torch.randn(3, k, generator=torch.Generator().manual_seed(code))
        expected = x @ torch.full((n, k), (code - zero) * 2.0**-7).t()  # a scale fp16 holds exactly
        for xs in (x, x.repeat(4, 1), x.repeat(22, 1)):  # the register, panel and BLAS paths
            y = ops.gemm_tiled(xs, tile(packed))
            if code == zero:  # codes on the zero point: exactly 0, with no cancellation error
                assert torch.equal(y, torch.zeros_like(y))
            else:
                assert rel_err(y, expected.repeat(len(xs) // 3, 1)) < 1e-6


def test_randomized_sweep_400_cases():
    """Seeded random shapes, groups, batches and dtypes (the int4/int3 sweep covers 1,000 more)."""
    gen = torch.Generator().manual_seed(88)

    def draw(low, high):
        return int(torch.randint(low, high, (1,), generator=gen))

    for case in range(400):
        n, k = 8 * draw(1, 9), 4 * draw(1, 81)
        group = 4 * draw(1, 41) if draw(0, 4) else k
        m = draw(1, 12) if draw(0, 8) else draw(64, 80)  # one case in 8 on the BLAS path
        dtype = (torch.float32, torch.bfloat16)[draw(0, 4) == 0]
        packed = random_int8(n, k, group, seed=case)[0]
        x = torch.randn(m, k, generator=gen).to(dtype)
        err = rel_err(ops.gemm_tiled(x, tile(packed)),
                      reference.int8_gemm(x, packed.qweight, packed.qzeros, packed.scales, group))
        assert err < (1e-5 if dtype == torch.float32 else 8e-3), f"case {case}: m={m} n={n} k={k} g={group}: {err:.2e}"


def test_int8_activations_are_refused_for_int8_weights():
    t = tile(random_int8(16, 32, 32)[0])
    with pytest.raises(RuntimeError, match="int8 weights run with float activations only"):
        torch.ops.comptrust.gemm_tiled(torch.zeros(2, 32), t.weight, t.zeros, t.scales, 8, 32, 8)
    with pytest.raises(RuntimeError, match=r"int8 weight is \[2, 8, 8\], expected \[n/8, 9, 8\]"):
        torch.ops.comptrust.gemm_tiled(torch.zeros(2, 36), t.weight, t.zeros, t.scales, 8, 4, 0)
    with pytest.raises(ValueError, match="float activations only"):
        RTNConfig(bits=8, act_bits=8)


# ------------------------------------------------------------------------------- layer and methods
def test_quant_linear_int8_runs_the_dequantized_weight():
    linear = nn.Linear(96, 40, bias=True)
    layer = QuantLinear.from_linear(linear, 32, bits=8)
    packed = layer.packed()
    assert isinstance(packed, Int8Packed) and layer.kernel_tensors()  # runs on the CPU tiles
    x = torch.randn(5, 96)
    expected = x @ dequantize_int8(packed).t() + linear.bias.detach()
    assert rel_err(layer(x), expected) < 1e-5
    # 8-bit RTN is close to the dense layer (4-bit is not): a check that the grid uses all 256 levels.
    assert rel_err(layer(x), linear(x).detach()) < 0.01 < rel_err(QuantLinear.from_linear(linear, 32)(x), linear(x).detach())


def test_rtn_8_is_within_half_a_step_of_the_weight():
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    packed = quantize_rtn(weight, 8, 128)
    step = packed.scales.t().float().repeat_interleave(128, 1)
    # Half a step, plus the fp16 rounding of the stored scale, which may clip a group's extremes a little.
    assert torch.all((dequantize_int8(packed) - weight).abs() <= 0.51 * step)


def test_tags_name_int8():
    assert config_from_tag("rtn-w8g128") == RTNConfig(bits=8, group_size=128)
    assert config_from_tag("gptq-w8g64-act").tag == "gptq-w8g64-act"
    model = nn.Sequential(nn.Linear(64, 32))
    summary = compress_(model, RTNConfig(bits=8, group_size=32), skip=(), progress=False)
    assert summary.replaced == ["0"] and model[0].bits == 8
