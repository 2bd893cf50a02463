"""The tiled CPU kernels (csrc/cpu/gemm_tiled*.cpp) and their layout (comptrust.formats.cpu_tiles).

Each SIMD path is forced in turn through COMPTRUST_CPU_ISA. Against the pure-torch references (the
dequantized weight; for act_bits=8 the same int8 activation rounding done in torch), float activations
differ only by summation order: bound 1e-5 relative Frobenius error, measured <1e-6. A wrong code, plane
bit, zero, scale or group gives errors of order 1. Float activations run the register kernels at batch
1..7 and the dequantized-panel kernel from 8 (with VNNI, the int8 limb kernels where limbs_for says), in passes
of at most 256 rows; on the scalar ISA, from 64 rows, a dequantized scratch block through torch's GEMM (bf16
activations: a bf16 scratch from 64 rows where no bf16 panel takes them, so the weights are rounded to bf16; on
a CPU with AMX-BF16, bf16 activations from 8 rows run on the tile unit instead, and fp32 ones from 8 rows split
into three exact bf16 planes); all are covered.
"""
import pytest
import torch

from comptrust import ops, reference
from comptrust.formats.cpu_tiles import TiledWeight, tile, tile_int3, tile_int4, untile
from comptrust.formats.int3 import pack_int3
from comptrust.formats.int4 import pack_int4
from quant_cases import (MODEL_SHAPES, available_isas, fp32_paths_only, full_precision_one_hot_rows, random_int3,
                         random_int4, random_int8, rel_err, rows_before_guard_page, wide_range_rows)

INT3_ODD_SHAPES = ((32, 32), (96, 160), (160, 224), (64, 96))
INT4_ODD_SHAPES = ((24, 40), (200, 136), (8, 200), (40, 96))
M_SIZES = (1, 2, 3, 5, 8, 13, 70)


def _random(bits, n, k, group_size, seed=0):
    return (random_int4 if bits == 4 else random_int3)(n, k, group_size, seed)[0]


def _reference(bits, act_bits):
    if bits == 4:
        return reference.int4_gemm_a8 if act_bits else reference.int4_gemm
    return reference.int3_gemm_a8 if act_bits else reference.int3_gemm


