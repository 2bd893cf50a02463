"""Sparse24Linear / Sparse24Int4Linear (comptrust.nn.sparse24_linear) and magnitude 2:4 compression of a model.

A layer must compute exactly what its dense (pruned, dequantized) weight computes, keep only the CPU tiles
once built, give its storage-layout tensors back bit-exactly (state_dict, packed(), after .to()), and refuse
weights that are not 2:4."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from comptrust import reference
from comptrust.compress import MagnitudeConfig, compress_, config_from_tag
from comptrust.memory import weight_bytes
from comptrust.formats.sparse24 import dequantize_sparse24_int4, prune_magnitude_24, unpack_sparse24
from comptrust.nn import Sparse24Int4Linear, Sparse24Linear, TiledLinear
from quant_cases import rel_err


def _pruned_linear(n=40, k=96, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(prune_magnitude_24(linear.weight))
    return linear


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("value_dtype", [None, torch.bfloat16])
def test_sparse24_linear_matches_its_dense_weight(bias, value_dtype):
    linear = _pruned_linear(bias=bias)
    layer = Sparse24Linear.from_linear(linear, value_dtype)
    dense = unpack_sparse24(layer.packed()).float()
    for shape in ((1, 96), (3, 5, 96), (9, 96)):
        x = torch.randn(shape)
        assert rel_err(layer(x), F.linear(x, dense, linear.bias)) < 1e-5
    if value_dtype is None:
        assert torch.equal(dense, linear.weight.detach())  # fp32 values: the pruned weight itself


@pytest.mark.parametrize("group_size", [8, 16, -1])
def test_sparse24_int4_linear_matches_its_dequantized_weight(group_size):
    linear = _pruned_linear()
    layer = Sparse24Int4Linear.from_linear(linear, group_size)
    assert layer.group_size == (48 if group_size == -1 else group_size)
    dense = dequantize_sparse24_int4(layer.packed())
    x = torch.randn(4, 96)
    assert rel_err(layer(x), F.linear(x, dense, linear.bias)) < 1e-5
    assert rel_err(dense, linear.weight.detach()) < 0.1  # int4 of the kept values: close to the pruned weight


def test_sparse24_int4_linear_on_int8_activations():
    """act_bits=8 quantizes x per row and block of 32 inputs (reference.sparse24_int4_gemm_a8); the tiled CPU
    kernel and the packed path agree, and the result stays close to the float-activation layer."""
    linear = _pruned_linear()
    layer = Sparse24Int4Linear.from_linear(linear, 16, act_bits=8)
    float_layer = Sparse24Int4Linear.from_linear(linear, 16)
    x = torch.randn(3, 96)
    packed = layer.packed()
    q = packed.qvalues
    ref = reference.sparse24_int4_gemm_a8(x, q.qweight, q.qzeros, q.scales, packed.meta, 16) + linear.bias
    assert rel_err(layer(x), ref) < 1e-5 and "a8" in repr(layer)
    assert rel_err(layer(x), float_layer(x)) < 0.05  # int8 rounding of x, not a different product
    with pytest.raises(ValueError, match="act_bits=4"):
        Sparse24Int4Linear.from_linear(linear, 16, act_bits=4)


def test_non_2_4_weight_is_rejected_with_its_first_bad_group():
    linear = nn.Linear(16, 8)
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj .*row 0, group 0"):
        Sparse24Linear.from_linear(linear, name="layers.0.q_proj")
    with pytest.raises(ValueError, match="not 2:4"):
        Sparse24Int4Linear.from_linear(linear, 8)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="multiples of 8"):
        Sparse24Linear(20, 16)
    with pytest.raises(ValueError, match="value_dtype"):
        Sparse24Linear(16, 16, value_dtype=torch.int8)
    with pytest.raises(ValueError, match="multiple of 16"):
        Sparse24Int4Linear(24, 16, 8)
    assert "divisible" in Sparse24Linear.why_ineligible("x", nn.Linear(20, 16))
    assert Sparse24Int4Linear.why_ineligible("x", nn.Linear(48, 16)) is None


@pytest.mark.parametrize("kind", ["float", "int4"])
def test_cpu_layer_keeps_only_the_tiles_and_exports_bit_exactly(kind):
    linear = _pruned_linear()
    layer = Sparse24Linear.from_linear(linear) if kind == "float" else Sparse24Int4Linear.from_linear(linear, 16)
    assert isinstance(layer, TiledLinear)
    names = layer.CHECKPOINT_BUFFERS
    assert all(getattr(layer, name).numel() == 0 for name in names)  # released once tiled
    state = layer.state_dict()
    fresh = type(layer)(96, 40, 16, bias=True) if kind == "int4" else Sparse24Linear(96, 40, bias=True)
    fresh.load_state_dict(state)
    x = torch.randn(3, 96)
    assert torch.equal(fresh(x), layer(x))
    # .to() restores the storage-layout buffers, bit for bit
    moved = copy.deepcopy(layer).to(torch.device("cpu"))
    for name in names:
        assert torch.equal(getattr(moved, name), state[name]), name
    if kind == "float":
        assert state["values"].shape == (40, 48) and state["meta"].shape == (40, 12)
        assert state["meta"].dtype == torch.uint8
    else:
        assert state["qweight"].shape == (6, 40) and state["meta"].shape == (40, 12)
    tiles = sum(t.numel() * t.element_size() for t in layer.kernel_tensors())
    dense = 40 * 96 * 4
    assert tiles < (0.6 if kind == "float" else 0.2) * dense


def test_wrong_input_width_and_device_are_clear_errors():
    layer = Sparse24Linear.from_linear(_pruned_linear())
    with pytest.raises(ValueError, match="input has 95 features"):
        layer(torch.randn(2, 95))


# ------------------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("tag", ["mag-24", "mag-24-w4g16", "mag-24-w4g-1-sym", "mag-24-w4g16-a8"])
def test_magnitude_2_4_compression_of_a_model(tiny_llama, tag):
    model = copy.deepcopy(tiny_llama)
    config = config_from_tag(tag)
    assert isinstance(config, MagnitudeConfig) and config.tag == tag
    dense_bytes = weight_bytes(model)
    summary = compress_(model, config, progress=False)
    layer_type = Sparse24Int4Linear if config.bits else Sparse24Linear
    swapped = [name for name, m in model.named_modules() if isinstance(m, layer_type)]
    assert sorted(swapped) == sorted(summary.replaced)
    assert all(getattr(model.get_submodule(name), "act_bits", None) == config.act_bits for name in swapped)
    if config.bits:  # the tiny model's down_proj has 200 inputs: 2:4+int4 needs multiples of 16
        assert len(swapped) == 12 and set(summary.kept_dense) == {"lm_head", "model.layers.0.mlp.down_proj",
                                                                   "model.layers.1.mlp.down_proj"}
        assert "divisible by 16" in summary.kept_dense["model.layers.0.mlp.down_proj"]
    else:
        assert len(swapped) == 14 and summary.kept_dense == {"lm_head": "skipped by configuration"}
    assert weight_bytes(model) < dense_bytes
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    # Each swapped layer computes its own pruned weight exactly: compare one against F.linear.
    name = summary.replaced[0]
    layer = model.get_submodule(name)
    original = tiny_llama.get_submodule(name)
    x = torch.randn(2, original.in_features)
    dense = (unpack_sparse24(layer.packed()) if not config.bits else dequantize_sparse24_int4(layer.packed()))
    # int8 activations: the int8 rounding of x (per block of 32 inputs), not a different product
    assert rel_err(layer(x), F.linear(x, dense.float())) < (0.05 if config.act_bits else 1e-5)
    if not config.bits:
        assert torch.equal(dense, prune_magnitude_24(original.weight.detach()))


def test_magnitude_tags_and_config_errors():
    assert config_from_tag("mag-24-w4g64-head") == MagnitudeConfig(bits=4, group_size=64, lm_head=True)
    assert config_from_tag("mag-24").bits is None
    assert config_from_tag("mag-50") == MagnitudeConfig(pattern="unstructured", sparsity=0.5)
    with pytest.raises(ValueError, match="unknown compression tag"):
        config_from_tag("mag-250")
    with pytest.raises(ValueError, match="group_size=12"):
        config_from_tag("mag-24-w4g12")
    with pytest.raises(ValueError, match="pattern"):
        MagnitudeConfig(pattern="3:3")
    with pytest.raises(ValueError, match="2:4 pattern"):
        MagnitudeConfig(pattern="4:8", bits=4)
    assert config_from_tag("mag-24-w4g64-a8") == MagnitudeConfig(bits=4, group_size=64, act_bits=8)
    assert config_from_tag("wanda-24-w4g64-a8").act_bits == config_from_tag("sparsegpt-24-w4g64-a8").act_bits == 8
    with pytest.raises(ValueError, match="unknown compression tag"):
        config_from_tag("mag-24-a8")  # int8 activations need int4 values
    with pytest.raises(ValueError, match="needs int4 values"):
        MagnitudeConfig(act_bits=8)
    with pytest.raises(ValueError, match="act_bits=4"):
        MagnitudeConfig(bits=4, act_bits=4)
