"""2:4 semi-structured format (comptrust/formats/sparse24.py): layout, round trips, pruning, 2:4+int4."""
import random

import pytest
import torch

from comptrust.formats import (
    Sparse24Packed,
    dequantize_sparse24_int4,
    pack_sparse24,
    pack_sparse24_int4,
    prune_magnitude_24,
    unpack_int4,
    unpack_sparse24,
)
from quant_cases import MODEL_SHAPES

SPARSE_ODD_SHAPES = ((8, 8), (24, 40), (200, 136), (1, 8), (3, 16))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, so -0.0 vs +0.0 and NaN payloads compare exactly."""
    return t.contiguous().view(_INT_VIEW[t.dtype])


def random_24(n: int, k: int, dtype: torch.dtype, gen: torch.Generator, neg_zeros: bool = False) -> torch.Tensor:
    """A random 2:4 matrix whose groups hold 0, 1 or 2 nonzeros at random positions. With neg_zeros, some
    zero entries are -0.0 (anywhere, kept or not)."""
    groups = n * k // 4
    keep_count = torch.randint(0, 3, (groups, 1), generator=gen)
    rank = torch.rand(groups, 4, generator=gen).argsort(dim=-1).argsort(dim=-1)  # a random permutation
    nonzero = (rank < keep_count).reshape(n, k)
    vals = torch.randn(n, k, generator=gen).to(dtype)
    vals = torch.where(vals == 0, torch.ones((), dtype=dtype), vals)  # randn rounded to bf16 is never 0, but be sure
    zero = torch.zeros((), dtype=dtype)
    if neg_zeros:
        zero = torch.where(torch.rand(n, k, generator=gen) < 0.5, -zero, zero)
    return torch.where(nonzero, vals, zero)


def expected_kept(w: torch.Tensor) -> torch.Tensor:
    """The documented rule, written independently: nonzeros, topped up with the lowest-index zeros."""
    n, k = w.shape
    nz = (w != 0).reshape(n, k // 4, 4)
    missing = 2 - nz.sum(dim=-1, keepdim=True)
    zero_rank = (~nz).to(torch.int64).cumsum(dim=-1) - 1
    return (nz | (~nz & (zero_rank < missing))).reshape(n, k)


# --- layout -------------------------------------------------------------------------------------------


def test_layout_by_hand():
    # Groups: (0,3) -> nibble 0b1100; (1,2) -> 0b1001; byte = group0 | group1 << 4.
    w = torch.tensor([[1.0, 0, 0, 2, 0, 3, 4, 0]])
    p = pack_sparse24(w)
    assert p.meta.dtype == torch.uint8 and p.meta.shape == (1, 1)
    assert p.meta[0, 0].item() == 0b1001_1100
    assert p.values.tolist() == [[1.0, 2.0, 3.0, 4.0]]


@pytest.mark.parametrize(
    "group,idx",
    [([0, 0, 0, 0], (0, 1)), ([3, 0, 0, 0], (0, 1)), ([0, 5, 0, 0], (0, 1)), ([0, 0, 5, 0], (0, 2)),
     ([0, 0, 0, 7], (0, 3)), ([0, 0, 5, 6], (2, 3)), ([0, 5, 0, 6], (1, 3)), ([5, 0, 6, 0], (0, 2))],
)
def test_groups_with_0_1_2_nonzeros_fill_lowest_free_positions(group, idx):
    w = torch.tensor([group + [1.0, 2.0, 0, 0]])  # second group fixed: (0, 1) -> nibble 0b0100
    p = pack_sparse24(w)
    assert p.meta[0, 0].item() == (idx[0] | idx[1] << 2) | (0b0100 << 4)
    assert p.values[0, :2].tolist() == [float(group[idx[0]]), float(group[idx[1]])]
    assert torch.equal(bits(unpack_sparse24(p)), bits(w))


def test_rows_of_0_1_2_nonzeros_per_group():
    n, k = 3, 64
    w = torch.zeros(n, k)
    w[1, ::4] = torch.arange(1, 17, dtype=torch.float32)           # 1 nonzero per group
    w[2, 1::4] = -torch.arange(1, 17, dtype=torch.float32)         # 2 nonzeros per group
    w[2, 3::4] = 0.5
    p = pack_sparse24(w)
    assert (p.meta[0] == 0b0100_0100).all()                       # all-zero groups keep (0, 1)
    assert (p.meta[1] == 0b0100_0100).all()                       # nonzero at 0, filler at 1
    assert (p.meta[2] == 0b1101_1101).all()                       # (1, 3)
    assert torch.equal(bits(unpack_sparse24(p)), bits(w))


# --- round trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SPARSE_ODD_SHAPES + MODEL_SHAPES)
def test_round_trip_is_bit_exact(n, k, dtype):
    w = random_24(n, k, dtype, torch.Generator().manual_seed(n * 7 + k))
    p = pack_sparse24(w)
    assert p.values.shape == (n, k // 2) and p.values.dtype == dtype
    assert p.meta.shape == (n, k // 8) and p.meta.dtype == torch.uint8
    assert (p.in_features, p.out_features) == (k, n)
    back = unpack_sparse24(p)
    assert back.dtype == dtype and torch.equal(bits(back), bits(w))
    again = pack_sparse24(back)  # deterministic: repacking gives the same bytes
    assert torch.equal(again.meta, p.meta) and torch.equal(bits(again.values), bits(p.values))


def test_negative_zero_survives_only_at_kept_positions():
    nz = -0.0
    w = torch.tensor([[nz, 0.0, 0.0, 3.0,     # kept (0, 3): -0.0 at 0 survives
                       0.0, nz, 0.0, 3.0,     # kept (0, 3): -0.0 at 1 is not kept -> +0.0
                       nz, 1.0, nz, 2.0]])    # kept (1, 3): both -0.0 dropped -> +0.0
    w = torch.cat([w, torch.tensor([[nz, nz, nz, nz]])], dim=1)  # kept (0, 1): both survive, 2 and 3 -> +0.0
    back = unpack_sparse24(pack_sparse24(w))
    assert torch.equal(back, w)  # == always holds
    signs = torch.signbit(back)[0].tolist()
    assert signs == [True, False, False, False,
                     False, False, False, False,
                     False, False, False, False,
                     True, True, False, False]


def test_randomized_sweep_round_trips_bit_exact():
    rnd = random.Random(2024)
    gen = torch.Generator().manual_seed(2024)
    for case in range(1200):
        n, k = rnd.randint(1, 24), 8 * rnd.randint(1, 12)
        dtype = rnd.choice(DTYPES)
        w = random_24(n, k, dtype, gen, neg_zeros=case % 2 == 1)
        p = pack_sparse24(w)
        back = unpack_sparse24(p)
        # Bit for bit at kept positions, +0.0 at the others (module docstring).
        expected = torch.where(expected_kept(w), w, torch.zeros((), dtype=dtype))
        assert torch.equal(bits(back), bits(expected)), f"case {case}: n={n} k={k} {dtype}"
        assert torch.equal(back, w), f"case {case}"
        if case % 2 == 0:  # no -0.0: the whole matrix round-trips bit for bit
            assert torch.equal(bits(back), bits(w)), f"case {case}"


# --- magnitude pruning ---------------------------------------------------------------------------------


def reference_prune(w: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(w)
    n, k = w.shape
    for r in range(n):
        for g in range(k // 4):
            grp = [(abs(float(w[r, 4 * g + j])), j) for j in range(4)]
            for _, j in sorted(grp, key=lambda t: (-t[0], t[1]))[:2]:
                out[r, 4 * g + j] = w[r, 4 * g + j]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_prune_keeps_two_largest_magnitudes(dtype):
    w = torch.randn(16, 48, generator=torch.Generator().manual_seed(1)).to(dtype)
    w[0, :16] = torch.tensor([1.0, 1, 1, 1, -2, 1, 2, 0.5, 1, 3, 3, 3, 0, 0, 0, -1]).to(dtype)  # ties
    pruned = prune_magnitude_24(w)
    assert pruned.dtype == dtype and torch.equal(pruned, reference_prune(w))
    assert pruned[0, :16].tolist() == [1, 1, 0, 0, -2, 0, 2, 0, 0, 3, 3, 0, 0, 0, 0, -1]
    assert torch.equal(unpack_sparse24(pack_sparse24(pruned)), pruned)
    assert torch.equal(prune_magnitude_24(pruned), pruned)  # a 2:4 matrix is its own pruning


@pytest.mark.parametrize("n,k", MODEL_SHAPES)
def test_prune_real_shapes_pass_pack(n, k):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)).to(torch.bfloat16)
    pruned = prune_magnitude_24(w)
    assert ((pruned != 0).reshape(n, k // 4, 4).sum(-1) == 2).all()
    kept_mag = pruned.abs().reshape(n, k // 4, 4).amax(-1)
    assert torch.equal(kept_mag, w.abs().reshape(n, k // 4, 4).amax(-1))  # the largest is always kept
    assert torch.equal(bits(unpack_sparse24(pack_sparse24(pruned))), bits(pruned))


# --- rejection and validation --------------------------------------------------------------------------


def test_non_24_rejected_naming_first_offending_row_and_group():
    w = torch.zeros(8, 40)
    w[3, 12:16] = torch.tensor([1.0, 2.0, 0.0, 4.0])  # row 3, group 3: 3 nonzeros
    w[5, 0:4] = 1.0                                     # row 5, group 0: 4 nonzeros (later in row order)
    with pytest.raises(ValueError, match=r"q_proj.*row 3, group 3 \(inputs 12\.\.15\) has 3 nonzeros "
                                         r"\[1\.0, 2\.0, 0\.0, 4\.0\].*2 offending"):
        pack_sparse24(w, name="q_proj")
    w[3, 12:16] = 0
    with pytest.raises(ValueError, match=r"row 5, group 0 .* has 4 nonzeros"):
        pack_sparse24(w)


@pytest.mark.parametrize(
    "weight,error,match",
    [(torch.zeros(4, 12), ValueError, "multiple of 8"), (torch.zeros(16), ValueError, "2-D"),
     (torch.zeros(2, 2, 8), ValueError, "2-D"), (torch.zeros(4, 8, dtype=torch.int32), TypeError, "int32"),
     (torch.zeros(4, 8, dtype=torch.float64), TypeError, "float64"), (torch.zeros(0, 8), ValueError, "positive")],
)
def test_bad_weights_rejected(weight, error, match):
    for fn in (pack_sparse24, prune_magnitude_24):
        with pytest.raises(error, match=match):
            fn(weight)


def test_bad_packed_tensors_rejected():
    values = torch.zeros(4, 8)
    with pytest.raises(ValueError, match=r"meta has shape \(4, 3\), expected \[n=4, k/8=2\]"):
        unpack_sparse24(Sparse24Packed(values, torch.zeros(4, 3, dtype=torch.uint8)))
    with pytest.raises(ValueError, match=r"meta has shape \(5, 2\)"):
        Sparse24Packed(values, torch.zeros(5, 2, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        Sparse24Packed(values, torch.zeros(4, 2, dtype=torch.int16))
    with pytest.raises(ValueError, match="multiple of 4"):
        Sparse24Packed(torch.zeros(4, 6), torch.zeros(4, 1, dtype=torch.uint8))
    meta = torch.full((4, 2), 0b0100_0100, dtype=torch.uint8)
    meta[2, 1] = 0b0100_0111  # row 2, group 2 (low nibble of byte 1): idx0=3, idx1=1
    with pytest.raises(ValueError, match=r"row 2, group 2 .*idx0=3, idx1=1"):
        unpack_sparse24(Sparse24Packed(values, meta))


# --- 2:4 + int4 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("n,k,gs", [(8, 16, 8), (24, 48, 8), (200, 144, 16), (64, 208, 64)]
                         + [(n, k, 128) for n, k in MODEL_SHAPES] + [(1536, 576, 64), (576, 576, -1)])
def test_int4_error_within_half_step_and_pruned_exactly_zero(n, k, gs, symmetric):
    dense = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k + gs)) * 0.05
    w = prune_magnitude_24(dense)
    w[0, :8] = 0  # a row start with all-zero groups (zero fillers in the compact values)
    packed = pack_sparse24_int4(w, gs, symmetric)
    plain = pack_sparse24(w)
    assert torch.equal(packed.meta, plain.meta)
    assert (packed.in_features, packed.out_features) == (k, n)
    g = k // 2 if gs == -1 else gs
    assert packed.group_size == g and packed.qvalues.in_features == k // 2

    deq = dequantize_sparse24_int4(packed)
    assert deq.shape == (n, k) and deq.dtype == torch.float32
    kept = expected_kept(w)
    assert torch.equal(bits(deq[~kept]), bits(torch.zeros(int((~kept).sum()))))  # pruned: exactly +0.0
    _, _, scales = unpack_int4(packed.qvalues)
    step = scales.float().repeat_interleave(g, dim=1)[:, : k // 2]          # per kept value
    err = (deq[kept].view(n, k // 2) - plain.values.float()).abs()
    # Same bound as RTN (tests/test_rtn.py): half a step, plus fp16 rounding of the stored scale.
    assert (err <= 0.505 * step).all()
    assert (deq[kept].view(n, k // 2)[plain.values == 0] == 0).all()       # zero fillers stay exactly 0
    assert dequantize_sparse24_int4(packed, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_accepts_half_precision_weights(dtype):
    w = prune_magnitude_24(torch.randn(16, 64, generator=torch.Generator().manual_seed(5)).to(dtype))
    packed = pack_sparse24_int4(w, 16)
    err = (dequantize_sparse24_int4(packed) - w.float()).abs()
    assert err.max() <= 0.505 * unpack_int4(packed.qvalues)[2].float().max()


@pytest.mark.parametrize(
    "shape,gs,match",
    [((8, 40), 8, "multiple of 16"), ((12, 32), 8, "out_features n=12.*multiple of 8"),
     ((8, 64), 12, "group_size=12 .*counted in kept values"), ((8, 64), 0, "group_size=0")],
)
def test_int4_bad_shapes_rejected(shape, gs, match):
    with pytest.raises(ValueError, match=match):
        pack_sparse24_int4(torch.zeros(shape), gs)


def test_int4_rejects_non_24_like_plain_pack():
    w = torch.zeros(8, 32)
    w[6, 20:24] = 1.0
    with pytest.raises(ValueError, match=r"row 6, group 5"):
        pack_sparse24_int4(w, 8)


# --- memory --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", MODEL_SHAPES + ((8, 8), (200, 136)))
def test_packed_bytes_are_half_the_values_plus_4_bits_per_group(n, k, dtype):
    w = prune_magnitude_24(torch.randn(n, k).to(dtype))
    p = pack_sparse24(w)
    es = w.element_size()
    dense_bytes = n * k * es
    assert p.nbytes == dense_bytes // 2 + (n * k // 4) * 4 // 8  # 4 bits of metadata per group of 4
    assert p.nbytes == p.values.untyped_storage().nbytes() + p.meta.untyped_storage().nbytes()
    assert p.nbytes * 16 == dense_bytes * 8 + n * k * 2  # i.e. (1/2 + 1/(8*es)) of dense


@pytest.mark.parametrize("n,k,gs", [(576, 576, 128), (1536, 576, 64), (576, 1536, 128), (200, 144, 16)])
def test_int4_packed_bytes(n, k, gs):
    p = pack_sparse24_int4(prune_magnitude_24(torch.randn(n, k)), gs)
    groups = -(-(k // 2) // gs)
    # qweight: k/2 codes x 4 bits; qzeros: 4 bits per (group, row); scales fp16; meta 4 bits per group of 4.
    assert p.nbytes == n * (k // 2) // 2 + groups * n // 2 + groups * n * 2 + n * k // 8


# ------------------------------------------------------------------------------- torch interop
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_semi_structured_round_trip_and_same_values(dtype):
    from torch.sparse import _semi_structured_conversions as torch_conv

    from comptrust.formats.sparse24 import from_torch_semi_structured, to_torch_semi_structured

    g = torch.Generator().manual_seed(11)
    dense = prune_magnitude_24(torch.randn(64, 128, generator=g)).to(dtype)
    dense[3, :8] = 0  # groups with fewer than 2 nonzeros
    ours = pack_sparse24(dense)
    values, meta = to_torch_semi_structured(ours)
    assert meta.dtype == torch.int16 and meta.shape == (64, 8)
    assert torch.equal(torch_conv.sparse_semi_structured_to_dense_cutlass(values, meta), dense)
    full = prune_magnitude_24(torch.randn(64, 128, generator=g)).to(dtype)
    # where every group has exactly 2 nonzeros, torch keeps the same values in the same order as ours
    assert torch.equal(to_torch_semi_structured(pack_sparse24(full))[0], pack_sparse24(full).values)
    back = from_torch_semi_structured(values, meta)
    assert torch.equal(back.values, ours.values) and torch.equal(back.meta, ours.meta)


def test_torch_semi_structured_rejects_what_it_cannot_hold():
    from comptrust.formats.sparse24 import from_torch_semi_structured, to_torch_semi_structured

    with pytest.raises(ValueError, match="float32 format is 1:2"):
        to_torch_semi_structured(pack_sparse24(prune_magnitude_24(torch.randn(64, 64))))
    with pytest.raises(ValueError, match="out_features % 32"):
        to_torch_semi_structured(pack_sparse24(prune_magnitude_24(torch.randn(40, 64)).half()))
    with pytest.raises(ValueError, match="int16 meta"):
        from_torch_semi_structured(torch.zeros(32, 32, dtype=torch.half), torch.zeros(32, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"meta is \(32, 2\)"):
        from_torch_semi_structured(torch.zeros(32, 32, dtype=torch.half), torch.zeros(32, 2, dtype=torch.int16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's semi-structured tensors need a GPU")
def test_torch_semi_structured_tensor_multiplies_like_ours():
    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    from comptrust.formats.sparse24 import to_torch_semi_structured

    dense = prune_magnitude_24(torch.randn(128, 128)).half()
    values, meta = to_torch_semi_structured(pack_sparse24(dense))
    tensor = SparseSemiStructuredTensorCUTLASS(dense.shape, packed=values.cuda(), meta=meta.cuda(), packed_t=None,
                                               meta_t=None, compressed_swizzled_bitmask=None)
    x = torch.randn(128, 64, dtype=torch.half, device="cuda")
    assert torch.allclose(torch.mm(tensor, x).float().cpu(), dense.float() @ x.float().cpu(), rtol=1e-2, atol=1e-2)
