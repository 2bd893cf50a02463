import pytest
import torch

from comptrust.compress import RTNConfig, config_from_tag, quantize_int4_rtn
from comptrust.formats import dequantize_int4, unpack_int4


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("n,k,g", [(24, 40, 8), (200, 136, 32), (576, 576, 128), (64, 200, 64)])
def test_error_is_at_most_half_a_step(n, k, g, symmetric):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.05
    packed = quantize_int4_rtn(w, g, symmetric)
    _, zeros, scales = unpack_int4(packed)
    step = scales.float().repeat_interleave(g, dim=1)[:, :k]
    err = (dequantize_int4(packed) - w).abs()
    # Round to nearest: at most half a step, since the grid spans the group's range. Storing the scale in
    # fp16 (relative error <= 2^-11) shifts the grid ends by up to ~15 * 2^-11 step: measured <= 0.504.
    assert (err <= 0.505 * step).all()
    if symmetric:
        assert (zeros == 8).all()


def test_zero_point_never_zero_so_gptq_v1_can_store_it():
    # A group with no negative weights would get zero point 0, which GPTQ v1 (stores zero-1) cannot hold.
    w = torch.rand(8, 64) + 0.1
    w[0, :8] = -1e-4  # a tiny negative value: rounds to zero 0 without the fix
    packed = quantize_int4_rtn(w, 8)
    _, zeros, _ = unpack_int4(packed)
    assert zeros.min() >= 1
    assert (dequantize_int4(packed) - w).abs().max() < 0.05


def test_all_zero_group_round_trips_to_zero():
    w = torch.zeros(8, 16)
    w[:, 8:] = torch.randn(8, 8)
    assert torch.equal(dequantize_int4(quantize_int4_rtn(w, 8))[:, :8], torch.zeros(8, 8))


def test_config_validation_and_tags():
    assert RTNConfig().tag == "rtn-w4g128"
    assert config_from_tag("rtn-w4g-1") == RTNConfig(group_size=-1)
    assert config_from_tag("rtn-w4g32-sym") == RTNConfig(group_size=32, symmetric=True)
    with pytest.raises(ValueError, match="bits=5"):
        RTNConfig(bits=5)
    assert config_from_tag("rtn-w3g128") == RTNConfig(bits=3, group_size=128)
    with pytest.raises(ValueError, match="multiple of 32 for int3"):
        config_from_tag("rtn-w3g8")
    with pytest.raises(ValueError, match="group_size=12"):
        config_from_tag("rtn-w4g12")
    with pytest.raises(ValueError, match="unknown compression tag"):
        config_from_tag("obc-w4g128")


def test_a8_tag_round_trip():
    config = config_from_tag("rtn-w4g-1-sym-a8")
    assert config == RTNConfig(group_size=-1, symmetric=True, act_bits=8)
    assert config_from_tag(config.tag) == config
    with pytest.raises(ValueError, match="act_bits=4"):
        RTNConfig(act_bits=4)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 128])
def test_int3_rtn_error_bound_and_codes(symmetric, group_size):
    from comptrust.compress import quantize_rtn
    from comptrust.formats import dequantize_int3, unpack_int3

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    packed = quantize_rtn(w, 3, group_size, symmetric)
    codes, zeros, scales = unpack_int3(packed)
    assert codes.max() <= 7 and zeros.min() >= 1 and zeros.max() <= 8
    if symmetric:
        assert (zeros == 4).all()
    # Round to nearest on a 7-step grid: every weight within half a step (+ fp16 scale rounding) of its code;
    # the symmetric grid (zero 4, codes 0..7) clips the top half step of the positive side, as GPTQ's does.
    step = scales.float().repeat_interleave(group_size, dim=1)
    bound = (1.0 if symmetric else 0.5) * step * (1 + 1e-3) + 1e-6
    assert ((dequantize_int3(packed) - w).abs() <= bound).all()
    # int3 is coarser than int4 on the same weight
    err3 = (dequantize_int3(packed) - w).norm()
    err4 = (dequantize_int4(quantize_int4_rtn(w, group_size, symmetric)) - w).norm()
    assert err4 < err3


def test_head_flag_quantizes_the_output_projection(tiny_llama):
    import copy

    import torch.nn as nn

    from comptrust import compress_
    from comptrust.nn import QuantLinear

    config = config_from_tag("rtn-w4g32-a8-head")
    assert config == RTNConfig(group_size=32, act_bits=8, lm_head=True) and config_from_tag(config.tag) == config
    model = copy.deepcopy(tiny_llama)
    summary = compress_(model, config, progress=False)
    assert isinstance(model.lm_head, QuantLinear) and "lm_head" in summary.replaced
    plain = copy.deepcopy(tiny_llama)
    compress_(plain, RTNConfig(group_size=32), progress=False)
    assert isinstance(plain.lm_head, nn.Linear)
