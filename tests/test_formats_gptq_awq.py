import random

import pytest
import torch

from comptrust.formats import (
    Int3Packed,
    Int4Packed,
    act_order_permutation,
    apply_act_order,
    check_act_order_groups,
    dequantize_awq,
    dequantize_int3,
    dequantize_int4,
    from_awq_tensors,
    from_gptq_tensors,
    g_idx_is_trivial,
    pack_int3,
    pack_int4,
    to_awq_tensors,
    to_gptq_tensors,
    undo_act_order,
    unpack_int3,
    unpack_int4,
)

PACK = {3: pack_int3, 4: pack_int4}
UNPACK = {3: unpack_int3, 4: unpack_int4}
DEQUANT = {3: dequantize_int3, 4: dequantize_int4}
# (n, k) per bits: odd-but-valid and SmolLM2's real shapes (576x576 q/o, 1536x576 up/gate, 576x1536 down)
SHAPES = {
    3: ((96, 160), (32, 288), (576, 576), (1536, 576), (576, 1536)),
    4: ((24, 40), (200, 136), (576, 576), (1536, 576), (576, 1536)),
}
LAYER = "model.layers.0.mlp.up_proj"


def random_layer(bits, n, k, g, seed, awq=False):
    """Random codes [n, k], zeros [n, groups] (GPTQ v1 range 1..2^bits, or AWQ 0..15) and scales."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // g)
    top = 2**bits
    codes = torch.randint(0, top, (n, k), generator=gen)
    low, high = (0, 16) if awq else (1, top + 1)
    zeros = torch.randint(low, high, (n, groups), generator=gen)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 1e-3).half()
    return codes, zeros, scales


def random_act_order_g_idx(k, g, seed):
    """What GPTQ desc_act (static_groups=False) writes: row perm0[j] is quantized j-th, in group j // g."""
    perm0 = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm0] = (torch.arange(k) // g).to(torch.int32)
    return g_idx


def dequantize_with_g_idx(codes, zeros, scales, g_idx):
    """Oracle of an act-order GPTQ layer as AutoGPTQ reads it: row i uses zero/scale of group g_idx[i]."""
    gi = g_idx.long()
    return (codes.double() - zeros.double()[:, gi]) * scales.double()[:, gi]


def act_order_checkpoint(bits, n, k, g, seed):
    """GPTQ v1 tensors of an act-order layer, packed in checkpoint (unsorted) row order, plus its oracle."""
    codes, zeros, scales = random_layer(bits, n, k, g, seed)
    g_idx = random_act_order_g_idx(k, g, seed + 1)
    tensors = to_gptq_tensors(PACK[bits](codes, zeros, scales, g), bits)  # packs rows as they are
    tensors["g_idx"] = g_idx
    return tensors, dequantize_with_g_idx(codes, zeros, scales, g_idx)


def assert_packed_equal(a, b):
    assert type(a) is type(b) and a.group_size == b.group_size
    for name in ("qweight", "qzeros", "scales"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


def assert_tensors_equal(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------- act-order helpers

def test_act_order_permutation_is_stable_sort():
    g_idx = torch.tensor([2, 0, 1, 0, 2, 1], dtype=torch.int32)
    perm = act_order_permutation(g_idx)
    assert perm.tolist() == [1, 3, 2, 5, 0, 4] and perm.dtype == torch.int64
    assert torch.equal(g_idx[perm], torch.tensor([0, 0, 1, 1, 2, 2], dtype=torch.int32))


def test_g_idx_is_trivial():
    assert g_idx_is_trivial(torch.arange(96, dtype=torch.int32) // 32, 32)
    assert g_idx_is_trivial(torch.arange(100) // 32, 32)            # partial last group
    assert g_idx_is_trivial(torch.zeros(96, dtype=torch.int32), -1)
    assert not g_idx_is_trivial(torch.zeros(96, dtype=torch.int32), 32)
    assert not g_idx_is_trivial(random_act_order_g_idx(96, 32, 0), 32)


@pytest.mark.parametrize("k,g", [(128, 32), (160, 64), (96, 96)])
def test_apply_and_undo_act_order(k, g):
    g_idx = random_act_order_g_idx(k, g, seed=k)
    codes = torch.randint(0, 16, (8, k))
    permuted, perm = apply_act_order(codes, g_idx, g)
    assert torch.equal(permuted, codes[:, perm])
    assert torch.equal(g_idx[perm].long(), torch.arange(k) // g)   # groups contiguous, g rows each
    back, g_idx2 = undo_act_order(permuted, perm, g)
    assert torch.equal(back, codes) and torch.equal(g_idx2, g_idx) and g_idx2.dtype == torch.int32


def test_unequal_groups_are_rejected():
    g_idx = torch.arange(96, dtype=torch.int32) // 32
    g_idx[0] = 1                                                     # group 0: 31 rows, group 1: 33
    with pytest.raises(ValueError, match="group 0 has 31 rows, expected 32"):
        check_act_order_groups(g_idx, 32)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        check_act_order_groups(torch.full((96,), 3), 32)
    with pytest.raises(ValueError, match="permutation"):
        undo_act_order(torch.zeros(2, 4), torch.tensor([0, 1, 1, 3]), 2)


# ---------------------------------------------------------------- GPTQ export -> import

@pytest.mark.parametrize("bits", (3, 4))
@pytest.mark.parametrize("group_size", (32, 64, 128, -1))
@pytest.mark.parametrize("shape_index", range(5))
def test_gptq_export_import_bit_exact(bits, group_size, shape_index):
    n, k = SHAPES[bits][shape_index]
    g = k if group_size == -1 else group_size
    codes, zeros, scales = random_layer(bits, n, k, g, seed=n * k + g)
    packed = PACK[bits](codes, zeros, scales, g)
    bias = torch.randn(n).half()
    tensors = to_gptq_tensors(packed, bits, bias=bias)
    groups = -(-k // g)
    assert tensors["qweight"].shape == (k * bits // 32, n) and tensors["qweight"].dtype == torch.int32
    assert tensors["qzeros"].shape == (groups, n * bits // 32) and tensors["qzeros"].dtype == torch.int32
    assert tensors["scales"].shape == (groups, n) and tensors["scales"].dtype == torch.float16
    assert tensors["g_idx"].dtype == torch.int32 and torch.equal(tensors["g_idx"].long(), torch.arange(k) // g)
    if group_size == -1:
        assert tensors["scales"].shape == (1, n) and not tensors["g_idx"].any()
    packed2, perm, bias2 = from_gptq_tensors(tensors, bits, group_size, k, n, LAYER)
    assert perm is None and torch.equal(bias2, bias)
    assert_packed_equal(packed2, packed)
    assert_tensors_equal(to_gptq_tensors(packed2, bits, bias=bias2), tensors)


@pytest.mark.parametrize("bits", (3, 4))
@pytest.mark.parametrize("group_size", (32, 64, 128))
@pytest.mark.parametrize("shape_index", range(5))
def test_gptq_act_order_import(bits, group_size, shape_index):
    n, k = SHAPES[bits][shape_index]
    if k <= group_size:
        pytest.skip("one group: g_idx is trivial")
    tensors, w_oracle = act_order_checkpoint(bits, n, k, group_size, seed=n + k + group_size)
    packed, perm, _ = from_gptq_tensors(tensors, bits, group_size, k, n, LAYER)
    assert perm is not None and sorted(perm.tolist()) == list(range(k))
    # The permuted layer is a plain grouped layer whose weight is the act-order weight's columns, exactly ...
    w_perm = DEQUANT[bits](packed, torch.float64)
    assert torch.equal(w_perm, w_oracle[:, perm])
    # ... so running it on x[:, perm] computes the original layer.
    x = torch.randn(5, k, dtype=torch.float64)
    torch.testing.assert_close(x[:, perm] @ w_perm.t(), x @ w_oracle.t(), rtol=1e-12, atol=1e-12)
    # Export with perm gives the checkpoint back bit for bit; export without it is a plain layer that
    # imports back to the same packed tensors.
    assert_tensors_equal(to_gptq_tensors(packed, bits, perm=perm), tensors)
    plain = to_gptq_tensors(packed, bits)
    assert g_idx_is_trivial(plain["g_idx"], group_size)
    packed2, perm2, _ = from_gptq_tensors(plain, bits, group_size, k, n, LAYER)
    assert perm2 is None
    assert_packed_equal(packed2, packed)


def test_gptq_keys_may_carry_the_layer_name_and_group_size_minus_one_with_g_idx():
    codes, zeros, scales = random_layer(4, 64, 96, 96, seed=5)
    tensors = to_gptq_tensors(pack_int4(codes, zeros, scales, 96), 4)
    prefixed = {f"{LAYER}.{key}": t for key, t in tensors.items()}
    packed, perm, bias = from_gptq_tensors(prefixed, 4, -1, 96, 64, LAYER)
    assert isinstance(packed, Int4Packed) and packed.group_size == 96 and perm is None and bias is None
    oracle = dequantize_with_g_idx(codes, zeros, scales, tensors["g_idx"])
    assert torch.equal(dequantize_int4(packed, torch.float64), oracle)
    del prefixed[f"{LAYER}.g_idx"]                     # g_idx is optional
    assert_packed_equal(from_gptq_tensors(prefixed, 4, -1, 96, 64, LAYER)[0], packed)


def test_gptq_int3_returns_int3_packed():
    codes, zeros, scales = random_layer(3, 96, 160, 32, seed=6)
    packed, _, _ = from_gptq_tensors(to_gptq_tensors(pack_int3(codes, zeros, scales, 32), 3), 3, 32, 160, 96, LAYER)
    assert isinstance(packed, Int3Packed) and (packed.in_features, packed.out_features) == (160, 96)


# ---------------------------------------------------------------- malformed GPTQ tensors

def good_tensors(bits=4, n=1536, k=576, g=128):
    codes, zeros, scales = random_layer(bits, n, k, g, seed=11)
    return to_gptq_tensors(PACK[bits](codes, zeros, scales, g), bits, bias=torch.zeros(n, dtype=torch.float16))


def test_wrong_shape_message_names_tensor_and_shapes():
    t = good_tensors()
    t["qweight"] = t["qweight"][:, :1535]
    with pytest.raises(ValueError) as e:
        from_gptq_tensors(t, 4, 128, 576, 1536, LAYER)
    assert str(e.value) == f"{LAYER}.qweight: expected [72, 1536] int32, got [72, 1535] int32"


@pytest.mark.parametrize("key,bad,expected", [
    ("qweight", lambda t: t.to(torch.int64), r"qweight: expected \[72, 1536\] int32, got \[72, 1536\] int64"),
    ("qzeros", lambda t: t[:4], r"qzeros: expected \[5, 192\] int32, got \[4, 192\] int32"),
    ("scales", lambda t: t.float(), r"scales: expected \[5, 1536\] float16, got \[5, 1536\] float32"),
    ("scales", lambda t: t.t(), r"scales: expected \[5, 1536\] float16, got \[1536, 5\] float16"),
    ("g_idx", lambda t: t[:-1], r"g_idx: expected \[576\] int32, got \[575\] int32"),
    ("g_idx", lambda t: t.float(), r"g_idx: expected \[576\] int32, got \[576\] float32"),
    ("bias", lambda t: t[:-8], r"bias: expected \[1536\] float16, got \[1528\] float16"),
])
def test_wrong_shape_or_dtype_rejected(key, bad, expected):
    t = good_tensors()
    t[key] = bad(t[key])
    with pytest.raises(ValueError, match=rf"^{LAYER}\.{expected}$"):
        from_gptq_tensors(t, 4, 128, 576, 1536, LAYER)


@pytest.mark.parametrize("key", ("qweight", "qzeros", "scales"))
def test_missing_tensor_rejected(key):
    t = good_tensors(bits=3, n=96, k=160, g=32)
    del t[key]
    shape = {"qweight": r"\[15, 96\] int32", "qzeros": r"\[5, 9\] int32", "scales": r"\[5, 96\] float16"}[key]
    with pytest.raises(ValueError, match=rf"{LAYER}\.{key}: missing \(expected {shape}\)"):
        from_gptq_tensors(t, 3, 32, 160, 96, LAYER)


def test_g_idx_out_of_range_and_unequal_groups_rejected():
    t = good_tensors()
    t["g_idx"] = t["g_idx"].clone()
    t["g_idx"][3] = 5                                   # 576 / 128 -> groups 0..4
    with pytest.raises(ValueError, match=rf"{LAYER}\.g_idx: values must lie in 0\.\.4 .*got 0\.\.5"):
        from_gptq_tensors(t, 4, 128, 576, 1536, LAYER)
    t["g_idx"][3] = -1
    with pytest.raises(ValueError, match=rf"{LAYER}\.g_idx: values must lie in 0\.\.4"):
        from_gptq_tensors(t, 4, 128, 576, 1536, LAYER)
    t["g_idx"][3] = 1                                   # group 0: 127 rows, group 1: 129
    with pytest.raises(ValueError, match=rf"{LAYER}\.g_idx: group 0 has 127 rows, expected 128"):
        from_gptq_tensors(t, 4, 128, 576, 1536, LAYER)


@pytest.mark.parametrize("bits,k,n,g,match", [
    (2, 576, 1536, 128, "bits=2 is not supported"),
    (4, 100, 1536, 128, r"int4: in_features k=100 must be a multiple of 8"),
    (3, 576, 1000, 128, r"int3: out_features n=1000 must be a multiple of 32"),
    (3, 576, 1536, 48, r"int3: group_size=48"),
])
def test_bad_layer_sizes_rejected(bits, k, n, g, match):
    with pytest.raises(ValueError, match=rf"^{LAYER}: .*{match}"):
        from_gptq_tensors(good_tensors(), bits, g, k, n, LAYER)


def test_export_checks_bits_and_bias():
    packed = pack_int4(*random_layer(4, 64, 64, 32, seed=1), 32)
    with pytest.raises(ValueError, match="bits=3 needs Int3Packed, got Int4Packed"):
        to_gptq_tensors(packed, 3)
    with pytest.raises(ValueError, match=r"bias \[63\] must be \[64\]"):
        to_gptq_tensors(packed, 4, bias=torch.zeros(63))


# ---------------------------------------------------------------- AWQ

AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]


def autoawq_pack(intweight_kn: torch.Tensor) -> torch.Tensor:
    """AutoAWQ WQLinear_GEMM.from_linear's packing loop, restated: [rows, n] -> [rows, n/8] int32."""
    rows, n = intweight_kn.shape
    out = torch.zeros(rows, n // 8, dtype=torch.int64)
    for col in range(n // 8):
        for i in range(8):
            out[:, col] |= intweight_kn[:, col * 8 + AWQ_ORDER_MAP[i]].long() << (4 * i)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def awq_checkpoint(n, k, g, seed, zero_free=False):
    codes, zeros, scales = random_layer(4, n, k, g, seed, awq=True)
    if zero_free:
        zeros = zeros.clamp(min=1)
    tensors = {"qweight": autoawq_pack(codes.t()), "qzeros": autoawq_pack(zeros.t()), "scales": scales.t().contiguous()}
    group = torch.arange(k) // g
    w = (codes.float() - zeros.float()[:, group]) * scales.float()[:, group]   # w = (q - z) * s, [n, k]
    return tensors, w


@pytest.mark.parametrize("n,k", ((24, 64), (200, 128), (576, 576), (1536, 576), (576, 1536)))
@pytest.mark.parametrize("group_size", (32, 64, 128, -1))
def test_awq_converts_exactly(n, k, group_size):
    g = k if group_size == -1 else group_size
    if k % g:
        pytest.skip("AWQ groups are never partial")
    tensors, w = awq_checkpoint(n, k, g, seed=n + k + g)
    assert torch.equal(dequantize_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"], group_size), w)
    packed = from_awq_tensors(tensors, group_size, k, n, LAYER)
    assert isinstance(packed, Int4Packed) and packed.group_size == g
    assert packed.qweight.shape == (k // 8, n) and packed.qzeros.shape == (k // g, n // 8)
    for dtype in (torch.float32, torch.float16):
        assert torch.equal(dequantize_int4(packed, dtype), w.to(dtype))
    # Back to AWQ bit for bit (the zero-0 flip is undone), and GPTQ export/import keeps it.
    assert_tensors_equal(to_awq_tensors(packed), tensors)
    packed2, _, _ = from_gptq_tensors(to_gptq_tensors(packed, 4), 4, group_size, k, n, LAYER)
    assert_packed_equal(packed2, packed)


def test_awq_zero_point_zero():
    tensors, w = awq_checkpoint(64, 128, 32, seed=3)            # 256 zero points in 0..15: some are 0
    with pytest.raises(ValueError, match=rf"{LAYER}\.qzeros: \d+ zero points are 0, which GPTQ v1 cannot store"):
        from_awq_tensors(tensors, 32, 128, 64, LAYER, allow_negated_scales=False)
    packed = from_awq_tensors(tensors, 32, 128, 64, LAYER)
    _, z, s = unpack_int4(packed)
    flipped = torch.signbit(s)                                    # flipped group-columns: zero 15, scale -s
    assert flipped.any() and bool((z[flipped] == 15).all())
    assert z.min() >= 1 and torch.equal(dequantize_int4(packed), w)
    free, w_free = awq_checkpoint(64, 128, 32, seed=3, zero_free=True)
    packed = from_awq_tensors(free, 32, 128, 64, LAYER, allow_negated_scales=False)
    assert not torch.signbit(packed.scales).any() and torch.equal(dequantize_int4(packed), w_free)


def test_to_awq_layout_and_zero_sixteen():
    codes, zeros, scales = random_layer(4, 16, 32, 32, seed=2)
    zeros = zeros.clamp(max=15)
    t = to_awq_tensors(pack_int4(codes, zeros, scales, 32))
    assert torch.equal(t["qweight"], autoawq_pack(codes.t())) and torch.equal(t["qzeros"], autoawq_pack(zeros.t()))
    # One word by hand: output columns 0..7 = 0..7 land in nibble slots [0, 4, 1, 5, 2, 6, 3, 7].
    hand = autoawq_pack(torch.arange(8).reshape(1, 8))
    assert hand.item() == 0x75316420
    zeros[0, 0] = 16
    with pytest.raises(ValueError, match="zero points are 16, which AWQ cannot store"):
        to_awq_tensors(pack_int4(codes, zeros, scales, 32))


@pytest.mark.parametrize("key,bad,match", [
    ("qweight", lambda t: t[:, :-1], r"qweight: expected \[576, 72\] int32, got \[576, 71\] int32"),
    ("qzeros", lambda t: t.to(torch.int16), r"qzeros: expected \[18, 72\] int32, got \[18, 72\] int16"),
    ("scales", lambda t: t[:-1], r"scales: expected \[18, 576\] float16, got \[17, 576\] float16"),
])
def test_awq_malformed_rejected(key, bad, match):
    tensors, _ = awq_checkpoint(576, 576, 32, seed=4)
    tensors[key] = bad(tensors[key])
    with pytest.raises(ValueError, match=rf"^{LAYER}\.{match}$"):
        from_awq_tensors(tensors, 32, 576, 576, LAYER)
    del tensors[key]
    with pytest.raises(ValueError, match=rf"{LAYER}\.{key}: missing"):
        from_awq_tensors(tensors, 32, 576, 576, LAYER)


def test_awq_partial_group_rejected():
    tensors, _ = awq_checkpoint(64, 128, 32, seed=4)
    with pytest.raises(ValueError, match=rf"{LAYER}: AWQ needs in_features k=160 to be a multiple of group_size=128"):
        from_awq_tensors(tensors, 128, 160, 64, LAYER)


# ---------------------------------------------------------------- seeded randomized sweep

SWEEP_CASES = 360


def _sweep_case(i):
    rng = random.Random(1000 + i)
    kind = rng.choice(("gptq3", "gptq4", "awq"))
    unit = 32 if kind == "gptq3" else 8
    n = unit * rng.randint(1, 24)
    group_size = rng.choice((32, 64, 128, -1) + ((8, 16, 40) if kind != "gptq3" else ()))
    if kind == "awq" and group_size != -1:
        k = group_size * rng.randint(1, 6)                           # AWQ groups are never partial
    else:
        k = (32 if kind == "gptq3" else 8) * rng.randint(1, 24)
        if group_size != -1 and kind == "gptq3":
            group_size = min(group_size, k)                          # a 32-multiple, maybe partial last group
    act_order = kind != "awq" and group_size != -1 and rng.random() < 0.5
    return kind, n, k, group_size, act_order, rng.randrange(2**31)


@pytest.mark.parametrize("case", range(SWEEP_CASES))
def test_randomized_round_trip_sweep(case):
    kind, n, k, group_size, act_order, seed = _sweep_case(case)
    g = k if group_size == -1 else group_size
    if kind == "awq":
        tensors, w = awq_checkpoint(n, k, g, seed)
        packed = from_awq_tensors(tensors, group_size, k, n, LAYER)
        assert torch.equal(dequantize_int4(packed), w)
        assert torch.equal(dequantize_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"], group_size), w)
        assert_tensors_equal(to_awq_tensors(packed), tensors)
        return
    bits = 3 if kind == "gptq3" else 4
    if act_order:
        tensors, w_oracle = act_order_checkpoint(bits, n, k, g, seed)
        packed, perm, _ = from_gptq_tensors(tensors, bits, group_size, k, n, LAYER)
        assert perm is not None or g_idx_is_trivial(tensors["g_idx"], g)
        perm = torch.arange(k) if perm is None else perm
        assert torch.equal(DEQUANT[bits](packed, torch.float64), w_oracle[:, perm])
        assert_tensors_equal(to_gptq_tensors(packed, bits, perm=perm), tensors)
        return
    codes, zeros, scales = random_layer(bits, n, k, g, seed)
    packed = PACK[bits](codes, zeros, scales, g)
    codes2, zeros2, scales2 = UNPACK[bits](packed)
    assert torch.equal(codes2.long(), codes) and torch.equal(zeros2.long(), zeros) and torch.equal(scales2, scales)
    tensors = to_gptq_tensors(packed, bits)
    packed2, perm, _ = from_gptq_tensors(tensors, bits, group_size, k, n, LAYER)
    assert perm is None
    assert_packed_equal(packed2, packed)
    assert_tensors_equal(to_gptq_tensors(packed2, bits), tensors)