def _check(bits, act_bits, m, n, k, group_size, dtype=torch.float32, seed=0, tol=1e-5):
    packed = _random(bits, n, k, group_size, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    y = ops.gemm_tiled(x, tile(packed), act_bits)
    assert y.shape == (m, n) and y.dtype == dtype
    ref = _reference(bits, act_bits)(x, packed.qweight, packed.qzeros, packed.scales, group_size)
    err = rel_err(y, ref)
    assert err < tol, f"int{bits} a{act_bits} m={m} n={n} k={k} g={group_size} {dtype}: rel err {err:.2e}"


# ------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("group_size", [32, 64, 128, "channel"])
def test_tile_untile_round_trip_is_bit_exact(bits, group_size):
    n, k = (200, 256) if bits == 4 else (96, 256)
    packed = _random(bits, n, k, k if group_size == "channel" else group_size, seed=bits)
    tiled = tile(packed)
    assert tiled.bits == bits and (tiled.out_features, tiled.in_features) == (n, k)
    back = untile(tiled)
    for name in ("qweight", "qzeros", "scales"):
        assert torch.equal(getattr(back, name), getattr(packed, name)), name


@pytest.mark.parametrize("k, block", [(64, 0), (64, 1), (96, 2), (32, 0)])  # pair members; a last block alone
@pytest.mark.parametrize("code", [5, 6])  # bits 0 and 2; bits 1 and 2
def test_int3_words_follow_the_documented_bit_positions(k, block, code):
    # cpu_tiles.h: row 16p + 4q + i of block b, in byte q of A word (b, p) (i = 0, 1: bits 3i..3i+2; i = 2: its
    # bits 0-1 in bits 6-7) and of its nibble (i = 2: bit 2 in nibble bit 3; i = 3: nibble bits 0-2). Word rows:
    # a pair's blocks 2c + h at A rows 6c + 2h + p, nibbles at 6c + 4 + p in bits 4h..4h+3; a last block alone at
    # A rows 3b + p, nibbles at 3b + 2 in bits 4p..4p+3. Exactly those bits are set, in column 3 only (of tile 0).
    from comptrust.formats import pack_int3

    alone = k // 32 % 2 == 1 and block == k // 32 - 1
    for p, q, i in ((0, 0, 0), (0, 2, 1), (1, 1, 2), (1, 3, 3), (0, 3, 2)):
        codes = torch.zeros(32, k, dtype=torch.int64)  # int3's GPTQ packing needs n % 32 == 0
        codes[3, 32 * block + 16 * p + 4 * q + i] = code
        tiled = tile_int3(pack_int3(codes, torch.ones(32, 1), torch.ones(32, 1), k))
        words = tiled.weight[0].reshape(-1, 8).to(torch.int64) & 0xFFFFFFFF  # [word row, column]
        if alone:
            a_row, nibble_row, shift = 3 * block + p, 3 * block + 2, 4 * p
        else:
            a_row, nibble_row, shift = 6 * (block // 2) + 2 * (block % 2) + p, 6 * (block // 2) + 4 + p, 4 * (block % 2)
        expected = torch.zeros_like(words)
        if i < 2:
            expected[a_row, 3] = code << (8 * q + 3 * i)
        elif i == 2:
            expected[a_row, 3] = (code & 3) << (8 * q + 6)
            expected[nibble_row, 3] = (code >> 2) << (8 * q + shift + 3)
        else:
            expected[nibble_row, 3] = code << (8 * q + shift)
        assert torch.equal(words, expected), (p, q, i)


def test_tiled_layer_is_smaller_for_int3():
    n, k = 576, 1536
    int4, int3 = tile(_random(4, n, k, 128)), tile(_random(3, n, k, 128))
    assert int3.weight.numel() * 4 == n * k * 3 // 8 and int4.weight.numel() * 4 == n * k // 2
    assert int3.nbytes() < 0.8 * int4.nbytes()


# ----------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("act_bits", [None, 8])
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("m", M_SIZES)
def test_matches_reference_odd_and_model_shapes(isa, bits, act_bits, m):
    for n, k in (INT4_ODD_SHAPES if bits == 4 else INT3_ODD_SHAPES) + MODEL_SHAPES:
        _check(bits, act_bits, m, n, k, 128 if k % 128 == 0 else 32, seed=m + n + k)


@pytest.mark.parametrize("act_bits", [None, 8])
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("group_size", [32, 64, 96, 128, "channel", 2048])
@pytest.mark.parametrize("m", [1, 9, 67, 260])
def test_group_sizes_including_partial_last_group(isa, bits, act_bits, group_size, m):
    k = 224  # 64/96/128 leave a partial last group; 2048 > k is one partial group
    _check(bits, act_bits, m, 64, k, k if group_size == "channel" else group_size)


@pytest.mark.parametrize("bits", [4, 3])
def test_batch_one_units_of_four_tile_pairs(isa, bits):
    """Batch 1 with int8 activations on a layer of >= 64 tile pairs runs four pairs per task (AVX-512 VNNI),
    the pairs left over one at a time: n = 1032 leaves a last pair of one tile (int4), n = 1056 two pairs."""
    n = 1032 if bits == 4 else 1056
    for act_bits in (8, None):
        _check(bits, act_bits, 1, n, 256, 64, seed=n + bits)


@pytest.mark.parametrize("bits,k,group_size", [(4, 144, 48), (4, 240, 80), (3, 192, 96), (4, 1024, 128), (3, 1024, "channel")])
def test_batch_one_int8_activations_on_the_one_stream_kernels(isa, bits, k, group_size):
    """One row of int8 activations takes the one-stream kernels where the CPU has VNNI (x's a8 codes in their lane
    order; groups of 48 and 80 inputs end in a block of 16, which the scalar rounding loop places): the result is
    the reference's, and gemm_tiled_many's one parallel region gives each layer's gemm_tiled bit for bit."""
    group = k if group_size == "channel" else group_size
    for n in (8, 40, 96) if bits == 4 else (32, 96):
        _check(bits, 8, 1, n, k, group, seed=n + k)
    layers = [tile(_random(bits, n, k, group, seed=n)) for n in (32, 96, 64)]
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k))
    for one, many in zip([ops.gemm_tiled(x, t, 8) for t in layers], ops.gemm_tiled_many(x, layers, 8)):
        assert torch.equal(one, many)


