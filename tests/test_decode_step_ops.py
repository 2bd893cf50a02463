"""The fused decode-step ops (csrc/cpu/decode_step_cpu.cpp) against their torch references."""
import pytest
import torch

from comptrust import ops, reference
from quant_cases import available_isas

pytestmark = pytest.mark.skipif(not ops.cpu_kernels_available(), reason="needs the compiled CPU ops")

TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _close(got, expected, dtype, scale=None):
    """Within the dtype's tolerance of `scale` (default: expected's largest magnitude)."""
    scale = scale or expected.float().abs().max().item() or 1.0
    assert (got.float() - expected.float()).abs().max().item() <= TOLERANCE[dtype] * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 5, 96), (2, 7), (1, 1)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_residual_rms_norm_matches_llama_rmsnorm(dtype, shape, with_delta):
    torch.manual_seed(sum(shape))
    hidden = (torch.randn(shape) * 3).to(dtype)
    delta = torch.randn(shape).to(dtype) if with_delta else None
    weight = torch.randn(shape[-1]).to(dtype)
    expected_hidden = hidden.clone()
    expected = reference.residual_rms_norm(expected_hidden, delta, weight, 1e-5)
    got = torch.ops.comptrust.residual_rms_norm(hidden, delta, weight, 1e-5)
    assert got.dtype == dtype and got.shape == hidden.shape
    assert torch.equal(hidden, expected_hidden)  # the residual add is exact in any dtype
    _close(got, expected, dtype)


def _attention_case(heads, kv_heads, head_dim, max_len, position, dtype, seed=0):
    torch.manual_seed(seed)
    q, k, v = (torch.randn(1, 1, n * head_dim).to(dtype) for n in (heads, kv_heads, kv_heads))
    caches = [torch.randn(kv_heads, max_len, head_dim).to(dtype) for _ in range(2)]
    angle = torch.rand(head_dim // 2) * 6
    cos, sin = torch.cat((angle, angle)).cos().to(dtype), torch.cat((angle, angle)).sin().to(dtype)
    return q, k, v, caches, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 4, 24), (8, 1, 6), (2, 2, 2)])
@pytest.mark.parametrize("position", [0, 1, 37, 99])
def test_decode_attention_matches_rotary_cache_and_sdpa(dtype, heads, kv_heads, head_dim, position):
    q, k, v, (keys, values), cos, sin = _attention_case(heads, kv_heads, head_dim, 100, position, dtype, position)
    ref_keys, ref_values = keys.clone(), values.clone()
    expected = reference.decode_attention(q, k, v, ref_keys, ref_values, cos, sin, position, head_dim ** -0.5)
    got = torch.ops.comptrust.decode_attention(q, k, v, keys, values, cos, sin, position, head_dim ** -0.5)
    assert got.shape == q.shape and got.dtype == dtype
    _close(got, expected, dtype)
    _close(keys, ref_keys, dtype)  # the rotated key went to `position`, nothing else moved
    assert torch.equal(values, ref_values)
    assert torch.equal(keys[:, position + 1:], ref_keys[:, position + 1:])


def test_decode_attention_long_context_uses_both_threads_and_agrees():
    q, k, v, (keys, values), cos, sin = _attention_case(16, 4, 128, 4096, 4000, torch.float32)
    ref_keys, ref_values = keys.clone(), values.clone()
    expected = reference.decode_attention(q, k, v, ref_keys, ref_values, cos, sin, 4000, 128 ** -0.5)
    got = torch.ops.comptrust.decode_attention(q, k, v, keys, values, cos, sin, 4000, 128 ** -0.5)
    # an average of 4000 values is much smaller than they are: the error is relative to the values
    _close(got, expected, torch.float32, scale=values.abs().max().item())


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (10, 2, 48), (16, 2, 80), (4, 1, 256), (3, 3, 16)])
@pytest.mark.parametrize("position", [0, 3, 62, 63, 64, 127, 128, 250])
def test_fp32_decode_attention_in_parts_matches_sdpa(heads, kv_heads, head_dim, position):
    """fp32 caches with head_dim a multiple of 16 take the AVX-512 path where the CPU has it: positions in parts
    of 64 merged afterwards, up to four query heads per pass over a kv head (groups of 5 and 8 here: passes of
    4 + 1 and 4 + 4), head_dim in 64-column steps then 16 (48, 80); lengths at and around the part boundaries."""
    q, k, v, (keys, values), cos, sin = _attention_case(heads, kv_heads, head_dim, 256, position, torch.float32,
                                                        position + head_dim)
    ref_keys, ref_values = keys.clone(), values.clone()
    expected = reference.decode_attention(q, k, v, ref_keys, ref_values, cos, sin, position, head_dim ** -0.5)
    got = torch.ops.comptrust.decode_attention(q, k, v, keys, values, cos, sin, position, head_dim ** -0.5)
    _close(got, expected, torch.float32, scale=values.abs().max().item())
    assert torch.equal(values, ref_values)


