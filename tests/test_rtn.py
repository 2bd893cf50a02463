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
    with pytest.raises(ValueError, match="bits=3"):
        RTNConfig(bits=3)
    with pytest.raises(ValueError, match="group_size=12"):
        config_from_tag("rtn-w4g12")
    with pytest.raises(ValueError, match="unknown compression tag"):
        config_from_tag("gptq-w4g128")


def test_a8_tag_round_trip():
    config = config_from_tag("rtn-w4g-1-sym-a8")
    assert config == RTNConfig(group_size=-1, symmetric=True, act_bits=8)
    assert config_from_tag(config.tag) == config
    with pytest.raises(ValueError, match="act_bits=4"):
        RTNConfig(act_bits=4)