@pytest.mark.parametrize("act_bits", [None, 8])
@pytest.mark.parametrize("bits", [4, 3])
def test_large_batches_run_in_passes(isa, bits, act_bits):
    """Past 256 rows the tile kernels run the batch in even passes (257: 129 + 128; 513: three of 171); each pass
    prepares its own rows' codes, limbs and group sums, so a pass that reads or writes another's rows, or a row
    left out, shows as an error of order 1 in those rows, and x ends before a guard page: a read past its last
    row crashes."""
    n, k = (200, 136) if bits == 4 else (96, 160)
    group = 8 if bits == 4 else 32
    packed = _random(bits, n, k, group, seed=n)
    for m in (256, 257, 513):
        x = rows_before_guard_page(m, k, seed=m)
        ref = _reference(bits, act_bits)(x, packed.qweight, packed.qzeros, packed.scales, group)
        assert rel_err(ops.gemm_tiled(x, tile(packed), act_bits), ref) < 1e-5, m


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_activations(isa, bits, dtype):
    for m in (3, 11, 70, 260):
        _check(bits, None, m, 576, 576, 128, dtype, tol=8e-3)


AMX = pytest.mark.skipif(not ops.cpu_amx_bf16(), reason="this CPU (or OS) has no AMX-BF16 tile unit")
AMX_REFERENCE = {4: reference.int4_gemm, 3: reference.int3_gemm, 8: reference.int8_gemm}
AMX_RANDOM = {4: random_int4, 3: random_int3, 8: random_int8}


@pytest.mark.parametrize("bits", [4, 3, 8])
def test_bf16_panels_match_reference(bits, bf16_engine, monkeypatch):
    """bf16 activations from 8 rows on the bf16 panels, on each engine (AMX tile unit, AVX512-BF16): 16-row
    blocks / 8-row register blocks and short last ones, passes of 64 rows (70, 200: the whole-panel decode), a
    last panel with one tile of two, units of panels with some missing (n = 24, 40, 56), partial groups, groups
    longer than a chunk of decoded codes (per channel, k = 1536), and for int4 a group size that splits a
    32-input tile step (the dequantized-panel fallback). A layer of 2^22 weights keeps the vdpbf16ps engine
    past 128 rows. Same bound as any bf16 path (output rounded to bf16); with both engines off the same inputs
    take the fp32 paths."""
    for m in (8, 9, 16, 17, 64, 70, 127, 200):
        odd = ((32, 64, 32), (160, 224, 96)) if bits == 3 else ((24, 64, 32), (40, 224, 96), (56, 96, 24))
        shapes = odd + ((576, 1536, 128), (64, 1536, 1536)) + (((1024, 4096, 128),) if m == 200 else ())
        for n, k, group in shapes:  # int3: n % 32 == 0
            packed = AMX_RANDOM[bits](n, k, group, seed=m + n)[0]
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
            ref = AMX_REFERENCE[bits](x, packed.qweight, packed.qzeros, packed.scales, group)
            y = ops.gemm_tiled(x, tile(packed))
            assert y.dtype == torch.bfloat16 and rel_err(y, ref) < 8e-3, (m, n, k)
            with monkeypatch.context() as off_paths:
                fp32_paths_only(off_paths)
                off = ops.gemm_tiled(x, tile(packed))
            assert rel_err(off, ref) < 8e-3 and rel_err(y, off) < 8e-3, (m, n, k)