def test_decode_attention_is_the_same_on_one_thread_and_two():
    """The parts depend on the length alone and merge in order: the thread count does not change a bit."""
    q, k, v, (keys, values), cos, sin = _attention_case(9, 3, 64, 400, 300, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.comptrust.decode_attention(q, k, v, keys, values, cos, sin, 300, 0.125)
        torch.set_num_threads(2)
        assert torch.equal(torch.ops.comptrust.decode_attention(q, k, v, keys, values, cos, sin, 300, 0.125), one)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(position=100), "position 100 is outside the cache's 100 positions"),
    (lambda a: a.update(position=-1), "position -1 is outside"),
    (lambda a: a.update(q=a["q"].to(torch.bfloat16)), "k is Float, expected BFloat16"),
    (lambda a: a.update(key_cache=a["key_cache"].transpose(0, 1).contiguous().transpose(0, 1)), "contiguous"),
    (lambda a: a.update(value_cache=a["value_cache"][:, :50].contiguous()), "value_cache is"),
    (lambda a: a.update(k=a["k"][..., :-64]), "k and v must hold one token's 3 x 64 values"),
    (lambda a: a.update(q=a["q"][..., :100]), "must hold one token's heads"),
    (lambda a: a.update(cos=a["cos"][:32]), "cos and sin must hold 64 values"),
    (lambda a: a.update(key_cache=a["key_cache"][None, None], value_cache=a["value_cache"][None, None]),
     "key_cache must be"),
])
def test_decode_attention_refuses_bad_calls_before_writing(change, message):
    q, k, v, (keys, values), cos, sin = _attention_case(9, 3, 64, 100, 5, torch.float32)
    args = dict(q=q, k=k, v=v, key_cache=keys, value_cache=values, cos=cos, sin=sin, position=5, scale=0.125)
    change(args)
    before = args["key_cache"].clone(), args["value_cache"].clone()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.comptrust.decode_attention(**args)
    assert torch.equal(args["key_cache"], before[0]) and torch.equal(args["value_cache"], before[1])


def test_odd_head_dim_and_bad_norm_calls_are_refused():
    q, k, v, (keys, values), cos, sin = _attention_case(3, 3, 6, 10, 2, torch.float32)
    with pytest.raises(RuntimeError, match="head_dim must be even"):
        torch.ops.comptrust.decode_attention(q[..., :15], k[..., :15], v[..., :15], keys[..., :5].contiguous(),
                                             values[..., :5].contiguous(), cos[:5], sin[:5], 2, 0.5)
    hidden = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match=r"weight is \[7\], expected \[8\]"):
        torch.ops.comptrust.residual_rms_norm(hidden, None, torch.ones(7), 1e-6)
    with pytest.raises(RuntimeError, match="delta is"):
        torch.ops.comptrust.residual_rms_norm(hidden, torch.ones(8), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="is not float32, bfloat16 or float16"):
        torch.ops.comptrust.residual_rms_norm(hidden.double(), None, torch.ones(8, dtype=torch.float64), 1e-6)
    unchanged = hidden.clone()
    with pytest.raises(RuntimeError, match="delta"):
        torch.ops.comptrust.residual_rms_norm(hidden, torch.ones(2, 8, dtype=torch.bfloat16), torch.ones(8), 1e-6)
    assert torch.equal(hidden, unchanged)


