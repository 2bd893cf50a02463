import numpy as np
import pytest
import torch

from comptrust.formats import Int3Packed, dequantize_int3, pack_int3, unpack_int3
from comptrust.formats.int3 import pack_3bit_last_dim, unpack_3bit_last_dim
from quant_cases import random_int3

# (n, k): tiny, odd multiples of 32, and SmolLM2-135M's real layer shapes
SHAPES = ((32, 32), (96, 160), (64, 96), (160, 224), (576, 576), (192, 576), (1536, 576), (576, 1536))
GROUP_SIZES = (32, 64, 128, -1)


def autogptq_pack3_rows(intweight: np.ndarray) -> np.ndarray:
    """AutoGPTQ v1 QuantLinear.pack for bits=3 (qlinear_cuda_old.py), restated: [k, n] uint -> [k/32*3, n].

    Kept as the slow word-by-word loop the upstream code is, so it checks the vectorized packer.
    """
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * 3, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(10):                                   # v0..v9 -> word0 bits 0..29
            qweight[row] |= intweight[i + j] << (3 * j)
        i += 10
        qweight[row] |= intweight[i] << 30                    # v10 low 2 bits -> word0 bits 30..31
        row += 1
        qweight[row] |= (intweight[i] >> 2) & 1               # v10 bit 2 -> word1 bit 0
        i += 1
        for j in range(10):                                   # v11..v20 -> word1 bits 1..30
            qweight[row] |= intweight[i + j] << (3 * j + 1)
        i += 10
        qweight[row] |= intweight[i] << 31                    # v21 bit 0 -> word1 bit 31
        row += 1
        qweight[row] |= (intweight[i] >> 1) & 0x3             # v21 bits 1..2 -> word2 bits 0..1
        i += 1
        for j in range(10):                                   # v22..v31 -> word2 bits 2..31
            qweight[row] |= intweight[i + j] << (3 * j + 2)
        i += 10
        row += 1
    return qweight.astype(np.int32)


