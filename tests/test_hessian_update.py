"""The GPTQ / SparseGPT column-loop op (comptrust.ops.hessian_block_update) against its pure-torch
reference, and the whole error-feedback driver (comptrust.compress.hessian) against the straightforward
GPTQ / SparseGPT oracles of gptq_oracle.py."""
from __future__ import annotations

import pytest
import torch

import gptq_oracle as oracle
from gptq_oracle import block_case
from comptrust import ops, reference
from comptrust.compress.hessian import (HessianAccumulator, HessianNotPositiveDefinite, QuantGrid, codes_of,
                                        error_feedback, inverse_cholesky)

needs_cpu_ops = pytest.mark.skipif(not ops.cpu_kernels_available(), reason="compiled CPU ops not built")


def _hessian(k: int, tokens: int = 512, seed: int = 0) -> torch.Tensor:
    acc = HessianAccumulator(k)
    acc.add_batch(oracle.correlated_inputs(tokens, k, seed))
    return acc.hessian


BLOCK_CASES = [  # n, width, bits, prune_n, prune_m, preset mask
    (1, 1, 4, 0, 0, False), (7, 128, 4, 0, 0, False), (33, 64, 3, 0, 0, False), (300, 128, 4, 0, 0, True),
    (16, 128, 0, 2, 4, False), (5, 24, 4, 4, 8, False), (64, 96, 8, 2, 4, False), (13, 37, 2, 0, 0, True),
    (9, 128, 0, 0, 0, True),
]


@needs_cpu_ops
@pytest.mark.parametrize("n,width,bits,prune_n,prune_m,preset", BLOCK_CASES)
def test_compiled_block_update_is_bit_exact_with_the_reference(n, width, bits, prune_n, prune_m, preset):
    w, hinv, scales, zeros, col_group, mask = block_case(n, width, bits, prune_n, prune_m, preset, seed=n + width)
    w_ref, mask_ref = w.clone(), mask.clone()
    err, loss, mask_out = ops.hessian_block_update(w, hinv, scales, zeros, col_group, bits, mask, prune_n, prune_m)
    err_ref, loss_ref = reference.hessian_block_update(w_ref, hinv, scales, zeros, col_group.long(), bits, mask_ref,
                                                       prune_n, prune_m)
    assert torch.equal(w, w_ref)
    assert torch.equal(err, err_ref)
    assert torch.equal(mask_out, mask_ref)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)  # only the summation order differs
    if prune_n:
        pruned_per_group = mask_out.reshape(n, -1, prune_m).sum(-1)
        assert torch.all(pruned_per_group == prune_n)
        assert torch.all(w.masked_select(mask_out) == 0)


@needs_cpu_ops
def test_block_update_randomized_sweep():
    g = torch.Generator().manual_seed(1234)
    for case in range(200):
        n = int(torch.randint(1, 40, (1,), generator=g))
        prune_m = [0, 4, 8][int(torch.randint(0, 3, (1,), generator=g))]
        width = int(torch.randint(1, 9, (1,), generator=g)) * (prune_m or 16) - (0 if prune_m else int(torch.randint(0, 8, (1,), generator=g)))
        prune_n = prune_m // 2
        bits = [0, 3, 4, 8][int(torch.randint(0, 4, (1,), generator=g))]
        w, hinv, scales, zeros, col_group, mask = block_case(n, width, bits, prune_n, prune_m, prune_m == 0, case)
        w_ref, mask_ref = w.clone(), mask.clone()
        err, _, _ = ops.hessian_block_update(w, hinv, scales, zeros, col_group, bits, mask, prune_n, prune_m)
        err_ref, _ = reference.hessian_block_update(w_ref, hinv, scales, zeros, col_group.long(), bits, mask_ref,
                                                    prune_n, prune_m)
        assert torch.equal(w, w_ref) and torch.equal(err, err_ref) and torch.equal(mask, mask_ref), (n, width, bits)


@needs_cpu_ops
@pytest.mark.parametrize("bad,match", [
    (dict(w=torch.zeros(4, 8, dtype=torch.float64)), "w must be"),
    (dict(w=torch.zeros(8, 4).t()), "contiguous"),
    (dict(hinv=torch.zeros(7, 7)), "hinv has shape"),
    (dict(mask=torch.zeros(4, 7, dtype=torch.bool)), "mask must be"),
    (dict(bits=9), "bits=9"),
    (dict(prune_n=2, prune_m=3), "multiple of M"),
    (dict(col_group=torch.full((8,), 5, dtype=torch.int32)), r"col_group entries must lie in \[0, 2\)"),
    (dict(scales=torch.zeros(3, 2)), "scales has shape"),
])
def test_block_update_rejects_bad_input(bad, match):
    args = dict(w=torch.zeros(4, 8), hinv=torch.eye(8), scales=torch.ones(4, 2), zeros=torch.ones(4, 2),
                col_group=torch.zeros(8, dtype=torch.int32), bits=4, mask=torch.zeros(4, 8, dtype=torch.bool),
                prune_n=0, prune_m=0)
    args.update(bad)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.comptrust.hessian_block_update(*args.values())


GPTQ_CASES = [  # n, k, bits, group size, symmetric, act-order, static groups
    (24, 256, 4, 128, False, False, False), (40, 384, 3, 32, True, True, False), (8, 256, 4, 64, False, True, True),
    (16, 200, 4, -1, False, False, False), (16, 256, 4, 128, False, False, True), (32, 576, 4, 128, False, False, False),
    (3, 160, 3, 32, False, True, False), (24, 256, 8, 128, False, True, False), (16, 128, 8, 32, True, False, False),
]


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).float().mean())