@pytest.mark.parametrize("bits", [4, 3])
def test_bf16_panels_one_hot_rows_are_exact(bits, bf16_engine):
    """One bf16 input per row times a 0/1 weight (codes 1 and 2, zero point 1, scale 1): every product and sum
    is exact, so each output must be that input or zero, bit for bit, on each engine. A wrong column, row, pair
    order, panel or group changes outputs (the reference bound above would hide a few)."""
    for m in (8, 13, 64, 70, 127):
        for n, k, group in ((64, 224, 32), (40 if bits == 4 else 96, 96, 32), (576, 1536, 128), (64, 1536, 1536)):
            gen = torch.Generator().manual_seed(m + n)
            selected = torch.rand(n, k, generator=gen) < 0.5
            groups = (k + group - 1) // group
            ones = torch.ones(n, groups)
            pack = pack_int4 if bits == 4 else pack_int3
            packed = pack(1 + selected.to(torch.int64), ones.to(torch.int64), ones, group)
            columns = torch.randint(0, k, (m,), generator=gen)
            x = torch.zeros(m, k)
            x[torch.arange(m), columns] = torch.randn(m, generator=gen) * 100
            x = x.bfloat16()
            expected = torch.where(selected[:, columns].T, x[torch.arange(m), columns][:, None], 0.0).bfloat16()
            assert torch.equal(ops.gemm_tiled(x, tile(packed)), expected), (m, n, k, group)


@AMX
@pytest.mark.parametrize("bits", [4, 3])
def test_amx_fp32_activations_lose_no_bit(bits, monkeypatch):
    """fp32 activations from 8 to 255 rows run on the tile unit as three bf16 planes whose sum is exactly x. With
    a 0/1 weight (codes 1 and 2, zero point 1, scale 1) and one full-precision input per row, every product and
    sum is exact: the output must equal x's input bit for bit (two planes would lose its last 8 bits). With AMX
    off the fp32 panel and register kernels give the same."""
    for m in (1, 8, 17, 64, 70, 200, 255):
        for n, k, group in ((64, 224, 32), (576, 1536, 128), (64, 1536, 1536), (1024, 4096, 128)):
            gen = torch.Generator().manual_seed(m + n)
            selected = torch.rand(n, k, generator=gen) < 0.5
            codes = 1 + selected.to(torch.int64)
            groups = (k + group - 1) // group
            ones = torch.ones(n, groups)
            packed = (pack_int4 if bits == 4 else pack_int3)(codes, ones.to(torch.int64), ones, group)
            x, columns = full_precision_one_hot_rows(m, k, seed=m)
            expected = torch.where(selected[:, columns].T, x[torch.arange(m), columns][:, None], 0.0)
            for amx in ("1", "0"):
                monkeypatch.setenv("COMPTRUST_CPU_AMX", amx)
                y = ops.gemm_tiled(x, tile(packed))
                assert torch.equal(y, expected), (m, n, k, group, amx)
    for m in (8, 70, 255):  # and general inputs across a wide range, against the reference
        packed = AMX_RANDOM[bits](576, 1536, 128, seed=m)[0]
        x = wide_range_rows(m, 1536, seed=m)
        ref = AMX_REFERENCE[bits](x, packed.qweight, packed.qzeros, packed.scales, 128)
        assert rel_err(ops.gemm_tiled(x, tile(packed)), ref) < 1e-6


# (n, k, group) per bits: int4 a tile alone and odd tile counts (the two-tile work units), blocks of 32 inputs cut
# short by the group (g16, g48, g80) and by k (k = 48); int3 the fewest tiles its layout allows (n = 32), groups of
# one block, groups that k cuts short (g96 at k = 160), per-channel (g = k), k = 4096 (on every L1 of 20+ KB).
# fp32 x's limb blocks are a group's inputs up to 128: groups longer than that (g336, g352, g224, per-channel at
# k = 1024) hold several, the last one shorter, and odd step counts (g80, g96) leave a step for one sum set alone.
ONE_STREAM_CASES = {
    4: ((8, 16, 16), (24, 48, 48), (40, 160, 80), (200, 96, 96), (1536, 576, 128), (576, 1536, 128), (72, 208, 16),
        (24, 672, 336), (16, 1024, 1024)),
    3: ((32, 32, 32), (96, 64, 32), (160, 160, 96), (224, 96, 96), (1536, 576, 128), (576, 1536, 128), (64, 224, 224),
        (32, 4096, 128), (32, 704, 352), (32, 1024, 1024)),
}