def as_int32(u: int) -> int:
    return u - 2**32 if u >= 2**31 else u


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_pack_unpack_round_trip_is_bit_exact(n, k, group_size):
    g = k if group_size == -1 else group_size
    packed, codes, zeros, scales = random_int3(n, k, g, seed=n + k + g)
    groups = -(-k // g)
    assert packed.qweight.shape == (k // 32 * 3, n) and packed.qweight.dtype == torch.int32
    assert packed.qzeros.shape == (groups, n // 32 * 3) and packed.qzeros.dtype == torch.int32
    assert packed.scales.shape == (groups, n) and packed.scales.dtype == torch.float16
    assert (packed.in_features, packed.out_features) == (k, n)
    codes2, zeros2, scales2 = unpack_int3(packed)
    assert torch.equal(codes2.long(), codes)
    assert torch.equal(zeros2.long(), zeros)
    assert torch.equal(scales2, scales.to(torch.float16))
    repacked = pack_int3(codes2, zeros2, scales2, g)
    for name in ("qweight", "qzeros", "scales"):
        assert torch.equal(getattr(repacked, name), getattr(packed, name))


@pytest.mark.parametrize("n,k", ((32, 32), (96, 160), (576, 576)))
def test_matches_autogptq_pack_loop(n, k):
    packed, codes, zeros, _ = random_int3(n, k, 32, seed=7)
    assert np.array_equal(packed.qweight.numpy(), autogptq_pack3_rows(codes.t().numpy()))
    # qzeros: the same loop over output columns (AutoGPTQ packs zeros - 1 column-wise the same way)
    assert np.array_equal(packed.qzeros.numpy(), autogptq_pack3_rows((zeros - 1).numpy()).T)


def test_bit_positions_by_hand():
    n, k = 32, 32
    codes = torch.zeros(n, k, dtype=torch.long)
    codes[0, 0] = 5                       # v0 = 0b101 -> word0 bits 0..2
    codes[1, 10] = 7                      # v10 = 0b111 -> word0 bits 30,31 and word1 bit 0
    codes[2, 21] = 7                      # v21 = 0b111 -> word1 bit 31 and word2 bits 0,1
    codes[3, 11] = 6                      # v11 = 0b110 -> word1 bits 1..3 = 0b1100
    codes[4, 22] = 1                      # v22 -> word2 bit 2
    codes[5, 31] = 7                      # v31 -> word2 bits 29..31
    codes[6, 10] = 4                      # v10 = 0b100: only its bit 2, in word1 bit 0
    codes[7, 21] = 1                      # v21 = 0b001: only its bit 0, in word1 bit 31
    codes[8] = torch.arange(32) % 8       # 0,1,..,7,0,1,..: see below
    codes[9] = 7                          # every bit set
    zeros = torch.ones(n, 1, dtype=torch.long)
    zeros[10, 0] = 8                      # zero 8 stored as 7 at output column 10 (split like v10)
    packed = pack_int3(codes, zeros, torch.ones(n, 1), group_size=32)
    q = packed.qweight
    assert q[:, 0].tolist() == [5, 0, 0]
    assert q[:, 1].tolist() == [as_int32(0xC0000000), 1, 0]
    assert q[:, 2].tolist() == [0, as_int32(0x80000000), 3]
    assert q[:, 3].tolist() == [0, 0b1100, 0]
    assert q[:, 4].tolist() == [0, 0, 4]
    assert q[:, 5].tolist() == [0, 0, as_int32(0xE0000000)]
    assert q[:, 6].tolist() == [0, 1, 0]
    assert q[:, 7].tolist() == [0, as_int32(0x80000000), 0]
    # 0..7 repeats every 24 bits: word0 = v0..v9 = 0o1076543210 plus v10 = 2 (0b10) at bits 30-31 -> 0x88FAC688;
    # v10's bit 2 (0) is word1 bit 0, then v11..v20 = 3,4,5,6,7,0,1,2,3,4 from bit 1, v21 = 5 -> bit 31 = 1.
    assert 0o1076543210 | (0b10 << 30) == 0x88FAC688
    assert q[:, 8].tolist() == [as_int32(0x88FAC688), as_int32(0xC688FAC6), as_int32(0xFAC688FA)]
    assert q[:, 9].tolist() == [-1, -1, -1]
    assert packed.qzeros[0].tolist() == [as_int32(0xC0000000), 1, 0]


def test_pack_helpers_leading_dims():
    v = torch.randint(0, 8, (3, 5, 64), generator=torch.Generator().manual_seed(1))
    words = pack_3bit_last_dim(v)
    assert words.shape == (3, 5, 6) and words.dtype == torch.int32
    assert torch.equal(unpack_3bit_last_dim(words).long(), v)


@pytest.mark.parametrize("group_size", (32, 64, -1))
def test_dequantize_matches_formula(group_size):
    n, k = 64, 160
    g = k if group_size == -1 else group_size
    packed, codes, zeros, scales = random_int3(n, k, g, seed=3)
    w = dequantize_int3(packed)
    group = torch.arange(k) // g
    s16 = scales.to(torch.float16).float()
    expected = (codes.float() - zeros.float()[:, group]) * s16[:, group]
    assert torch.equal(w, expected)
    assert torch.equal(dequantize_int3(packed, torch.float16), expected.half())


@pytest.mark.parametrize("n,k,g,match", [
    (32, 48, 32, "in_features k=48 must be a multiple of 32"),
    (40, 64, 32, "out_features n=40 must be a multiple of 32"),
    (32, 64, 16, "group_size=16 must be a positive multiple of 32"),
    (32, 64, 0, "group_size=0"),
])
def test_bad_shapes_are_rejected_with_sizes(n, k, g, match):
    groups = max(1, -(-k // max(g, 1)))
    with pytest.raises(ValueError, match=match):
        pack_int3(torch.zeros(n, k, dtype=torch.long), torch.ones(n, groups, dtype=torch.long),
                  torch.ones(n, groups), g)


def test_out_of_range_codes_and_zeros_are_rejected():
    ones = torch.ones(32, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="0..7"):
        pack_int3(torch.full((32, 32), 8), ones, torch.ones(32, 1), 32)
    with pytest.raises(ValueError, match="1..8"):
        pack_int3(torch.zeros(32, 32, dtype=torch.long), ones * 0, torch.ones(32, 1), 32)
    with pytest.raises(ValueError, match="1..8"):
        pack_int3(torch.zeros(32, 32, dtype=torch.long), ones * 9, torch.ones(32, 1), 32)
    with pytest.raises(ValueError, match=r"\[n=32, groups=2\]"):
        pack_int3(torch.zeros(32, 64, dtype=torch.long), ones, torch.ones(32, 1), 32)


def test_packed_is_frozen_dataclass():
    packed, *_ = random_int3(32, 64, 32)
    assert isinstance(packed, Int3Packed) and packed.group_size == 32
    with pytest.raises(Exception):
        packed.group_size = 64
