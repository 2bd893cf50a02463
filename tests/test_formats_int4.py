import pytest
import torch

from comptrust.formats import Int4Packed, dequantize_int4, pack_int4, unpack_int4
from quant_cases import MODEL_SHAPES, ODD_SHAPES, random_int4


@pytest.mark.parametrize("n,k", ODD_SHAPES + MODEL_SHAPES)
@pytest.mark.parametrize("group_size", [8, 32, 64, 128, -1])
def test_pack_unpack_round_trip_is_bit_exact(n, k, group_size):
    g = k if group_size == -1 else group_size
    packed, codes, zeros, scales = random_int4(n, k, g, seed=n + k)
    assert packed.qweight.shape == (k // 8, n) and packed.qweight.dtype == torch.int32
    assert packed.qzeros.shape == (-(-k // g), n // 8) and packed.scales.shape == (-(-k // g), n)
    codes2, zeros2, scales2 = unpack_int4(packed)
    assert torch.equal(codes2.long(), codes)
    assert torch.equal(zeros2.long(), zeros)
    assert torch.equal(scales2, scales.to(torch.float16))
    repacked = pack_int4(codes2, zeros2, scales2, g)
    for name in ("qweight", "qzeros", "scales"):
        assert torch.equal(getattr(repacked, name), getattr(packed, name))


def test_layout_matches_gptq_v1_by_hand():
    # Output column 0 holds codes 0..7 along the input dim; column j holds j everywhere.
    n, k = 8, 8
    codes = torch.arange(n).repeat(k, 1).t().clone()
    codes[0] = torch.arange(8)
    zeros = torch.full((n, 1), 16)   # stored as 15 in every nibble: all bits set
    zeros[1, 0] = 1                  # stored as 0
    packed = pack_int4(codes, zeros, torch.ones(n, 1), group_size=8)
    assert packed.qweight[0, 0].item() == 0x76543210
    assert packed.qweight[0, 3].item() == 0x33333333
    assert packed.qzeros[0, 0].item() == (0xFFFFFF0F - 2**32)  # nibble 1 is 0, the rest 15 (int32 view)


def test_dequantize_matches_formula():
    packed, codes, zeros, scales = random_int4(16, 48, 16, seed=3)
    w = dequantize_int4(packed)
    s16 = scales.to(torch.float16).float()
    expected = (codes.float() - zeros.float().repeat_interleave(16, 1)) * s16.repeat_interleave(16, 1)
    assert torch.equal(w, expected)


@pytest.mark.parametrize("n,k,g,match", [
    (24, 36, 8, "multiple of 8"), (20, 40, 8, "out_features n=20"), (24, 40, 12, "group_size=12"),
])
def test_bad_shapes_are_rejected_with_sizes(n, k, g, match):
    with pytest.raises(ValueError, match=match):
        pack_int4(torch.zeros(n, k, dtype=torch.long), torch.ones(n, -(-k // g), dtype=torch.long),
                  torch.ones(n, -(-k // g)), g)


def test_out_of_range_codes_and_zeros_are_rejected():
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.full((8, 8), 16), torch.ones(8, 1, dtype=torch.long), torch.ones(8, 1), 8)
    with pytest.raises(ValueError, match="1..16"):
        pack_int4(torch.zeros(8, 8, dtype=torch.long), torch.zeros(8, 1, dtype=torch.long), torch.ones(8, 1), 8)
    with pytest.raises(ValueError, match=r"\[n=8, groups=2\]"):
        pack_int4(torch.zeros(8, 16, dtype=torch.long), torch.ones(8, 1, dtype=torch.long), torch.ones(8, 1), 8)


def test_packed_properties():
    packed, *_ = random_int4(40, 96, 32)
    assert isinstance(packed, Int4Packed)
    assert (packed.in_features, packed.out_features, packed.group_size) == (96, 40, 32)
