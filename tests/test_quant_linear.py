import pytest
import torch
import torch.nn as nn

from comptrust import compress_
from comptrust.compress import RTNConfig
from comptrust.formats import dequantize_int4
from comptrust.nn import QuantLinear, replace_linears
from quant_cases import rel_err


@pytest.mark.parametrize("bias", [False, True])
def test_quant_linear_matches_dequantized_linear(bias):
    torch.manual_seed(0)
    dense = nn.Linear(200, 96, bias=bias)
    q = QuantLinear.from_linear(dense, group_size=64)
    x = torch.randn(2, 5, 200)
    w = dequantize_int4(q.packed())
    expected = nn.functional.linear(x, w, dense.bias if bias else None)
    assert rel_err(q(x), expected) < 1e-5
    assert q(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="expects 200"):
        q(torch.randn(3, 100))


def test_swap_replaces_decoder_linears_and_keeps_lm_head(tiny_llama):
    import copy

    model = copy.deepcopy(tiny_llama)
    summary = compress_(model, RTNConfig(group_size=32), progress=False)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert sorted(quantized) == sorted(summary.replaced)
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert summary.kept_dense == {"lm_head": "skipped by configuration"}
    assert isinstance(model.lm_head, nn.Linear)
    ids = torch.randint(0, 1000, (2, 9))
    with torch.inference_mode():
        dense_logits, quant_logits = tiny_llama(ids).logits, model(ids).logits
    assert torch.isfinite(quant_logits).all()
    assert rel_err(quant_logits, dense_logits) < 0.2  # int4 noise, not garbage


def test_ineligible_layers_stay_dense_with_reason():
    model = nn.Sequential(nn.Linear(64, 20), nn.Linear(20, 64), nn.Linear(64, 64))
    replaced, kept = replace_linears(model, lambda name, lin: QuantLinear.from_linear(lin, 32),
                                     skip=("2",), eligible=QuantLinear.why_ineligible, progress=False)
    assert replaced == []
    assert "out=20" in kept["0"] and "in=20" in kept["1"] and kept["2"] == "skipped by configuration"


def test_unknown_config_type_is_rejected():
    with pytest.raises(TypeError, match="no method registered"):
        compress_(nn.Linear(8, 8), object())


def test_state_dict_holds_gptq_v1_tensors():
    q = QuantLinear.from_linear(nn.Linear(64, 16), group_size=32)
    state = q.state_dict()
    assert {k: (tuple(v.shape), v.dtype) for k, v in state.items() if k != "bias"} == {
        "qweight": ((8, 16), torch.int32), "qzeros": ((2, 2), torch.int32), "scales": ((2, 16), torch.float16)}


def test_a8_layer_runs_on_int8_activations():
    from comptrust import reference

    torch.manual_seed(1)
    dense = nn.Linear(256, 64)
    q = QuantLinear.from_linear(dense, group_size=64, act_bits=8)
    x = torch.randn(3, 256)
    p = q.packed()
    expected = reference.int4_gemm_a8(x, p.qweight, p.qzeros, p.scales, 64) + dense.bias
    assert rel_err(q(x), expected) < 1e-5
    assert "a8" in repr(q)


def test_setting_act_bits_rebinds_the_kernel_and_is_validated():
    """The layer binds its kernel call (with act_bits) when it tiles: changing act_bits afterwards takes effect,
    and a value the layer cannot run is refused, leaving the layer as it was."""
    from comptrust import reference

    torch.manual_seed(2)
    dense = nn.Linear(256, 64)
    q = QuantLinear.from_linear(dense, group_size=64)
    x = torch.randn(1, 3, 256)
    p = q.packed()
    float_out = q(x)
    q.act_bits = 8
    expected = reference.int4_gemm_a8(x[0], p.qweight, p.qzeros, p.scales, 64) + dense.bias
    assert rel_err(q(x)[0], expected) < 1e-5
    with pytest.raises(ValueError, match="act_bits=4"):
        q.act_bits = 4
    assert q.act_bits == 8
    q.act_bits = None
    assert torch.equal(q(x), float_out)
    w8 = QuantLinear.from_linear(dense, group_size=64, bits=8)
    with pytest.raises(ValueError, match="int8 weights"):
        w8.act_bits = 8


def test_layer_survives_pickling_and_deepcopy():
    """The bound kernel call is not picklable: it is dropped and bound again (torch.save of a whole model,
    copy.deepcopy)."""
    import copy
    import pickle

    q = QuantLinear.from_linear(nn.Linear(64, 16), group_size=32, act_bits=8)
    x = torch.randn(2, 64)
    for other in (pickle.loads(pickle.dumps(q)), copy.deepcopy(q)):
        assert other.act_bits == 8 and torch.equal(other(x), q(x))
        assert other._tiled.weight.data_ptr() != q._tiled.weight.data_ptr()


