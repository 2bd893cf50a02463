import pytest
import torch
import torch.nn as nn

from comptrust import compress_
from comptrust.compress import RTNConfig
from comptrust.formats import dequantize_int4
from comptrust.nn import QuantLinear, replace_linears
from int4_cases import rel_err


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