@pytest.mark.parametrize("bits", [4, 3])
def test_one_row_in_one_weight_stream_keeps_fp32_accuracy(bits, monkeypatch):
    """One fp32 row on an int4 layer whose k and group size are multiples of 16 (int3: group size a multiple of 32)
    takes a one-stream VNNI kernel (int4: two word rows of a tile per load; int3: a tile's 192-byte block pairs,
    byte-parallel codes), x as three int8 limbs; wide-range inputs, against the reference on
    every ISA (the others keep their kernels), as one layer and several of one x (gemm_tiled_many: the same
    kernel, so bit-identical)."""
    random_layer, reference_gemm = AMX_RANDOM[bits], AMX_REFERENCE[bits]
    for n, k, group in ONE_STREAM_CASES[bits]:
        layers = [random_layer(n, k, group, seed=n + k + i)[0] for i in range(2)]
        x = wide_range_rows(1, k, seed=k)
        for isa in available_isas():
            monkeypatch.setenv("COMPTRUST_CPU_ISA", isa)
            outputs = ops.gemm_tiled_many(x, [tile(packed) for packed in layers])
            for packed, y in zip(layers, outputs):
                ref = reference_gemm(x, packed.qweight, packed.qzeros, packed.scales, group)
                assert rel_err(y, ref) < 2e-6, (n, k, group, isa, rel_err(y, ref))
                assert torch.equal(y, ops.gemm_tiled(x, tile(packed))), (n, k, group, isa)


@pytest.mark.skipif(ops._C is None or not ops._C.cpu_avx512_vnni(), reason="the one-stream kernels need AVX-512 VNNI")
@pytest.mark.parametrize("bits", [4, 3])
def test_one_stream_kernels_take_k_while_the_limbs_fit_in_l1(bits, monkeypatch):
    """fp32 x takes the one-stream kernel while its three limbs (3k bytes) fill at most 70% of the L1 data cache:
    k = 8192 (24 KB) leaves it on a 32 KB L1 and takes it on a 48 KB one. Both kernels keep fp32 accuracy; they sum
    in different orders, so their last bits differ: the setting moved the layer."""
    packed = _random(bits, 64, 8192, 128, seed=bits)
    x = wide_range_rows(1, 8192, seed=bits)
    ref = _reference(bits, None)(x, packed.qweight, packed.qzeros, packed.scales, 128)
    outputs = {}
    for l1d in (32 * 1024, 48 * 1024):
        monkeypatch.setenv("COMPTRUST_CPU_L1D_BYTES", str(l1d))
        assert ops._C.cpu_l1d_bytes() == l1d
        outputs[l1d] = ops.gemm_tiled(x, tile(packed))
        assert rel_err(outputs[l1d], ref) < 2e-6, (l1d, rel_err(outputs[l1d], ref))
    assert not torch.equal(outputs[32 * 1024], outputs[48 * 1024])
    assert torch.equal(outputs[48 * 1024], ops.gemm_tiled_many(x, [tile(packed)])[0])
    for bad in ("48k", "0", "-1"):
        monkeypatch.setenv("COMPTRUST_CPU_L1D_BYTES", bad)
        with pytest.raises(RuntimeError, match="COMPTRUST_CPU_L1D_BYTES=" + bad):
            ops.gemm_tiled(x, tile(packed))


