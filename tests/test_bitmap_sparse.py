"""Unstructured sparsity in the bitmap layout: format round trips and validation, the CPU kernel against dense_gemv
(bit for bit) and F.linear on odd and real shapes, corrupt bitmaps refused, BitmapSparseLinear and where pruning
uses it."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from comptrust import compress_, ops
from comptrust.compress import config_from_tag
from comptrust.compress.pruning import SparsityPattern, pruned_linear
from comptrust.memory import weight_bytes
from comptrust.formats.bitmap_sparse import BitmapPacked, bitmap_nbytes, check_bitmap, pack_bitmap, unpack_bitmap
from comptrust.nn.bitmap_sparse_linear import MIN_SPARSITY, BitmapSparseLinear, bitmap_unsuited
from quant_cases import available_isas

needs_kernels = pytest.mark.skipif(not ops.cpu_kernels_available(), reason="comptrust._C not built")


def _pruned(n, k, keep, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator)
    return weight.masked_fill(torch.rand(n, k, generator=generator) >= keep, 0.0)


@pytest.fixture(params=available_isas() if ops.cpu_kernels_available() else ["none"])
def isa(request, monkeypatch):
    monkeypatch.setenv("COMPTRUST_CPU_ISA", request.param)
    return request.param


@pytest.mark.parametrize("n,k,keep", [(1, 1, 1.0), (3, 5, 0.5), (8, 16, 0.0), (7, 33, 1.0), (64, 577, 0.3),
                                      (96, 200, 0.5), (576, 1536, 0.5)])
def test_round_trip_is_exact(n, k, keep):
    weight = _pruned(n, k, keep)
    packed = pack_bitmap(weight)
    assert packed.nnz == int((weight != 0).sum()) and packed.mask.shape == (n, -(-k // 16))
    assert packed.nbytes() == bitmap_nbytes(n, k, packed.nnz)
    check_bitmap(packed)
    assert torch.equal(unpack_bitmap(packed).view(torch.int32), weight.view(torch.int32))  # bit for bit


def test_negative_zero_is_pruned_and_comes_back_as_zero():
    weight = torch.tensor([[-0.0, 1.5, 0.0, -2.0]])
    packed = pack_bitmap(weight)
    assert packed.values.tolist() == [1.5, -2.0]
    assert torch.equal(unpack_bitmap(packed), weight) and unpack_bitmap(packed)[0, 0].item() == 0.0


def test_pack_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="float32"):
        pack_bitmap(torch.ones(4, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="2-D"):
        pack_bitmap(torch.ones(4))


def _corrupt(packed, **changes):
    fields = dict(values=packed.values.clone(), mask=packed.mask.clone(), row_start=packed.row_start.clone(),
                  in_features=packed.in_features)
    fields.update(changes)
    return BitmapPacked(**fields)


def _flip_bit(packed, row, word=0, bit=3):
    mask = packed.mask.clone()
    mask[row, word] ^= 1 << bit
    return _corrupt(packed, mask=mask)


def test_check_names_what_is_malformed():
    packed = pack_bitmap(_pruned(6, 40, 0.5))
    cases = [
        (_corrupt(packed, values=packed.values.double()), "values must be 1-D float32"),
        (_corrupt(packed, mask=packed.mask[:, :2]), r"mask must be int16 \[n, ceil\(k/16\)=3\]"),
        (_corrupt(packed, row_start=packed.row_start[:-1]), r"row_start must be int64 \[n \+ 1 = 7\]"),
        (_corrupt(packed, row_start=packed.row_start + 1), "row_start must run from 0 to nnz"),
        (_flip_bit(packed, 4), "row 4's mask keeps"),
        (_flip_bit(packed, 2, word=2, bit=12), "row 2 has bits set past in_features=40"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            check_bitmap(bad)


@needs_kernels
@pytest.mark.parametrize("n,k", [(1, 1), (5, 15), (9, 16), (33, 100), (64, 577), (200, 96), (576, 576), (192, 576),
                                 (1536, 576), (576, 1536)])
@pytest.mark.parametrize("m", [1, 3, 5])
def test_kernel_rows_are_dense_gemvs_bit_for_bit(isa, n, k, m):
    """Below 16 rows of x, each row's sums go in dense_gemv's order and a pruned lane adds exactly 0: where k is a
    multiple of 16 (every real layer) the products equal dense_gemv's on the dense weight bit for bit, on every ISA
    path, whatever the batch around the row (the last k % 16 inputs are summed one by one, in an order the compiler
    picks for each of the two kernels)."""
    weight = _pruned(n, k, 0.5, seed=n + k)
    x = torch.randn(m, k)
    y = ops.bitmap_sparse_gemm(x, pack_bitmap(weight))
    torch.testing.assert_close(y, F.linear(x, weight), rtol=1e-4, atol=1e-4)
    for row in range(m):
        torch.testing.assert_close(y[row], torch.ops.comptrust.dense_gemv(x[row], weight), rtol=1e-6, atol=1e-6)
        if k % 16 == 0:
            assert torch.equal(y[row], torch.ops.comptrust.dense_gemv(x[row], weight)), f"row {row}"
        assert torch.equal(y[row], ops.bitmap_sparse_gemm(x[row], pack_bitmap(weight))), f"row {row} alone"


@needs_kernels
@pytest.mark.parametrize("n,k,m", [(37, 130, 10), (7, 33, 16), (200, 96, 17), (576, 1536, 32), (1100, 64, 64),
                                   (3, 5, 70), (64, 577, 100), (40, 100, 255), (40, 100, 256), (9, 200, 300)])
def test_kernel_batches_match_f_linear(isa, n, k, m):
    """On AVX-512, 10 to 255 rows run the row-vector kernel (x transposed in blocks of up to 64 rows, the last one
    short), from 256 dense blocks and torch's GEMM (without AVX-512 from 16 rows)."""
    weight = _pruned(n, k, 0.4, seed=m)
    x = torch.randn(2, m // 2, k) if m % 2 == 0 else torch.randn(m, k)
    y = ops.bitmap_sparse_gemm(x, pack_bitmap(weight))
    assert y.shape == (*x.shape[:-1], n)
    torch.testing.assert_close(y, F.linear(x, weight), rtol=1e-4, atol=1e-4)


@needs_kernels
def test_randomized_sweep_finds_no_mismatch():
    """1,200 seeded random shapes, densities and batches (every kernel path) against F.linear."""
    generator = torch.Generator().manual_seed(1234)
    for case in range(1200):
        n, k = (int(torch.randint(1, hi, (1,), generator=generator)) for hi in (70, 300))
        m = int(torch.randint(1, 300, (1,), generator=generator)) if case % 4 == 0 else \
            int(torch.randint(1, 24, (1,), generator=generator))
        keep = float(torch.rand(1, generator=generator))
        weight = _pruned(n, k, keep, seed=case)
        x = torch.randn(m, k, generator=generator)
        y = ops.bitmap_sparse_gemm(x, pack_bitmap(weight))
        torch.testing.assert_close(y, F.linear(x, weight), rtol=1e-4, atol=1e-4, msg=f"case {case}: {n}x{k} m={m}")


@needs_kernels
@pytest.mark.parametrize("m", [1, 12, 20, 300])
def test_kernel_refuses_corrupt_bitmaps_naming_the_row(m):
    """A mask that disagrees with row_start is an error naming the row, never a read outside the values, also in
    the last row (where reading first could run past the end), on every path (rows, row vectors, dense blocks)."""
    packed = pack_bitmap(_pruned(40, 100, 0.5))
    x = torch.randn(m, 100)
    for row in (0, 17, 39):
        with pytest.raises(RuntimeError, match=f"row {row}'s mask has"):
            torch.ops.comptrust.bitmap_sparse_gemm(x, *(_flip_bit(packed, row).__dict__[f] for f in
                                                         ("values", "mask", "row_start")), 100)
    kept_bit = (int(packed.mask[3, 0]) & 0xFFFF).bit_length() - 1
    assert kept_bit >= 0
    past_k = _flip_bit(_flip_bit(packed, 3, word=0, bit=kept_bit), 3, word=6, bit=9)  # same count, one bit past k
    with pytest.raises(RuntimeError, match="a row's mask sets bits past k=100"):
        torch.ops.comptrust.bitmap_sparse_gemm(x, past_k.values, past_k.mask, past_k.row_start, 100)
    starts = packed.row_start.clone()
    starts[5] = starts[6] + 1
    with pytest.raises(RuntimeError, match="row_start decreases at row 5"):
        torch.ops.comptrust.bitmap_sparse_gemm(x, packed.values, packed.mask, starts, 100)
    with pytest.raises(RuntimeError, match="row_start must run from 0 to nnz"):
        torch.ops.comptrust.bitmap_sparse_gemm(x, packed.values[:-1], packed.mask, packed.row_start, 100)
    with pytest.raises(RuntimeError, match=r"x must be \[..., k=100\]"):
        torch.ops.comptrust.bitmap_sparse_gemm(x[:, :99], packed.values, packed.mask, packed.row_start, 100)
    with pytest.raises(RuntimeError, match="x must be float32"):
        torch.ops.comptrust.bitmap_sparse_gemm(x.double(), packed.values, packed.mask, packed.row_start, 100)
    with pytest.raises(RuntimeError, match=r"mask must be int16 \[n, ceil\(k/16\)=8\] for k=120"):
        torch.ops.comptrust.bitmap_sparse_gemm(x, packed.values, packed.mask, packed.row_start, 120)


def test_ops_entry_falls_back_to_f_linear_for_other_dtypes():
    weight = _pruned(24, 40, 0.5)
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    y = ops.bitmap_sparse_gemm(x, pack_bitmap(weight))
    assert y.dtype == torch.bfloat16 and torch.equal(y, F.linear(x, weight.to(torch.bfloat16)))
    with pytest.raises(ValueError, match=r"x must be \[..., k=40\]"):
        ops.bitmap_sparse_gemm(torch.randn(3, 41), pack_bitmap(weight))


def test_layer_runs_saves_and_loads_as_the_dense_layer_would():
    weight, bias = _pruned(48, 72, 0.5), torch.randn(48)
    dense = nn.Linear(72, 48)
    dense.weight.data.copy_(weight)
    dense.bias.data.copy_(bias)
    layer = BitmapSparseLinear.from_linear(dense)
    x = torch.randn(2, 5, 72)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    state = layer.state_dict()
    assert set(state) == {"weight", "bias"}
    assert torch.equal(state["weight"], weight) and torch.equal(state["bias"], bias)
    assert weight_bytes(layer) == layer.packed().nbytes() + 48 * 4 < weight.numel() * 4 * 0.6

    other = BitmapSparseLinear.from_weight(_pruned(48, 72, 0.3, seed=5), torch.zeros(48))
    other.load_state_dict(state)
    assert torch.equal(other.dense_weight(), weight) and torch.equal(other.bias, bias)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        other.load_state_dict({"weight": torch.zeros(48, 71), "bias": bias})
    assert "50% sparse (bitmap)" in repr(layer)


def test_pruning_uses_the_bitmap_only_where_it_wins():
    linear = nn.Linear(64, 32, bias=False)
    pattern = SparsityPattern.parse("unstructured", 0.5)
    pruned = pruned_linear("layer", linear, _pruned(32, 64, 0.5), pattern)
    avx512 = ops.cpu_isa() == "avx512"
    assert isinstance(pruned, BitmapSparseLinear if avx512 else nn.Linear)
    light = _pruned(32, 64, 1 - MIN_SPARSITY / 2)
    # Off AVX-512 (another CPU, a forced ISA, the portable build) that reason comes first.
    assert ("below the 25% where the bitmap kernel wins" if avx512 else "AVX-512") in bitmap_unsuited(light)
    assert type(pruned_linear("layer", linear, light, pattern)) is nn.Linear
    assert "float32" in bitmap_unsuited(light.to(torch.bfloat16))
    if avx512:
        assert bitmap_unsuited(_pruned(32, 64, 0.5)) is None


@needs_kernels
@pytest.mark.parametrize("tag", ["mag-50", "mag-48"])
def test_pruned_model_runs_on_the_bitmap_kernel(tiny_llama, tag):
    """Unstructured and 4:8 magnitude pruning: every block linear becomes a bitmap layer (on AVX-512), the model's
    logits are the dense-with-zeros model's and its weights take fewer bytes."""
    if ops.cpu_isa() != "avx512":
        pytest.skip("the bitmap layers are chosen only where AVX-512 runs them")
    model = copy.deepcopy(tiny_llama)
    summary = compress_(model, config_from_tag(tag), progress=False)
    layers = [m for m in model.modules() if isinstance(m, BitmapSparseLinear)]
    assert len(layers) == len(summary.replaced) == 14
    dense = copy.deepcopy(tiny_llama)
    dense.load_state_dict(model.state_dict())  # the checkpoint form: dense weights with their zeros
    ids = torch.randint(0, 49152, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    assert weight_bytes(model) < weight_bytes(dense) - sum(m.out_features * m.in_features for m in layers) * 1.5