def test_wrong_input_width_is_named_by_the_layer():
    q = QuantLinear.from_linear(nn.Linear(64, 16), group_size=32)
    with pytest.raises(ValueError, match="input has 48 features, layer expects 64"):
        q(torch.randn(2, 48))
    with pytest.raises(ValueError, match="input has 0 features"):
        q(torch.tensor(1.0))


@pytest.mark.parametrize("act_bits", [None, 8])
def test_int3_layer_matches_its_reference(act_bits):
    from comptrust import reference

    torch.manual_seed(2)
    dense = nn.Linear(320, 96, bias=True)
    q = QuantLinear.from_linear(dense, group_size=64, act_bits=act_bits, bits=3)
    x = torch.randn(2, 7, 320)
    p = q.packed()
    gemm = reference.int3_gemm_a8 if act_bits else reference.int3_gemm
    expected = gemm(x.reshape(-1, 320), p.qweight, p.qzeros, p.scales, 64).reshape(2, 7, 96) + dense.bias
    assert rel_err(q(x), expected) < 1e-5
    assert "w3g64" in repr(q)
    assert QuantLinear.why_ineligible("x", nn.Linear(320, 40), bits=3) is not None  # 40 is no multiple of 32


def test_cpu_layer_keeps_only_the_tiles_and_exports_gptq_bit_exactly():
    from comptrust.compress import quantize_rtn
    from comptrust.memory import weight_bytes

    w = torch.randn(64, 256)
    for bits in (4, 3):
        packed = quantize_rtn(w, bits, 64)
        q = QuantLinear.from_packed(packed)
        assert q.qweight.numel() == 0  # released: the tiles are the only copy
        assert weight_bytes(q) == q._tiled.nbytes()
        state = q.state_dict()
        for name in ("qweight", "qzeros", "scales"):
            assert torch.equal(state[name], getattr(packed, name))
        # a fresh layer loads that checkpoint and computes the same thing
        fresh = QuantLinear(256, 64, 64, bits=bits)
        fresh.load_state_dict(state)
        x = torch.randn(3, 256)
        assert torch.equal(fresh(x), q(x))
        # moving the layer (here: a dtype-preserving .to) brings the GPTQ buffers back
        q.to("cpu")
        assert torch.equal(q.qweight, packed.qweight) and q._tiled is None
        assert torch.equal(q(x), fresh(x))


def test_int3_compression_of_a_model(tiny_llama):
    import copy

    model = copy.deepcopy(tiny_llama)
    summary = compress_(model, RTNConfig(bits=3, group_size=32), progress=False)
    # the tiny model's 200-wide MLP and 48-wide k/v cannot be int3 (32 inputs per block): they stay dense, with why
    assert summary.method == "rtn-w3g32" and len(summary.replaced) == 2 * 2
    assert all("divisible by 32" in why for name, why in summary.kept_dense.items() if name != "lm_head")
    ids = torch.randint(0, 1000, (1, 9))
    with torch.inference_mode():
        dense_logits, quant_logits = tiny_llama(ids).logits, model(ids).logits
    assert torch.isfinite(quant_logits).all()
    assert rel_err(quant_logits, dense_logits) < 0.4  # int3 noise, not garbage


def test_shared_input_call_runs_layers_of_one_input_together():
    from comptrust.nn import ActOrderQuantLinear
    from comptrust.nn.quant_linear import shared_input_call

    torch.manual_seed(0)
    layers = [QuantLinear.from_linear(nn.Linear(128, n, bias=False), 64) for n in (128, 64, 64)]
    call = shared_input_call(layers)
    x = torch.randn(1, 1, 128)
    assert [torch.equal(y, layer(x)) for y, layer in zip(call(x), layers)] == [True] * 3
    with_bias = QuantLinear.from_linear(nn.Linear(128, 64), 64)
    other_group = QuantLinear.from_linear(nn.Linear(128, 64, bias=False), 32)
    other_act = QuantLinear.from_linear(nn.Linear(128, 64, bias=False), 64, act_bits=8)
    act_order = ActOrderQuantLinear.from_act_order(layers[1].packed(), torch.randperm(128))  # permutes x first
    for odd_one in (with_bias, other_group, other_act, act_order, nn.Linear(128, 64)):
        assert shared_input_call(layers[:1] + [odd_one]) is None