@pytest.mark.parametrize("bits", [4, 3])
def test_fp32_as_int8_limbs_keeps_fp32_accuracy(bits, monkeypatch):
    """With VNNI, fp32 x runs on the int8 kernels as three int8 limbs per block (a group's inputs up to 128),
    leaving at most 2^-23 of the block's largest input: at batch 1 (int3 always; int4 from 2^22 weights where the
    one-stream kernel does not take it: limbs too big for L1, or k or the group size not a multiple of 16), on
    layers of 2^22+ weights at every batch (300 rows: two passes of 150), on layers of 2^18+ from 8 rows (int3: 2)
    to 63. Wide-range inputs (a
    dropped third limb: 4e-5 relative error), groups that cut blocks short (int4 g24), groups of several blocks
    and a last group cut short (g352 at k = 4096: 128 + 128 + 96, then 128 + 96), odd row counts (the kernels take
    rows in pairs), bf16 x; and against the other ISAs' fp32 kernels."""
    for n, k, group in ((1024, 4096, 128), (1024, 4096, 24), (1024, 4096, 352), (64, 224, 32), (576, 1536, 128),
                        (512, 512, 64)):
        if bits == 3 and group % 32:
            continue
        packed = AMX_RANDOM[bits](n, k, group, seed=n + group)[0]
        ref_op = AMX_REFERENCE[bits]
        for m in (1, 2, 3, 8, 17, 63, 64, 255, 300):
            if n * k < 1 << 22 and m > 64:
                continue  # small layers leave the limbs at 64 rows; the other paths have their own tests
            x = wide_range_rows(m, k, seed=m)
            ref = ref_op(x, packed.qweight, packed.qzeros, packed.scales, group)
            y = ops.gemm_tiled(x, tile(packed))
            assert rel_err(y, ref) < 2e-6, (n, k, group, m, rel_err(y, ref))
            if m in (1, 17):
                for isa in available_isas():
                    monkeypatch.setenv("COMPTRUST_CPU_ISA", isa)
                    assert rel_err(ops.gemm_tiled(x, tile(packed)), ref) < 2e-6, (n, k, group, m, isa)
                monkeypatch.delenv("COMPTRUST_CPU_ISA")
        xb = x.bfloat16()
        ref = ref_op(xb, packed.qweight, packed.qzeros, packed.scales, group)
        assert rel_err(ops.gemm_tiled(xb, tile(packed)), ref) < 8e-3


@AMX
def test_bf16_shapes_the_tile_unit_does_not_take_stay_correct():
    """k = 40 (not a tile step of 32) and 7 rows (below the tile path) take the fp32 paths on an AMX CPU."""
    packed = random_int4(16, 40, 8)[0]
    for m in (7, 20):
        x = torch.randn(m, 40).bfloat16()
        ref = reference.int4_gemm(x, packed.qweight, packed.qzeros, packed.scales, 8)
        assert rel_err(ops.gemm_tiled(x, tile(packed)), ref) < 8e-3


def test_int3_op_in_gptq_layout_runs_the_tiled_kernel():
    packed = _random(3, 96, 160, 32)
    x = torch.randn(4, 160)
    y = torch.ops.comptrust.int3_gemm(x, packed.qweight, packed.qzeros, packed.scales, 32)
    assert rel_err(y, reference.int3_gemm(x, packed.qweight, packed.qzeros, packed.scales, 32)) < 1e-5
    assert rel_err(ops.int3_gemm(x, packed.qweight, packed.qzeros, packed.scales, 32), y) == 0


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("act_bits", [None, 8])
def test_thread_count_does_not_change_results(bits, act_bits):
    """Our kernels split work by tiles, which are independent, so the thread count changes no bit, at any batch
    (300 rows: two passes). The BLAS path (float activations from 64 rows on the scalar ISA only) is MKL's
    reduction, which like dense F.linear may round differently with another thread count; it must still be
    repeatable at a fixed count."""
    from comptrust import _C

    tiled = tile(_random(bits, 576, 1536, 128))
    threads = torch.get_num_threads()
    blas = _C.cpu_isa() == "scalar"
    for m in (1, 13, 70, 300):
        x = torch.randn(m, 1536)
        try:
            torch.set_num_threads(1)
            one = ops.gemm_tiled(x, tiled, act_bits)
            torch.set_num_threads(max(2, threads))
            many = ops.gemm_tiled(x, tiled, act_bits)
            again = ops.gemm_tiled(x, tiled, act_bits)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(many, again), m
        if m < 64 or act_bits or not blas:
            assert torch.equal(one, many), m
        else:
            assert rel_err(one, many) < 1e-6, m


def test_extreme_codes_zero_rows_and_empty_batch(isa):
    from comptrust.formats import pack_int3, pack_int4

    for bits, pack, top in ((4, pack_int4, 15), (3, pack_int3, 7)):
        n, k = 32, 64
        codes = torch.full((n, k), top)
        codes[::2] = 0
        packed = pack(codes, torch.full((n, 2), top + 1), torch.full((n, 2), 0.5), 32)
        x = torch.randn(3, k)
        for act_bits in (None, 8):
            ref = _reference(bits, act_bits)(x, packed.qweight, packed.qzeros, packed.scales, 32)
            assert rel_err(ops.gemm_tiled(x, tile(packed), act_bits), ref) < 1e-5
            assert torch.equal(ops.gemm_tiled(torch.zeros(2, k), tile(packed), act_bits), torch.zeros(2, n))
            assert ops.gemm_tiled(torch.zeros(0, k), tile(packed), act_bits).shape == (0, n)