@pytest.mark.parametrize("n,k,bits,group_size,symmetric,act_order,static", GPTQ_CASES)
def test_gptq_matches_the_reference_algorithm(n, k, bits, group_size, symmetric, act_order, static):
    hessian = _hessian(k, seed=k)
    hessian[3, :] = 0  # a dead input: zero weight column, H_ii = 1
    hessian[:, 3] = 0
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(n))
    result = error_feedback(weight, hessian, QuantGrid(bits, group_size, symmetric, static), act_order=act_order)
    expected, expected_loss = oracle.gptq(weight, hessian, bits, group_size, symmetric, act_order, static)
    ours = result.weight if result.perm is None else result.weight[:, torch.argsort(result.perm)]
    # Our inverse Cholesky takes a cheaper route (see inverse_cholesky), so values within ~1e-7 of a rounding
    # boundary may round the other way: the codes agree almost everywhere and the GPTQ loss is the same.
    assert _agreement(ours, expected) > 0.99
    assert result.loss == pytest.approx(expected_loss, rel=0.01)
    assert torch.all(ours[:, 3] == 0)
    assert (result.perm is not None) == (act_order and not static)
    group = k if group_size == -1 else group_size
    codes = codes_of(result, group)
    assert int(codes.max()) <= 2**bits - 1
    s = result.scales.repeat_interleave(group, 1)[:, :k]
    z = result.zeros.repeat_interleave(group, 1)[:, :k]
    assert torch.equal((codes.float() - z) * s, result.weight)  # every value sits exactly on its grid


@pytest.mark.parametrize("k,sparsity,prune_n,prune_m,bits", [
    (256, 0.5, 0, 0, 0), (256, 0.0, 2, 4, 0), (256, 0.0, 4, 8, 0), (256, 0.0, 2, 4, 4), (384, 0.3, 0, 0, 4),
    (200, 0.6, 0, 0, 0),
])
def test_sparsegpt_matches_the_reference_algorithm(k, sparsity, prune_n, prune_m, bits):
    hessian = _hessian(k, seed=1)
    weight = torch.randn(32, k, generator=torch.Generator().manual_seed(2))
    grid = QuantGrid(bits, 128) if bits else None
    result = error_feedback(weight, hessian, grid, sparsity=sparsity, prune_n=prune_n, prune_m=prune_m)
    expected, expected_mask, expected_loss = oracle.sparsegpt(weight, hessian, sparsity, prune_n, prune_m, bits)
    assert _agreement(result.mask, expected_mask) > 0.99
    assert result.loss == pytest.approx(expected_loss, rel=0.01)
    assert torch.all(result.weight[result.mask] == 0)
    if prune_n:
        assert torch.all(result.mask.reshape(32, -1, prune_m).sum(-1) == prune_n)
    else:
        per_block = [int(32 * min(128, k - start) * sparsity) for start in range(0, k, 128)]
        assert int(result.mask.sum()) == sum(per_block)  # SparseGPT picks its share block by block


def test_gptq_beats_round_to_nearest_on_the_layer_output():
    k, n = 384, 64
    x = oracle.correlated_inputs(2048, k, seed=5)
    acc = HessianAccumulator(k)
    acc.add_batch(x)
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(6))
    gptq = error_feedback(weight, acc.hessian, QuantGrid(4, 128)).weight
    from comptrust.compress.rtn import quantize_rtn
    from comptrust.formats.int4 import dequantize_int4
    rtn = dequantize_int4(quantize_rtn(weight, 4, 128))
    error = lambda q: float(torch.linalg.norm(x @ (weight - q).t()))  # noqa: E731
    assert error(gptq) < 0.9 * error(rtn)  # measured: 0.83


def test_hessian_accumulator_is_the_running_mean_of_2_x_xt():
    x = torch.randn(3, 10, 8, generator=torch.Generator().manual_seed(0))
    acc = HessianAccumulator(8)
    acc.add_batch(x[:2])
    acc.add_batch(x[2])  # a single [tokens, in] sequence
    flat = x.reshape(-1, 8).double()
    torch.testing.assert_close(acc.hessian.double(), 2 / 3 * flat.t() @ flat, rtol=1e-5, atol=1e-5)
    assert acc.sequences == 3
    with pytest.raises(ValueError, match="expected 8"):
        acc.add_batch(torch.zeros(2, 7))


def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse():
    h = _hessian(64)
    upper, damp = inverse_cholesky(h, 0.01)
    damped = h + 0.01 * torch.mean(torch.diag(h)) * torch.eye(64)
    assert damp == 0.01
    assert torch.equal(upper, torch.triu(upper)) and torch.all(torch.diagonal(upper) > 0)
    torch.testing.assert_close((upper.t() @ upper).double(), torch.linalg.inv(damped.double()), rtol=1e-3, atol=1e-6)


def test_singular_hessian_raises_the_damping_then_fails_clearly():
    v = torch.randn(16, 1)
    upper, damp = inverse_cholesky(v @ v.t(), 1e-12)  # rank one: 1e-12 is not enough, a larger damp is
    assert damp > 1e-12 and torch.isfinite(upper).all()
    with pytest.raises(HessianNotPositiveDefinite, match="not positive definite"):
        inverse_cholesky(-torch.eye(4), 0.01)


def test_error_feedback_rejects_bad_arguments():
    w = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"expected \[16, 16\]"):
        error_feedback(w, torch.eye(8))
    with pytest.raises(ValueError, match="sparsity"):
        error_feedback(w, torch.eye(16), sparsity=1.0)
    with pytest.raises(ValueError, match="multiples of 4"):
        error_feedback(torch.randn(4, 18), torch.eye(18), prune_n=2, prune_m=4)
