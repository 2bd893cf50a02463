"""The CPU int4_gemm (GPTQ layout, tiled on entry and run by csrc/cpu/gemm_tiled*.cpp) against the
pure-torch reference.

Every SIMD path (avx2, scalar) is forced in turn through COMPTRUST_CPU_ISA. Metric: relative
Frobenius error to the fp32 product with the dequantized weight. fp32 activations differ only by
summation order (and the per-group zero-point algebra): bound 1e-5, measured ~4e-7. bf16/fp16 outputs are
rounded once to 8/11 bits: bounds 8e-3 / 1e-3. A wrong nibble, zero or group gives errors of order 1.
"""
import pytest
import torch

from comptrust import _C, ops, reference
from quant_cases import M_SIZES, MODEL_SHAPES, ODD_SHAPES, random_int4, rel_err

TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _check(m, n, k, group_size, dtype=torch.float32, seed=0):
    packed, *_ = random_int4(n, k, group_size, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    y = torch.ops.comptrust.int4_gemm(x, packed.qweight, packed.qzeros, packed.scales, group_size)
    ref = reference.int4_gemm(x, packed.qweight, packed.qzeros, packed.scales, group_size)
    assert y.shape == (m, n) and y.dtype == dtype
    err = rel_err(y, ref)
    assert err < TOL[dtype], f"m={m} n={n} k={k} g={group_size} {dtype}: rel err {err:.2e}"


def test_ops_module_uses_the_compiled_kernel():
    assert ops.backends()["cpu"]["available"], ops.backends()["cpu"]["detail"]


@pytest.mark.parametrize("m", M_SIZES)
@pytest.mark.parametrize("n,k", ODD_SHAPES + MODEL_SHAPES)
def test_matches_reference_odd_and_model_shapes(isa, m, n, k):
    _check(m, n, k, 128 if k >= 128 else 8, seed=m + n + k)


@pytest.mark.parametrize("group_size", [8, 32, 64, 128, "channel", 96, 2048])
def test_group_sizes_including_partial_last_group(isa, group_size):
    # k=200: g=32/64/128/96 leave a partial last group; 2048 > k is one partial group.
    k = 200
    _check(5, 40, k, k if group_size == "channel" else group_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_activations(isa, dtype):
    _check(7, 576, 576, 128, dtype)


def test_random_sweep(isa):
    gen = torch.Generator().manual_seed(1234)
    for case in range(40):
        m = int(torch.randint(1, 40, (1,), generator=gen))
        n = 8 * int(torch.randint(1, 40, (1,), generator=gen))
        k = 8 * int(torch.randint(1, 40, (1,), generator=gen))
        g = 8 * int(torch.randint(1, 20, (1,), generator=gen))
        _check(m, n, k, g, seed=case)


def test_thread_count_does_not_change_results():
    packed, *_ = random_int4(576, 1536, 128)
    x = torch.randn(13, 1536)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.comptrust.int4_gemm(x, packed.qweight, packed.qzeros, packed.scales, 128)
        torch.set_num_threads(max(2, threads))
        many = torch.ops.comptrust.int4_gemm(x, packed.qweight, packed.qzeros, packed.scales, 128)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)  # tiles are independent: no reduction order depends on threads


def test_empty_batch_and_noncontiguous_input():
    packed, *_ = random_int4(24, 40, 8)
    y = torch.ops.comptrust.int4_gemm(torch.zeros(0, 40), packed.qweight, packed.qzeros, packed.scales, 8)
    assert y.shape == (0, 24)
    x = torch.randn(40, 3).t()  # [3, 40], not contiguous
    ref = reference.int4_gemm(x, packed.qweight, packed.qzeros, packed.scales, 8)
    assert rel_err(torch.ops.comptrust.int4_gemm(x, packed.qweight, packed.qzeros, packed.scales, 8), ref) < 1e-5


def test_meta_tensors_give_shapes():
    y = torch.ops.comptrust.int4_gemm(torch.empty(5, 64, device="meta"), torch.empty(8, 24, dtype=torch.int32, device="meta"),
                                      torch.empty(2, 3, dtype=torch.int32, device="meta"),
                                      torch.empty(2, 24, dtype=torch.float16, device="meta"), 32)
    assert y.shape == (5, 24) and y.device.type == "meta"


BAD_CASES = [
    # (description, x shape, qweight shape, qzeros shape, scales shape, group, dtypes override, message)
    ("k mismatch", (3, 48), (5, 24), (2, 3), (2, 24), 32, {}, "k=48"),
    ("k not multiple of 8", (3, 44), (5, 24), (2, 3), (2, 24), 32, {}, "k=44"),
    ("bad group", (3, 40), (5, 24), (2, 3), (2, 24), 12, {}, "group_size=12"),
    ("scales rows", (3, 40), (5, 24), (2, 3), (3, 24), 32, {}, "scales"),
    ("qzeros cols", (3, 40), (5, 24), (2, 2), (2, 24), 32, {}, "qzeros"),
    ("x 3-D", (1, 3, 40), (5, 24), (2, 3), (2, 24), 32, {}, "2-D"),
    ("int x", (3, 40), (5, 24), (2, 3), (2, 24), 32, {"x": torch.int32}, "float32, bfloat16 or float16"),
    ("fp32 scales", (3, 40), (5, 24), (2, 3), (2, 24), 32, {"scales": torch.float32}, "float16"),
    ("int64 qweight", (3, 40), (5, 24), (2, 3), (2, 24), 32, {"qweight": torch.int64}, "int32"),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
@pytest.mark.parametrize("entry", ["compiled", "ops"])
def test_bad_inputs_raise_clear_errors(case, entry, monkeypatch):
    _, xs, qws, qzs, ss, g, dtypes, message = case
    x = torch.zeros(xs, dtype=dtypes.get("x", torch.float32))
    qweight = torch.zeros(qws, dtype=dtypes.get("qweight", torch.int32))
    qzeros = torch.zeros(qzs, dtype=torch.int32)
    scales = torch.zeros(ss, dtype=dtypes.get("scales", torch.float16))
    if entry == "ops":  # the reference path validates the same way
        monkeypatch.setattr(ops, "_serves", lambda device: False)
        with pytest.raises(ValueError, match=message):
            ops.int4_gemm(x, qweight, qzeros, scales, g)
    else:  # on CPU the op checks in Python (ValueError), on CUDA in C++ (RuntimeError)
        with pytest.raises((RuntimeError, ValueError), match=message):
            torch.ops.comptrust.int4_gemm(x, qweight, qzeros, scales, g)


def test_unknown_isa_request_is_an_error(monkeypatch):
    monkeypatch.setenv("COMPTRUST_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="not one of avx512, avx2, scalar"):
        _C.cpu_isa()


def test_awq_layer_with_zero_points_0_runs_on_the_kernel(isa):
    # AWQ zero 0 converts to GPTQ v1 as codes 15-q, zero 15 and a negated scale: kernels must not assume
    # scales are positive.
    from comptrust.formats import dequantize_awq, from_awq_tensors

    g = torch.Generator().manual_seed(5)
    n, k, group = 64, 256, 64
    awq = {"qweight": torch.randint(-2**31, 2**31 - 1, (k, n // 8), generator=g, dtype=torch.int32),
           "qzeros": torch.zeros(k // group, n // 8, dtype=torch.int32),  # every zero point is 0
           "scales": (torch.rand(k // group, n, generator=g) * 0.02 + 1e-3).half()}
    packed = from_awq_tensors(awq, group, k, n, "layer")
    assert (packed.scales < 0).all()
    x = torch.randn(5, k, generator=g)
    expected = x @ dequantize_awq(awq["qweight"], awq["qzeros"], awq["scales"], group).t()
    for gemm in (ops.int4_gemm, ops.int4_gemm_a8):
        y = gemm(x, packed.qweight, packed.qzeros, packed.scales, group)
        assert rel_err(y, expected) < (1e-5 if gemm is ops.int4_gemm else 2e-2)
