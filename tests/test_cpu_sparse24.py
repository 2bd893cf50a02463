"""The CPU 2:4 kernels (csrc/cpu/sparse24_*.cpp), their tiled layout (comptrust.formats.cpu_tiles,
csrc/include/comptrust/sparse24_tiles.h) and the storage-layout ops that tile and run them.

Each SIMD path is forced in turn through COMPTRUST_CPU_ISA. The reference is the fp32 product with the
dense weight (comptrust.reference): kernels differ only by summation order, bound 1e-5 relative Frobenius
error (measured ~1e-7). bf16 / fp16 activations are converted to fp32 on entry and the output rounded
once: bound 8e-3 (2^-8 is bf16's step). A wrong index, nibble, value slot, zero, scale or group gives
errors of order 1. Batches below 192 rows run the sparse kernel on blocks of 4 rows (1..3-row tails
included); from 192 rows the weight is expanded to dense blocks for torch's GEMM (bf16 activations: bf16
blocks); on AVX-512, float kept values run the row-vector kernel instead from 32 rows (bf16 x: up to 511)
(sparse24_row_vectors.h: blocks of up to 96 rows, the last register zero-padded), int4 ones too from 64 rows
on layers of 2^24 weights and from 32 elsewhere where the tile unit does not take them; on a CPU with AMX-BF16, bf16 activations from 8 to 1023 rows run on the tile unit, and fp32 ones from
16 to 191 rows where the kept values are exact in bf16 (three exact bf16 planes of x). All are covered.
"""
import pytest
import torch

from comptrust import _C, ops, reference
from comptrust.formats.cpu_tiles import TiledSparse24, tile_sparse24, tile_sparse24_int4, untile_sparse24
from comptrust.formats.sparse24 import (Sparse24Packed, dequantize_sparse24_int4, pack_sparse24, prune_magnitude_24,
                                        unpack_sparse24)
from quant_cases import (MODEL_SHAPES, available_isas, fp32_paths_only, full_precision_one_hot_rows, rel_err,
                         rows_before_guard_page, wide_range_rows)
from sparse24_cases import uniform_sparse24, uniform_sparse24_int4