def test_randomized_sweep_1000_cases():
    """1,000 seeded random cases over int4/int3 x float/int8 activations x shape, group, batch, dtype."""
    gen = torch.Generator().manual_seed(2026)
    worst = {}

    def draw(low, high):
        return int(torch.randint(low, high, (1,), generator=gen))

    for case in range(1000):
        bits, act_bits = (4, 3)[case % 2], (None, 8)[(case // 2) % 2]
        unit = 8 if bits == 4 else 32
        n = (8 if bits == 4 else 32) * draw(1, 9)
        k = unit * draw(1, 320 // unit + 1)
        group = unit * draw(1, 160 // unit + 1) if draw(0, 4) else k
        m = draw(1, 12) if draw(0, 8) else draw(64, 300)  # one case in 8 on the panel, some in two passes
        dtype = (torch.float32, torch.bfloat16)[draw(0, 4) == 0]
        packed = _random(bits, n, k, group, seed=case)
        x = torch.randn(m, k, generator=gen).to(dtype)
        y = ops.gemm_tiled(x, tile(packed), act_bits)
        ref = _reference(bits, act_bits)(x, packed.qweight, packed.qzeros, packed.scales, group)
        err = rel_err(y, ref)
        key = (bits, act_bits, dtype)
        worst[key] = max(worst.get(key, 0.0), err)
        assert err < (1e-5 if dtype == torch.float32 else 8e-3), (
            f"case {case}: int{bits} a{act_bits} m={m} n={n} k={k} g={group} {dtype}: {err:.2e}")
    assert len(worst) == 8  # every combination was drawn


# ------------------------------------------------------------------------------------- bad input
def _tiled(bits=4, n=32, k=64, group=32):
    return tile(_random(bits, n, k, group))


BAD_CASES = [
    ("bits 5", lambda t: (torch.zeros(2, 64), t.weight, t.zeros, t.scales, 5, 32, 0), "bits=5"),
    ("act bits 4", lambda t: (torch.zeros(2, 64), t.weight, t.zeros, t.scales, 4, 32, 4), "act_bits=4"),
    ("k mismatch", lambda t: (torch.zeros(2, 72), t.weight, t.zeros, t.scales, 4, 32, 0), r"expected \[n/8, 9, 8\]"),
    ("group mismatch", lambda t: (torch.zeros(2, 64), t.weight, t.zeros, t.scales, 4, 64, 0), "zeros is"),
    ("bad group", lambda t: (torch.zeros(2, 64), t.weight, t.zeros, t.scales, 4, 12, 0), "group_size=12"),
    ("int3 as int4", lambda t: (torch.zeros(2, 64), t.weight, t.zeros, t.scales, 3, 32, 0), "int3 weight is"),
    ("x 0-D", lambda t: (torch.tensor(1.0), t.weight, t.zeros, t.scales, 4, 32, 0), r"\[\.\.\., k\]"),
    ("x 3-D, k mismatch", lambda t: (torch.zeros(2, 3, 32), t.weight, t.zeros, t.scales, 4, 32, 0), "weight is"),
    ("int x", lambda t: (torch.zeros(2, 64, dtype=torch.int32), t.weight, t.zeros, t.scales, 4, 32, 0), "float32"),
    ("fp32 scales", lambda t: (torch.zeros(2, 64), t.weight, t.zeros, t.scales.float(), 4, 32, 0), "float16"),
    ("int32 zeros", lambda t: (torch.zeros(2, 64), t.weight, t.zeros.int(), t.scales, 4, 32, 0), "uint8"),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_inputs_raise_clear_errors(case):
    _, args, message = case
    with pytest.raises(RuntimeError, match=message):
        torch.ops.comptrust.gemm_tiled(*args(_tiled()))


@pytest.mark.parametrize("act_bits", [None, 8])
def test_any_leading_dimensions_as_f_linear(act_bits):
    """x [..., k] -> y [..., n]: 3-D (how the layers pass activations), non-contiguous and empty inputs give the
    2-D op's rows; 1-D x is a batch of one."""
    packed = _random(4, 40, 96, 32)
    tiled = tile(packed)
    x = torch.randn(2, 3, 96)
    flat = ops.gemm_tiled(x.reshape(6, 96), tiled, act_bits)
    assert torch.equal(ops.gemm_tiled(x, tiled, act_bits), flat.reshape(2, 3, 40))
    assert torch.equal(ops.gemm_tiled(x[1, 2], tiled, act_bits), ops.gemm_tiled(x[1, 2][None], tiled, act_bits)[0])
    assert torch.equal(ops.gemm_tiled(x.transpose(0, 1), tiled, act_bits), flat.reshape(2, 3, 40).transpose(0, 1))
    assert ops.gemm_tiled(x[:0], tiled, act_bits).shape == (0, 3, 40)


def test_tiling_rejects_columns_not_in_tiles_of_8():
    from comptrust.formats import Int4Packed

    packed = _random(4, 32, 64, 32)
    odd = Int4Packed(packed.qweight[:, :28].contiguous(), packed.qzeros, packed.scales[:, :28].contiguous(), 32)
    with pytest.raises(ValueError, match="multiple of 8"):
        tile_int4(odd)


def test_tiled_weight_reports_shape():
    t = _tiled(3, 96, 160, 32)
    assert isinstance(t, TiledWeight) and (t.out_features, t.in_features, t.bits) == (96, 160, 3)


# ------------------------------------------------------------------- several weights, one x (gemm_tiled_many)
def _layers(bits, shapes, k, group_size, seed=0):
    make = {4: random_int4, 3: random_int3, 8: random_int8}[bits]
    return [tile(make(n, k, group_size, seed + i)[0]) for i, n in enumerate(shapes)]


@pytest.mark.parametrize("bits, act_bits", [(4, None), (4, 8), (3, None), (3, 8), (8, None)])  # int8: float x only
@pytest.mark.parametrize("x_shape", [(1, 1, 576), (576,), (1, 576), (3, 576), (2, 1, 576)])
def test_gemm_tiled_many_equals_each_gemm_tiled(isa, bits, act_bits, x_shape):
    """Bit for bit: at batch 1 the same kernel runs per tile pair, only scheduled together (q/k/v shapes, and a
    layer of one tile where int4/int8 allow it: int3 needs 32 outputs)."""
    tiles = _layers(bits, (576, 192, 32 if bits == 3 else 8), 576, 64 if bits == 3 else 128)
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(7))
    got = ops.gemm_tiled_many(x, tiles, act_bits)
    assert len(got) == 3
    for y, t in zip(got, tiles):
        expected = ops.gemm_tiled(x, t, act_bits)
        assert y.shape == expected.shape == (*x_shape[:-1], t.out_features) and torch.equal(y, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_tiled_many_other_activation_dtypes(dtype):
    tiles = _layers(4, (1536, 1536), 576, 128)
    x = torch.randn(1, 1, 576).to(dtype)
    for y, t in zip(ops.gemm_tiled_many(x, tiles), tiles):
        assert y.dtype == dtype and torch.equal(y, ops.gemm_tiled(x, t))


def test_gemm_tiled_many_refuses_mixed_or_missing_weights():
    int4 = _layers(4, (64,), 128, 128)
    with pytest.raises(ValueError, match="share bits and group size"):
        ops.gemm_tiled_many(torch.randn(1, 128), int4 + _layers(4, (64,), 128, 64))
    with pytest.raises(ValueError, match="no weights"):
        ops.gemm_tiled_many(torch.randn(1, 128), [])
    with pytest.raises(RuntimeError, match="expected \\[n/8, 32, 8\\] for k=256"):
        ops.gemm_tiled_many(torch.randn(1, 256), int4 + _layers(4, (64,), 256, 128))
    t = int4[0]
    with pytest.raises(RuntimeError, match="as many zeros and scales"):
        torch.ops.comptrust.gemm_tiled_many(torch.randn(1, 128), [t.weight, t.weight], [t.zeros], [t.scales], 4,
                                            128, 0)
