"""Calibration data and the layer-by-layer compression pass (comptrust.compress.calibration) on a tiny
randomly initialised Llama, plus the calibrated methods' configs and tags."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from comptrust.compress import (KNOWN_TAGS, AWQConfig, GPTQConfig, MagnitudeConfig, SparseGPTConfig, WandaConfig, calibration_tokens,
                                compress_, config_from_tag)
from comptrust.compress.calibration import _block_inputs, _input_groups, _run_block, calibration_text, decoder_layers
from comptrust import ops
from comptrust.nn.act_order_linear import ActOrderQuantLinear
from comptrust.nn.bitmap_sparse_linear import BitmapSparseLinear
from comptrust.nn.quant_linear import QuantLinear
from comptrust.nn.sparse24_linear import Sparse24Int4Linear, Sparse24Linear


class CharTokenizer:
    """Enough of a tokenizer for calibration_tokens: one id per character."""

    def __call__(self, text, return_tensors=None):
        return {"input_ids": torch.tensor([[ord(c) % 96 for c in text]])}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def tokens(nsamples: int = 6, seqlen: int = 32) -> torch.Tensor:
    return calibration_tokens(CharTokenizer(), "builtin", nsamples=nsamples, seqlen=seqlen, seed=0)


# ------------------------------------------------------------------------------------------ data

def test_calibration_tokens_are_seeded_windows_of_the_text():
    text_ids = CharTokenizer()(calibration_text("builtin"))["input_ids"][0]
    ids = tokens(5, 40)
    assert ids.shape == (5, 40)
    assert torch.equal(ids, tokens(5, 40))  # same seed, same windows
    assert not torch.equal(ids, calibration_tokens(CharTokenizer(), nsamples=5, seqlen=40, seed=1))
    for row in ids:  # each window is a contiguous piece of the text
        starts = [s for s in range(text_ids.numel() - 39) if torch.equal(text_ids[s:s + 40], row)]
        assert starts


def test_builtin_calibration_text_is_not_the_perplexity_text():
    from comptrust.evals.perplexity import builtin_text

    calibration = calibration_text("builtin")
    assert len(calibration) > 5000
    assert calibration[:200] not in builtin_text()


def test_calibration_from_txt_and_jsonl(tmp_path):
    txt = tmp_path / "calib.txt"
    txt.write_text("abcdefgh" * 20)
    assert calibration_tokens(CharTokenizer(), str(txt), nsamples=3, seqlen=16).shape == (3, 16)
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": "hello world " * 5}) for _ in range(4)))
    assert "hello world" in calibration_text(str(jsonl))
    jsonl.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        calibration_text(str(jsonl))
    jsonl.write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="line 1 has no string field 'text'"):
        calibration_text(str(jsonl))


def test_calibration_errors_are_clear(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(ValueError, match="has 4 tokens, fewer than seqlen=16"):
        calibration_tokens(CharTokenizer(), str(short), nsamples=2, seqlen=16)
    with pytest.raises(ValueError, match="needs --online"):
        calibration_text("some-org/some-dataset")
    with pytest.raises(ValueError, match="must be positive"):
        calibration_tokens(CharTokenizer(), nsamples=0)


# ------------------------------------------------------------------------------------------ pass

def test_block_pass_reproduces_the_models_hidden_states():
    model = tiny_llama()
    ids = tokens(3, 24)
    _, layers = decoder_layers(model)
    with torch.inference_mode():
        inputs, kwargs = _block_inputs(model, layers, ids)
        assert len(inputs) == 3
        hidden = model(input_ids=ids[2:3], output_hidden_states=True, use_cache=False).hidden_states
        h = inputs[2]
        for index, layer in enumerate(layers):
            torch.testing.assert_close(h, hidden[index])
            h = _run_block(layer, h, kwargs[index])


def test_input_groups_follow_the_llama_block():
    model = tiny_llama()
    _, layers = decoder_layers(model)
    linears = {name: m for name, m in layers[0].named_modules() if isinstance(m, nn.Linear)}
    with torch.inference_mode():
        inputs, kwargs = _block_inputs(model, layers, tokens(1, 16))
        groups = _input_groups(layers[0], linears, inputs[0], kwargs[0])
    assert [sorted(group.names) for group in groups] == [
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    # What produced each input: the norms; the attention output and act(gate) * up are no module's output.
    assert [group.producer for group in groups] == ["input_layernorm", None, "post_attention_layernorm", None]


@pytest.mark.parametrize("config,layer_type", [
    (GPTQConfig(bits=4, group_size=32), QuantLinear),
    (GPTQConfig(bits=3, group_size=32, act_order=True), ActOrderQuantLinear),
    (GPTQConfig(bits=8, group_size=32, act_order=True), ActOrderQuantLinear),
    (GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=True, true_sequential=False), QuantLinear),
    (AWQConfig(bits=4, group_size=32), QuantLinear),
    (SparseGPTConfig(pattern="2:4"), Sparse24Linear),
    (SparseGPTConfig(pattern="2:4", bits=4, group_size=16), Sparse24Int4Linear),
    (SparseGPTConfig(pattern="2:4", bits=4, group_size=16, act_bits=8), Sparse24Int4Linear),
    (SparseGPTConfig(pattern="unstructured", sparsity=0.5), "bitmap"),
    (WandaConfig(pattern="2:4"), Sparse24Linear),
    (WandaConfig(pattern="2:4", bits=4, group_size=16, act_bits=8), Sparse24Int4Linear),
    (WandaConfig(pattern="4:8"), "bitmap"),
])
def test_calibrated_methods_compress_every_block_linear(config, layer_type):
    model = tiny_llama()
    ids = tokens()
    with torch.inference_mode():
        dense_logits = model(input_ids=ids[:1]).logits
    summary = compress_(model, config, ids, progress=False)
    assert len(summary.replaced) == 14  # 7 linears in each of the 2 blocks
    assert summary.kept_dense == {"lm_head": "outside the decoder blocks (not calibrated)"}
    if layer_type == "bitmap":  # unstructured / 4:8: the bitmap kernel where it beats dense here (AVX-512)
        layer_type = BitmapSparseLinear if ops.cpu_isa() == "avx512" else nn.Linear
    for name in summary.replaced:
        module = model.get_submodule(name)
        assert type(module) is layer_type
        assert getattr(module, "act_bits", None) == getattr(config, "act_bits", None)
    assert isinstance(model.lm_head, nn.Linear)
    assert summary.config["calibration"] == {"nsamples": 6, "seqlen": 32}
    with torch.inference_mode():
        logits = model(input_ids=ids[:1]).logits
    assert torch.isfinite(logits).all()
    assert not torch.equal(logits, dense_logits)
    if config.method != "gptq":
        weight = model.get_submodule(summary.replaced[0])
        if isinstance(weight, nn.Linear):
            assert float((weight.weight == 0).float().mean()) >= 0.5


def test_gptq_and_awq_output_error_is_lower_than_rtn_on_the_tiny_model():
    ids = tokens(8, 32)
    errors = {}
    for tag in ("rtn-w3g32", "gptq-w3g32", "awq-w3g32"):
        model = tiny_llama()
        with torch.inference_mode():
            dense = model(input_ids=ids).logits
        config = config_from_tag(tag)
        compress_(model, config, ids if getattr(config, "calibrated", False) else None, progress=False)
        with torch.inference_mode():
            errors[tag] = float((model(input_ids=ids).logits - dense).pow(2).mean())
    assert errors["gptq-w3g32"] < errors["rtn-w3g32"]  # measured: 0.00014 against 0.00077
    assert errors["awq-w3g32"] < errors["rtn-w3g32"]   # measured: 0.00044


def test_awq_scales_fold_into_the_producers_without_changing_the_dense_block():
    from comptrust.compress.calibration import _gather

    model = tiny_llama()
    ids = tokens(4, 32)
    config = AWQConfig(bits=3, group_size=32)
    _, layers = decoder_layers(model)
    layer = layers[0]
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    norm_before = layer.input_layernorm.weight.detach().clone()
    with torch.inference_mode():
        inputs, kwargs = _block_inputs(model, layers, ids)
        before = [_run_block(layer, h, kwargs[0]) for h in inputs]
        groups = _input_groups(layer, linears, inputs[0], kwargs[0])
        statistics = _gather(layer, linears, groups, config, inputs, kwargs[0])
        config.prepare_stage(layer, groups, linears, statistics)
        after = [_run_block(layer, h, kwargs[0]) for h in inputs]
    alphas = {group.names[0]: statistics[group.names[0]].alpha for group in groups}
    assert alphas["self_attn.o_proj"] is None  # grouped-query attention: nothing to fold o_proj's scale into
    assert alphas["self_attn.q_proj"] is not None and alphas["mlp.down_proj"] is not None
    if alphas["self_attn.q_proj"] > 0:
        assert not torch.equal(layer.input_layernorm.weight, norm_before)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_calibrated_method_without_data_fails_before_touching_the_model():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="needs calibration data"):
        compress_(model, GPTQConfig(group_size=32), None, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_every_known_tag_parses_and_round_trips():
    for tag in KNOWN_TAGS.split(", "):
        assert config_from_tag(tag).tag == tag
    assert config_from_tag("sparsegpt-24-w4g64") == SparseGPTConfig(pattern="2:4", bits=4, group_size=64)
    assert config_from_tag("wanda-50") == WandaConfig(pattern="unstructured", sparsity=0.5)
    assert config_from_tag("mag-48") == MagnitudeConfig(pattern="4:8")
    assert config_from_tag("gptq-w4g128-act-static") == GPTQConfig(act_order=True, static_groups=True)
    assert config_from_tag("awq-w3g128-noclip") == AWQConfig(bits=3, clip=False)


@pytest.mark.parametrize("tag,match", [
    ("gptq-w5g128", "unknown compression tag"), ("gptq-w4g100", "multiple of 8"), ("wanda-48-w4g64", "2:4"),
    ("sparsegpt-0", "sparsity"),
])
def test_bad_tags_are_refused(tag, match):
    with pytest.raises(ValueError, match=match):
        config_from_tag(tag)


@pytest.mark.parametrize("tag,zero_share", [("mag-50", 0.5), ("mag-48", 0.5), ("mag-24", 0.5)])
def test_magnitude_patterns_prune_the_smallest_weights(tag, zero_share):
    model = tiny_llama()
    original = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    compress_(model, config_from_tag(tag), progress=False)
    layer = model.model.layers[0].mlp.up_proj
    weight = layer.weight if isinstance(layer, nn.Linear) else None
    if isinstance(layer, BitmapSparseLinear):  # unstructured and 4:8 on the bitmap kernel
        weight = layer.dense_weight()
    if weight is None:  # 2:4 runs on the sparse kernels
        from comptrust.formats.sparse24 import unpack_sparse24
        weight = unpack_sparse24(layer.packed())
    assert float((weight == 0).float().mean()) == pytest.approx(zero_share, abs=0.01)
    kept = weight != 0
    assert torch.equal(weight[kept], original[kept])
    if tag == "mag-50":  # every pruned weight is no larger than every kept one of its row
        for row in range(weight.shape[0]):
            assert original[row][~kept[row]].abs().max() <= original[row][kept[row]].abs().min()
    if tag == "mag-48":
        assert torch.all(kept.reshape(weight.shape[0], -1, 8).sum(-1) == 4)


def test_config_from_options_builds_every_method_and_refuses_foreign_options():
    from comptrust.compress import RTNConfig, config_from_options

    assert config_from_options("gptq", 3, 64, act_order=True) == GPTQConfig(bits=3, group_size=64, act_order=True)
    assert config_from_options("awq") == AWQConfig()
    assert config_from_options("rtn", lm_head=True) == RTNConfig(lm_head=True)
    assert config_from_options("sparsegpt", 4, pattern="2:4") == SparseGPTConfig(bits=4)
    assert config_from_options("wanda", pattern="unstructured", sparsity=0.6) == WandaConfig(pattern="unstructured",
                                                                                            sparsity=0.6)
    assert config_from_options("magnitude", pattern="4:8") == MagnitudeConfig(pattern="4:8")
    with pytest.raises(ValueError, match="--sparsity applies to magnitude, sparsegpt, wanda, not gptq"):
        config_from_options("gptq", sparsity=0.5)
    with pytest.raises(ValueError, match="unknown method"):
        config_from_options("obc")