FLOAT_ODD_SHAPES = ((8, 8), (24, 40), (200, 136), (16, 200), (40, 96))
INT4_ODD_SHAPES = ((8, 16), (24, 48), (200, 144), (40, 96))
M_SIZES = (1, 2, 3, 5, 8, 13, 70, 200)
VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_float(m, n, k, value_dtype=torch.float32, x_dtype=torch.float32, seed=0):
    packed = uniform_sparse24(n, k, value_dtype, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(x_dtype)
    y = ops.sparse24_tiled(x, tile_sparse24(packed))
    assert y.shape == (m, n) and y.dtype == x_dtype
    err = rel_err(y, reference.sparse24_gemm(x, packed.values, packed.meta))
    tol = 1e-5 if x_dtype == torch.float32 else 8e-3
    assert err < tol, f"2:4 m={m} n={n} k={k} values {value_dtype} x {x_dtype}: rel err {err:.2e}"


def _check_int4(m, n, k, group_size, x_dtype=torch.float32, seed=0):
    packed = uniform_sparse24_int4(n, k, group_size, seed)
    q = packed.qvalues
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(x_dtype)
    y = ops.sparse24_tiled(x, tile_sparse24_int4(packed))
    assert y.shape == (m, n) and y.dtype == x_dtype
    err = rel_err(y, reference.sparse24_int4_gemm(x, q.qweight, q.qzeros, q.scales, packed.meta, group_size))
    tol = 1e-5 if x_dtype == torch.float32 else 8e-3
    assert err < tol, f"2:4+int4 m={m} n={n} k={k} g={group_size} x {x_dtype}: rel err {err:.2e}"


# ------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("dtype", VALUE_DTYPES)
def test_tile_untile_round_trip_is_bit_exact(dtype):
    packed = uniform_sparse24(200, 136, dtype, seed=3)
    tiled = tile_sparse24(packed)
    assert (tiled.out_features, tiled.in_features) == (200, 136) and tiled.int4 is None
    back = untile_sparse24(tiled)
    assert torch.equal(back.values, packed.values) and torch.equal(back.meta, packed.meta)


@pytest.mark.parametrize("group_size", [8, 16, 24, 72])
def test_int4_tile_untile_round_trip_is_bit_exact(group_size):
    packed = uniform_sparse24_int4(40, 144, group_size, seed=group_size)
    back = untile_sparse24(tile_sparse24_int4(packed))
    assert torch.equal(back.meta, packed.meta)
    for name in ("qweight", "qzeros", "scales"):
        assert torch.equal(getattr(back.qvalues, name), getattr(packed.qvalues, name)), name


def test_meta_words_follow_the_documented_layout():
    # Column c's nibble of group g sits at bits 4c..4c+3 of word (tile, g); values (t, g, j, c) = values[8t+c, 2g+j].
    packed = uniform_sparse24(16, 32, seed=5)
    tiled = tile_sparse24(packed)
    for row in (0, 3, 8, 15):
        for g in (0, 1, 6, 7):
            nibble = (int(packed.meta[row, g // 2]) >> (4 * (g % 2))) & 0xF
            word = int(tiled.meta[row // 8, g]) & 0xFFFFFFFF
            assert (word >> (4 * (row % 8))) & 0xF == nibble
            for j in (0, 1):
                assert tiled.values[row // 8, g, j, row % 8] == packed.values[row, 2 * g + j]


def test_tiled_2_4_reads_about_half_of_dense():
    n, k = 576, 1536
    fp32 = tile_sparse24(uniform_sparse24(n, k)).nbytes()
    assert fp32 == n * k // 2 * 4 + n * k // 8  # values + 4 bits of metadata per group of 4
    int4 = tile_sparse24_int4(uniform_sparse24_int4(n, k, 64)).nbytes()
    assert int4 == n * k // 4 + n * k // 8 + n * (k // 2 // 64) * 3


# --------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("m", M_SIZES)
def test_float_values_match_reference_odd_and_model_shapes(isa, m):
    for n, k in FLOAT_ODD_SHAPES + MODEL_SHAPES[:2]:
        _check_float(m, n, k, seed=n + k)


@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 9, 193])
def test_value_and_activation_dtypes(isa, value_dtype, x_dtype, m):
    _check_float(m, 200, 136, value_dtype, x_dtype)


@pytest.mark.parametrize("m", M_SIZES)
def test_int4_values_match_reference_odd_and_model_shapes(isa, m):
    for n, k in INT4_ODD_SHAPES + MODEL_SHAPES[:2]:
        _check_int4(m, n, k, 8 if k < 96 else 64, seed=n + k)


@pytest.mark.parametrize("m", [1, 2, 5, 70])
def test_int4_values_with_int8_activations_match_reference(isa, m):
    """act_bits=8: x quantized per row and block of 32 inputs within each group of 2 * group_size inputs
    (the VNNI kernel on an AVX-512 VNNI CPU, else the float kernels on the dequantized x; both against
    reference.sparse24_int4_gemm_a8). Odd tile counts leave a last pair of one tile; groups of 8 and 24 kept
    values end blocks of 32 inputs early; 88 kept values leave a partial last group. At batch 1, where k and a
    group's inputs are multiples of 32 (576 x 1536 g64; 1048 x 64 g16: 131 tiles), one tile at a time
    (stream_int4_avx512), else (the other shapes) in tile pairs."""
    for n, k, group_size in ((24, 48, 8), (40, 96, 24), (200, 176, 16), (8, 176, 64), (576, 1536, 64), (1048, 64, 16)):
        packed = uniform_sparse24_int4(n, k, group_size, seed=m + n)
        q = packed.qvalues
        for x_dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)).to(x_dtype)
            y = ops.sparse24_tiled(x, tile_sparse24_int4(packed), 8)
            ref = reference.sparse24_int4_gemm_a8(x, q.qweight, q.qzeros, q.scales, packed.meta, group_size)
            tol = 1e-5 if x_dtype == torch.float32 else 8e-3
            assert y.dtype == x_dtype and rel_err(y, ref) < tol, (m, n, k, group_size, x_dtype)


def test_int8_activations_need_int4_values_and_act_bits_8():
    packed = uniform_sparse24_int4(16, 32, 8)
    tiled = tile_sparse24_int4(packed)
    q = tiled.int4
    with pytest.raises(RuntimeError, match="act_bits=4 must be 0"):
        torch.ops.comptrust.sparse24_int4_gemm_tiled(torch.randn(1, 32), q.weight, tiled.meta, q.zeros, q.scales, 8, 4)
    with pytest.raises(ValueError, match="needs int4 kept values"):
        ops.sparse24_tiled(torch.randn(1, 32), tile_sparse24(uniform_sparse24(16, 32)), 8)
    with pytest.raises(ValueError, match="act_bits=16"):
        ops.sparse24_tiled(torch.randn(1, 32), tiled, 16)
    assert ops.sparse24_tiled(torch.randn(0, 32), tiled, 8).shape == (0, 16)  # an empty batch


@pytest.mark.parametrize("group_size", [8, 16, 24, 40, 64, "row"])
@pytest.mark.parametrize("m", [1, 4, 8, 200])
def test_int4_group_sizes_including_partial_last_group(isa, group_size, m):
    k = 176  # 88 kept values: a partial last group for 16, 24, 40, 64
    _check_int4(m, 24, k, k // 2 if group_size == "row" else group_size)


@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
def test_batch_one_units_of_four_tiles(isa, value_dtype, monkeypatch):
    """Batch 1, float values, >= 128 tiles: four tiles per task (AVX-512), the 3 left over one at a time, or every
    tile one at a time where the CPU reads one weight stream best (AMD; COMPTRUST_CPU_ONE_STREAM forces either): the
    same per-tile arithmetic, so the same bits."""
    tiled = tile_sparse24(uniform_sparse24(1048, 64, value_dtype, seed=7))
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(8))
    outputs = []
    for one_stream in ("0", "1"):
        monkeypatch.setenv("COMPTRUST_CPU_ONE_STREAM", one_stream)
        _check_float(1, 1048, 64, value_dtype, seed=7)
        _check_float(1, 1048, 64, value_dtype, torch.bfloat16, seed=8)
        outputs.append(ops.sparse24_tiled(x, tiled))
    assert torch.equal(outputs[0], outputs[1])
    if isa == "avx512":  # the only path that asks
        monkeypatch.setenv("COMPTRUST_CPU_ONE_STREAM", "yes")
        with pytest.raises(RuntimeError, match="COMPTRUST_CPU_ONE_STREAM=yes is not 0 or 1"):
            ops.sparse24_tiled(x, tiled)


def test_int4_bf16_activations(isa):
    _check_int4(5, 40, 96, 16, torch.bfloat16)
    _check_int4(11, 40, 96, 16, torch.bfloat16)
    _check_int4(200, 40, 96, 16, torch.bfloat16)


def test_bf16_panels_match_reference(bf16_engine, monkeypatch):
    """bf16 activations from 8 rows on the bf16 panels, on each engine (AMX tile unit; AVX512-BF16, whose panels
    hold sparse rows, the kept values and their inputs' positions, gathered by vpermw): 16-row
    blocks / 8-row register blocks and short last ones, passes of 64 rows, a last panel with one tile of two,
    units of panels with some missing, every value kind. int4 with groups of 16 kept values (32 inputs, panels
    of q - zero), per channel (groups longer than a chunk of decoded codes) and of 8 (splitting a tile step:
    the dequantized-panel fallback). Past 512 rows only large layers (2^22 weights) stay on the panels.
    With both engines off the fp32 kernels give the same."""
    cases = [(m, n, k, kind) for m in (8, 16, 17, 33, 64, 70, 200) for n, k in ((24, 64), (40, 224), (576, 576))
             for kind in ("float32", "bfloat16", "float16", "int4", "int4-channel", "int4-g8")]
    cases += [(520, 1024, 4096, kind) for kind in ("bfloat16", "int4")]
    for m, n, k, kind in cases:
        if kind.startswith("int4"):
            group = {"int4": 16, "int4-channel": k // 2, "int4-g8": 8}[kind]
            packed = uniform_sparse24_int4(n, k, group, seed=m)
            q = packed.qvalues
            tiled = tile_sparse24_int4(packed)
            ref = lambda x: reference.sparse24_int4_gemm(x, q.qweight, q.qzeros, q.scales, packed.meta, group)
        else:
            packed = uniform_sparse24(n, k, getattr(torch, kind), seed=m)
            tiled = tile_sparse24(packed)
            ref = lambda x: reference.sparse24_gemm(x, packed.values, packed.meta)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
        y = ops.sparse24_tiled(x, tiled)
        assert y.dtype == torch.bfloat16 and rel_err(y, ref(x)) < 8e-3, (m, n, k, kind)
        with monkeypatch.context() as off_paths:
            fp32_paths_only(off_paths)
            off = ops.sparse24_tiled(x, tiled)
        assert rel_err(y, off) < 8e-3, (m, n, k, kind)


def test_bf16_panels_one_hot_rows_are_exact(bf16_engine):
    """One bf16 input per row times a 2:4 weight of ones (bf16 values): each output is that input or zero, bit
    for bit, on each engine; a wrong 2-bit index, column, row or panel changes outputs."""
    for m in (8, 13, 64, 70, 200):
        for n, k in ((40, 224), (576, 576)):
            gen = torch.Generator().manual_seed(m + n)
            keep = torch.zeros(n, k // 4, 4, dtype=torch.bool)
            first = torch.randint(0, 4, (n, k // 4), generator=gen)
            keep.scatter_(2, first[..., None], True)
            keep.scatter_(2, ((first + 1) % 4)[..., None], True)
            selected = keep.reshape(n, k)
            tiled = tile_sparse24(pack_sparse24(selected.to(torch.bfloat16)))
            columns = torch.randint(0, k, (m,), generator=gen)
            x = torch.zeros(m, k)
            x[torch.arange(m), columns] = torch.randn(m, generator=gen) * 100
            x = x.bfloat16()
            expected = torch.where(selected[:, columns].T, x[torch.arange(m), columns][:, None], 0.0).bfloat16()
            assert torch.equal(ops.sparse24_tiled(x, tiled), expected), (m, n, k)


@pytest.mark.skipif(not ops.cpu_amx_bf16(), reason="this CPU (or OS) has no AMX-BF16 tile unit")
def test_amx_fp32_activations_lose_no_bit(monkeypatch):
    """fp32 activations from 16 to 191 rows with values exact in bf16 (bf16 values; int4 in groups of whole tile
    steps) run on the tile unit as three bf16 planes whose sum is exactly x. A 2:4 weight of ones (bf16 values)
    times one full-precision input per row is exact: the output must equal the input bit for bit, on AMX and
    off. Then every value kind (fp32/fp16 values and int4 groups of 8 stay on the sparse kernel) on
    wide-range inputs against the reference."""
    for m in (16, 17, 64, 70, 191):
        for n, k in ((40, 224), (576, 576)):
            keep = torch.zeros(n, k // 4, 4, dtype=torch.bool)
            first = torch.randint(0, 4, (n, k // 4), generator=torch.Generator().manual_seed(m + n))
            keep.scatter_(2, first[..., None], True)
            keep.scatter_(2, ((first + 1) % 4)[..., None], True)
            selected = keep.reshape(n, k)
            tiled = tile_sparse24(pack_sparse24(selected.to(torch.bfloat16)))
            x, columns = full_precision_one_hot_rows(m, k, seed=m)
            expected = torch.where(selected[:, columns].T, x[torch.arange(m), columns][:, None], 0.0)
            for amx in ("1", "0"):
                monkeypatch.setenv("COMPTRUST_CPU_AMX", amx)
                assert torch.equal(ops.sparse24_tiled(x, tiled), expected), (m, n, k, amx)
            for kind in ("float32", "bfloat16", "float16", "int4", "int4-channel", "int4-g8"):
                if kind.startswith("int4"):
                    group = {"int4": 16, "int4-channel": k // 2, "int4-g8": 8}[kind]
                    packed = uniform_sparse24_int4(n, k, group, seed=m)
                    q = packed.qvalues
                    ref = lambda x: reference.sparse24_int4_gemm(x, q.qweight, q.qzeros, q.scales, packed.meta, group)
                    tiled = tile_sparse24_int4(packed)
                else:
                    packed = uniform_sparse24(n, k, getattr(torch, kind), seed=m)
                    ref = lambda x: reference.sparse24_gemm(x, packed.values, packed.meta)
                    tiled = tile_sparse24(packed)
                x = wide_range_rows(m, k, seed=m)
                assert rel_err(ops.sparse24_tiled(x, tiled), ref(x)) < 1e-6, (m, n, k, kind)


# Row counts around the row-vector kernel's edges: 31 (column kernel) and 32, 1-6 registers of 16 rows with and
# without padding, two blocks (97: 49 + 48, 250: three), 511 and 512 (the last for bf16 x, which goes to dense
# blocks from 512; fp32 x stays: six blocks of 86 rows, the last of 82).
ROW_VECTOR_M = (31, 32, 33, 47, 64, 80, 96, 97, 150, 250, 511, 512)
# 33 tiles cross a block of 32 tiles; k = 72 ends in a chunk of 2 groups; k = 8 is a single group.
ROW_VECTOR_SHAPES = ((264, 72), (16, 8), (40, 576))


@pytest.mark.parametrize("m", ROW_VECTOR_M)
def test_row_vector_kernel_one_hot_rows_are_exact(isa, m, monkeypatch):
    """One nonzero input per row: every output is that input times one kept weight, a single rounding, so each
    path must return exactly fp32(w * x). A wrong 2-bit index, slot, column, row or padding changes outputs.
    The bf16 panel engines are off: bf16 kept values with fp32 x would go to the tile unit."""
    fp32_paths_only(monkeypatch)
    for value_dtype in VALUE_DTYPES:
        for n, k in ROW_VECTOR_SHAPES:
            packed = uniform_sparse24(n, k, value_dtype, seed=m + n)
            dense = unpack_sparse24(packed).float()
            x, columns = full_precision_one_hot_rows(m, k, seed=m + k)
            expected = dense[:, columns].T * x[torch.arange(m), columns][:, None]
            y = ops.sparse24_tiled(x, tile_sparse24(packed))
            assert torch.equal(y, expected), (m, n, k, value_dtype)


@pytest.mark.skipif("avx512" not in available_isas(), reason="the row-vector kernel is AVX-512")
@pytest.mark.parametrize("m", [m for m in ROW_VECTOR_M if m >= 32])
def test_row_vector_kernel_int4_one_hot_rows_are_exact(m, monkeypatch):
    """int4 kept values are dequantized a chunk at a time as the reference does, (code - zero) * scale, so here
    too each output of a one-hot row is exactly fp32(w * x). (The column kernel scales after summing
    x * (code - zero): one rounding more, not exact.) Groups of 8 kept values (a word), 24 (groups end inside
    a chunk of 32 kept values; a partial last group), one per row (k/2)."""
    fp32_paths_only(monkeypatch)
    monkeypatch.setenv("COMPTRUST_CPU_ISA", "avx512")
    for n, k in ((264, 96), (16, 16), (40, 592)):
        for group in (8, 24, k // 2):
            packed = uniform_sparse24_int4(n, k, group, seed=m + group)
            dense = dequantize_sparse24_int4(packed)
            x, columns = full_precision_one_hot_rows(m, k, seed=m + k)
            expected = dense[:, columns].T * x[torch.arange(m), columns][:, None]
            assert torch.equal(ops.sparse24_tiled(x, tile_sparse24_int4(packed)), expected), (m, n, k, group)


@pytest.mark.parametrize("m", (32, 64, 97, 200, 600))
def test_row_vector_kernel_wide_range_inputs(isa, m, monkeypatch):
    """Every value kind (int4 in groups of 24) on inputs spanning ~10^+-2.6 within a row, against the reference
    (fp32 x at 1e-6; bf16 / fp16 x rounded once at the end), on a model shape and an odd one (k = 80: a last
    chunk of 4 groups). The bf16 panel engines are off (they would take bf16 x). At 600 rows fp32 and fp16 x stay
    on the row-vector kernel (AVX-512), bf16 x goes to dense blocks."""
    fp32_paths_only(monkeypatch)
    for kind in VALUE_DTYPES + ("int4",):
        for n, k in ((576, 1536), (264, 80)):
            if kind == "int4":
                packed = uniform_sparse24_int4(n, k, 24, seed=m)
                q = packed.qvalues
                tiled = tile_sparse24_int4(packed)
                ref = lambda x: reference.sparse24_int4_gemm(x, q.qweight, q.qzeros, q.scales, packed.meta, 24)
            else:
                packed = uniform_sparse24(n, k, kind, seed=m)
                tiled = tile_sparse24(packed)
                ref = lambda x: reference.sparse24_gemm(x, packed.values, packed.meta)
            x = wide_range_rows(m, k, seed=m + n)
            assert rel_err(ops.sparse24_tiled(x, tiled), ref(x)) < 1e-6, (m, n, k, kind)
            for x_dtype in (torch.bfloat16, torch.float16):
                xl = x.clamp(-6e4, 6e4).to(x_dtype)
                y = ops.sparse24_tiled(xl, tiled)
                assert y.dtype == x_dtype and rel_err(y, ref(xl)) < 8e-3, (m, n, k, kind, x_dtype)


@pytest.mark.parametrize("m", (97, 1000, 4944))
def test_row_vector_blocks_read_only_x_rows(isa, m):
    """x ends right before a page no one may read, so any read past its last row crashes. The row-vector kernel
    splits a batch into blocks of up to 96 rows, each padded to whole registers of 16: 4944 rows once made 51
    blocks of 96 and a last one of 48 padded to 96, whose registers past row 48 gathered from beyond x (a
    crash in an evaluation's prefill of 16 x 309 tokens). Now 52 blocks of 95 or 96; every row lands in place."""
    packed = uniform_sparse24(16, 64, seed=m)
    packed_int4 = uniform_sparse24_int4(16, 64, 8, seed=m)
    q = packed_int4.qvalues
    x = rows_before_guard_page(m, 64, seed=m)
    ref = reference.sparse24_gemm(x, packed.values, packed.meta)
    assert rel_err(ops.sparse24_tiled(x, tile_sparse24(packed)), ref) < 1e-6
    ref = reference.sparse24_int4_gemm(x, q.qweight, q.qzeros, q.scales, packed_int4.meta, 8)
    assert rel_err(ops.sparse24_tiled(x, tile_sparse24_int4(packed_int4)), ref) < 1e-6


def test_batch_one_fp32_int4_values_as_int8_limbs_keep_fp32_accuracy(monkeypatch):
    """At batch 1 with AVX-512 VNNI + VBMI, fp32 x with int4 kept values runs on the int8 kernel as three int8
    limbs per block (to 2^-23 of the block's largest input; a dropped third limb: ~4e-5), on layers of at least
    2^22 weights (smaller ones stay on the float kernel): one tile at a time where k and a group's inputs are
    multiples of 32 and the limbs fill at most 70% of L1 (1048 x 4096 g64; COMPTRUST_CPU_L1D_BYTES=16384 sends it
    to the pairs), its limb blocks a group's inputs up to 128 (g48: one block of 96; g96: 128 + 64, the last group
    cut short; g2048, one group per row: 16 blocks), else in tile pairs (groups that cut blocks short: 8 and 24 kept
    values, 16 and 48 inputs; n = 1032: streamed pairs and a lone last tile). Wide-range inputs, bf16 x, and every
    ISA's kernel on the same inputs."""
    for n, k, group in ((1048, 4096, 64), (1024, 4096, 48), (1040, 4096, 96), (1024, 4096, 2048), (1032, 4096, 8),
                        (1024, 4096, 24), (40, 224, 8)):
        packed = uniform_sparse24_int4(n, k, group, seed=n)
        q, tiled = packed.qvalues, tile_sparse24_int4(packed)
        ref = lambda x: reference.sparse24_int4_gemm(x, q.qweight, q.qzeros, q.scales, packed.meta, group)
        for seed in range(3):
            x = wide_range_rows(1, k, seed=seed)
            assert rel_err(ops.sparse24_tiled(x, tiled), ref(x)) < 2e-6, (n, k, group)
            for isa in available_isas():
                monkeypatch.setenv("COMPTRUST_CPU_ISA", isa)
                assert rel_err(ops.sparse24_tiled(x, tiled), ref(x)) < 2e-6, (n, k, group, isa)
            monkeypatch.delenv("COMPTRUST_CPU_ISA")
        xb = x.bfloat16()
        assert rel_err(ops.sparse24_tiled(xb, tiled), ref(xb)) < 8e-3
    packed = uniform_sparse24_int4(1048, 4096, 64, seed=1)
    q, tiled = packed.qvalues, tile_sparse24_int4(packed)
    x = wide_range_rows(1, 4096, seed=5)
    ref = reference.sparse24_int4_gemm(x, q.qweight, q.qzeros, q.scales, packed.meta, 64)
    one_tile = ops.sparse24_tiled(x, tiled)
    monkeypatch.setenv("COMPTRUST_CPU_L1D_BYTES", "16384")
    pairs = ops.sparse24_tiled(x, tiled)
    assert rel_err(one_tile, ref) < 2e-6 and rel_err(pairs, ref) < 2e-6
    if _C is not None and _C.cpu_avx512_vnni_vbmi():
        assert not torch.equal(one_tile, pairs)  # the kernels sum in different orders: the L1 setting moved it


def test_tiled_ops_take_any_leading_dimensions_as_f_linear():
    """x [..., k] -> y [..., n] for both 2:4 ops: 3-D, non-contiguous and empty inputs give the 2-D op's rows;
    1-D x is a batch of one."""
    for tiled in (_float_tiled(16, 64), _int4_tiled(16, 64, 16)):
        x = torch.randn(2, 3, 64)
        flat = ops.sparse24_tiled(x.reshape(6, 64), tiled)
        assert torch.equal(ops.sparse24_tiled(x, tiled), flat.reshape(2, 3, 16))
        assert torch.equal(ops.sparse24_tiled(x[1, 2], tiled), ops.sparse24_tiled(x[1, 2][None], tiled)[0])
        assert torch.equal(ops.sparse24_tiled(x.transpose(0, 1), tiled), flat.reshape(2, 3, 16).transpose(0, 1))
        assert ops.sparse24_tiled(x[:0], tiled).shape == (0, 3, 16)


def test_storage_layout_ops_tile_and_run_the_same_kernels():
    packed = uniform_sparse24(40, 96)
    x = torch.randn(3, 96)
    assert torch.equal(ops.sparse24_gemm(x, packed.values, packed.meta), ops.sparse24_tiled(x, tile_sparse24(packed)))
    q4 = uniform_sparse24_int4(40, 96, 16)
    q = q4.qvalues
    assert torch.equal(ops.sparse24_int4_gemm(x, q.qweight, q.qzeros, q.scales, q4.meta, 16),
                       ops.sparse24_tiled(x, tile_sparse24_int4(q4)))


def test_magnitude_pruned_weight_runs_exactly_like_its_dense_form(isa):
    weight = prune_magnitude_24(torch.randn(64, 128, generator=torch.Generator().manual_seed(9)))
    for m in (6, 200):
        x = torch.randn(m, 128)
        y = ops.sparse24_tiled(x, tile_sparse24(pack_sparse24(weight)))
        assert rel_err(y, x @ weight.t()) < 1e-5


@pytest.mark.parametrize("int4", [False, True])
def test_thread_count_does_not_change_results(int4):
    tiled = tile_sparse24_int4(uniform_sparse24_int4(576, 1536, 64)) if int4 else tile_sparse24(uniform_sparse24(576, 1536))
    threads = torch.get_num_threads()
    row_vectors = _C.cpu_isa() == "avx512"  # fp32 x from 32 rows on, else dense blocks from 192
    for m in (1, 13, 64, 200, 600):
        x = torch.randn(m, 1536)
        try:
            torch.set_num_threads(1)
            one = ops.sparse24_tiled(x, tiled)
            torch.set_num_threads(max(2, threads))
            many = ops.sparse24_tiled(x, tiled)
            again = ops.sparse24_tiled(x, tiled)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(many, again), m
        if m < 192 or row_vectors:  # our kernels: tiles are independent, no order depends on threads
            assert torch.equal(one, many), m
        else:  # torch's GEMM on expanded blocks: like dense F.linear, may round differently per thread count
            assert rel_err(one, many) < 1e-6, m


def test_all_zero_weight_zero_input_and_empty_batch(isa):
    zero = pack_sparse24(torch.zeros(16, 32))  # every group keeps positions (0, 1) holding +0.0
    tiled = tile_sparse24(zero)
    for m in (9, 200):
        assert torch.equal(ops.sparse24_tiled(torch.randn(m, 32), tiled), torch.zeros(m, 16))
    packed = uniform_sparse24(16, 32)
    assert torch.equal(ops.sparse24_tiled(torch.zeros(2, 32), tile_sparse24(packed)), torch.zeros(2, 16))
    assert ops.sparse24_tiled(torch.zeros(0, 32), tile_sparse24(packed)).shape == (0, 16)
    q4 = tile_sparse24_int4(uniform_sparse24_int4(16, 32, 8))
    assert ops.sparse24_tiled(torch.zeros(0, 32), q4).shape == (0, 16)


def test_randomized_sweep_1000_cases():
    """1,000 seeded random cases over float/int4 values x value dtype x activation dtype x shape, group, batch."""
    gen = torch.Generator().manual_seed(2024)
    worst = {}

    def draw(low, high):
        return int(torch.randint(low, high, (1,), generator=gen))

    for case in range(1000):
        int4 = case % 2 == 1
        n = 8 * draw(1, 9)
        k = (16 if int4 else 8) * draw(1, 320 // (16 if int4 else 8) + 1)
        m = draw(1, 12) if draw(0, 8) else draw(12, 600)  # one case in 8 on the tile unit, row vectors or dense blocks
        x_dtype = (torch.float32, torch.bfloat16)[draw(0, 4) == 0]
        x = torch.randn(m, k, generator=gen).to(x_dtype)
        if int4:
            group = 8 * draw(1, 10) if draw(0, 4) else k // 2
            packed = uniform_sparse24_int4(n, k, group, seed=case)
            q = packed.qvalues
            y = ops.sparse24_tiled(x, tile_sparse24_int4(packed))
            ref = reference.sparse24_int4_gemm(x, q.qweight, q.qzeros, q.scales, packed.meta, group)
            key = ("int4", x_dtype)
        else:
            value_dtype = VALUE_DTYPES[draw(0, 3)]
            packed = uniform_sparse24(n, k, value_dtype, seed=case)
            y = ops.sparse24_tiled(x, tile_sparse24(packed))
            ref = reference.sparse24_gemm(x, packed.values, packed.meta)
            key = (str(value_dtype), x_dtype)
        err = rel_err(y, ref)
        worst[key] = max(worst.get(key, 0.0), err)
        assert err < (1e-5 if x_dtype == torch.float32 else 8e-3), f"case {case}: {key} m={m} n={n} k={k}: {err:.2e}"
    assert len(worst) == 8  # every combination was drawn


# ------------------------------------------------------------------------------------- bad input
def _float_tiled(n=16, k=32) -> TiledSparse24:
    return tile_sparse24(uniform_sparse24(n, k))


def _int4_tiled(n=16, k=64, group=16) -> TiledSparse24:
    return tile_sparse24_int4(uniform_sparse24_int4(n, k, group))


FLOAT_BAD = [
    ("x 0-D", lambda t: (torch.tensor(1.0), t.values, t.meta), r"\[\.\.\., k\]"),
    ("x 3-D, k mismatch", lambda t: (torch.zeros(2, 3, 40), t.values, t.meta), r"meta is .*k/4=10\]"),
    ("int x", lambda t: (torch.zeros(2, 32, dtype=torch.int32), t.values, t.meta), "float32"),
    ("k mismatch", lambda t: (torch.zeros(2, 40), t.values, t.meta), r"meta is .*expected \[n/8, k/4=10\]"),
    ("k not multiple of 8", lambda t: (torch.zeros(2, 36), t.values, t.meta), "multiple of 8"),
    ("int values", lambda t: (torch.zeros(2, 32), t.values.int(), t.meta), "values must be"),
    ("values shape", lambda t: (torch.zeros(2, 32), t.values[:, :4], t.meta), "values is"),
    ("uint8 meta", lambda t: (torch.zeros(2, 32), t.values, t.meta.to(torch.uint8)), "meta must be int32"),
]


@pytest.mark.parametrize("case", FLOAT_BAD, ids=[c[0] for c in FLOAT_BAD])
def test_float_tiled_op_rejects_bad_inputs(case):
    _, args, message = case
    with pytest.raises(RuntimeError, match=message):
        torch.ops.comptrust.sparse24_gemm_tiled(*args(_float_tiled()))


INT4_BAD = [
    ("k not multiple of 16", lambda t: (torch.zeros(2, 40), t.int4.weight, t.meta[:, :10], t.int4.zeros,
                                        t.int4.scales, 16), "multiple of 16"),
    ("bad group", lambda t: (torch.zeros(2, 64), t.int4.weight, t.meta, t.int4.zeros, t.int4.scales, 12),
     "group_size=12"),
    ("group mismatch", lambda t: (torch.zeros(2, 64), t.int4.weight, t.meta, t.int4.zeros, t.int4.scales, 32),
     "zeros is"),
    ("fp32 scales", lambda t: (torch.zeros(2, 64), t.int4.weight, t.meta, t.int4.zeros, t.int4.scales.float(), 16),
     "float16"),
    ("weight shape", lambda t: (torch.zeros(2, 64), t.int4.weight[:, :2], t.meta, t.int4.zeros, t.int4.scales, 16),
     "weight is"),
]


@pytest.mark.parametrize("case", INT4_BAD, ids=[c[0] for c in INT4_BAD])
def test_int4_tiled_op_rejects_bad_inputs(case):
    _, args, message = case
    with pytest.raises(RuntimeError, match=message):
        torch.ops.comptrust.sparse24_int4_gemm_tiled(*args(_int4_tiled()))


def test_storage_ops_reject_bad_inputs_with_clear_messages():
    packed = uniform_sparse24(16, 32)
    with pytest.raises(ValueError, match=r"values is \(16, 16\), expected \[n, k/2=20\]"):
        ops.sparse24_gemm(torch.zeros(2, 40), packed.values, packed.meta)
    with pytest.raises(ValueError, match=r"meta is \(16, 2\), expected \[n=16, k/8=4\]"):
        ops.sparse24_gemm(torch.zeros(2, 32), packed.values, packed.meta[:, :2])
    with pytest.raises(ValueError, match="meta must be uint8"):
        ops.sparse24_gemm(torch.zeros(2, 32), packed.values, packed.meta.int())
    q4 = uniform_sparse24_int4(16, 64, 16)
    q = q4.qvalues
    with pytest.raises(ValueError, match="compact"):
        ops.sparse24_int4_gemm(torch.zeros(2, 64), q.qweight, q.qzeros, q.scales, q4.meta, 12)
    with pytest.raises(ValueError, match="multiple of 16"):
        ops.sparse24_int4_gemm(torch.zeros(2, 40), q.qweight, q.qzeros, q.scales, q4.meta, 16)


def test_corrupt_meta_is_rejected_when_unpacking():
    packed = uniform_sparse24(8, 16)
    meta = packed.meta.clone()
    meta[3, 1] = 0x0F  # group 2 of row 3: idx0 = 3, idx1 = 3
    with pytest.raises(ValueError, match="row 3, group 2"):
        reference.sparse24_gemm(torch.zeros(1, 16), packed.values, meta)
    # The kernels never read out of bounds whatever the nibbles say: they only pick among 4 positions.
    tiled = tile_sparse24(Sparse24Packed(packed.values, meta))
    assert torch.isfinite(ops.sparse24_tiled(torch.randn(2, 16), tiled)).all()