def test_ops_wrappers_take_the_reference_off_the_compiled_path():
    """ops.* falls back to the reference where the compiled ops do not serve (here: a meta tensor's shape)."""
    hidden = torch.randn(1, 4, device="meta")
    assert ops.residual_rms_norm(hidden, None, torch.ones(4, device="meta"), 1e-6).shape == (1, 4)


@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, k", [(49152, 576), (576, 1536), (1003, 37), (5, 16), (3, 1), (1, 2049)])
def test_dense_gemv_matches_float64_product(dtype, n, k, isa, monkeypatch):
    """One row by a dense weight [n, k] on each SIMD path (AVX-512: 64-input blocks, AVX2: 32, scalar), with k's
    tail summed one by one; summed in fp32 whatever the weight's dtype, so within the dtype's rounding."""
    monkeypatch.setenv("COMPTRUST_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(n + k)
    weight = torch.randn(n, k, generator=gen).to(dtype)
    for shape in ((1, k), (1, 1, k), (k,)):
        x = torch.randn(shape, generator=gen).to(dtype)
        y = ops.dense_gemv(x, weight)
        assert y.shape == (*shape[:-1], n) and y.dtype == dtype
        # against the sum of the products' magnitudes, the scale of a dot product's rounding error
        _close(y, x.double() @ weight.double().T, dtype, (x.double().abs() @ weight.double().abs().T).max().item())


def test_dense_gemv_is_the_same_on_one_thread_and_two():
    """Each output's sum runs on one thread in a fixed order: the thread count does not change a bit."""
    weight, x = torch.randn(4099, 576), torch.randn(1, 576)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.dense_gemv(x, weight)
        torch.set_num_threads(2)
        assert torch.equal(ops.dense_gemv(x, weight), one)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("x, weight, message", [
    (torch.randn(2, 8), torch.randn(3, 8), r"x must be one row of k=8 inputs"),
    (torch.randn(1, 7), torch.randn(3, 8), r"x must be one row of k=8 inputs"),
    (torch.randn(1, 8), torch.randn(24), r"weight must be \[n, k\]"),
    (torch.randn(1, 8), torch.randn(3, 8).bfloat16(), "weight is BFloat16, expected Float"),
    (torch.randn(1, 8).double(), torch.randn(3, 8).double(), "is not float32, bfloat16 or float16"),
    (torch.randn(1, 8), torch.randn(8, 3).T, "weight must be contiguous"),
])
def test_dense_gemv_refuses_bad_calls(x, weight, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.comptrust.dense_gemv(x, weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 1536), (3, 5, 37), (1,), (2, 16)])
def test_silu_mul_matches_torch(dtype, shape):
    torch.manual_seed(sum(shape))
    gate, up = (torch.randn(shape) * 4).to(dtype), torch.randn(shape).to(dtype)
    got = torch.ops.comptrust.silu_mul(gate, up)
    assert got.dtype == dtype and got.shape == gate.shape
    _close(got, reference.silu_mul(gate, up), dtype)


def test_silu_mul_at_the_edges_of_the_float_range():
    """Large gates of either sign, infinities and NaN (lanes and the scalar tail: 19 values)."""
    gate = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 88.0, -88.0, 100.0, -100.0, 1e30, -1e30,
                         3e38, -3e38, float("inf"), float("-inf"), float("nan"), 0.5, -0.5])
    up = torch.linspace(-2, 2, gate.numel())
    got, expected = torch.ops.comptrust.silu_mul(gate, up), reference.silu_mul(gate, up)
    assert torch.equal(got.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.allclose(got[finite], expected[finite], rtol=2e-6, atol=1e-30)


def test_bad_silu_mul_calls_are_refused():
    with pytest.raises(RuntimeError, match=r"gate is \[2, 8\], up \[2, 7\]"):
        torch.ops.comptrust.silu_mul(torch.randn(2, 8), torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="up is BFloat16, expected Float"):
        torch.ops.comptrust.silu_mul(torch.randn(8), torch.randn(8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.comptrust.silu_mul(torch.randn(8, 2).t(), torch.randn(2, 8))
    with pytest.raises(RuntimeError, match="is not float32, bfloat16 or float16"):
        torch.ops.comptrust.silu_mul(torch.randn(8).double(), torch.randn(8).double())
