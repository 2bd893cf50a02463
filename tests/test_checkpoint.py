"""Whole-model checkpoints: save ours (GPTQ v1, our 2:4 layout, pruned dense), load ours and other tools' (GPTQ v1
incl. act-order, AWQ GEMM)."""
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from comptrust import compress_, ops
from comptrust.checkpoint import load_quantized, save_quantized
from comptrust.cli import main as cli_main
from comptrust.compress import RTNConfig
from comptrust.formats import dequantize_awq, to_gptq_tensors
from comptrust.models import ModelLoadError, ModelNotFoundError, checkpoint_quantization, load_model
from comptrust.nn import ActOrderQuantLinear, BitmapSparseLinear, QuantLinear
from quant_cases import random_int3, random_int4, random_int8, rel_err

RANDOM_LAYER = {3: random_int3, 4: random_int4, 8: random_int8}
IDS = torch.randint(0, 500, (2, 11), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.inference_mode():
        return model(ids).logits


def gptq_tensors_of(model):
    return {name: to_gptq_tensors(m.packed(), m.bits, m.bias) if not isinstance(m, ActOrderQuantLinear)
            else m.gptq_tensors() for name, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.fixture(scope="module")
def compressed_w4(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    config = RTNConfig(bits=4, group_size=32)
    compress_(model, config, progress=False)
    return model, config


@pytest.fixture(scope="module")
def saved_w4(compressed_w4, smollm2_tokenizer, tmp_path_factory):
    model, config = compressed_w4
    out = tmp_path_factory.mktemp("w4") / "ckpt"
    save_quantized(model, smollm2_tokenizer, out, config)
    return out


# ------------------------------------------------------------------------------------ our round trip

@pytest.mark.parametrize("config", [
    RTNConfig(bits=4, group_size=32),
    RTNConfig(bits=3, group_size=32),                      # MLP (200 wide) stays dense: int3 needs 32 | n, k
    RTNConfig(bits=8, group_size=32, symmetric=True),
    RTNConfig(bits=4, group_size=-1, symmetric=True, act_bits=8, lm_head=True),  # lm_head packed: tie broken
], ids=lambda c: c.tag)
def test_save_load_round_trip_is_bit_exact(tiny_llama, smollm2_tokenizer, tmp_path, config):
    model = copy.deepcopy(tiny_llama)
    summary = compress_(model, config, progress=False)
    saved = save_quantized(model, smollm2_tokenizer, tmp_path / "ckpt", config)
    assert saved.quantized == sorted(summary.replaced) and saved.files["model.safetensors"] > 0
    assert {"config.json", "tokenizer.json"} <= set(saved.files)

    written = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    qc = written["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"], qc["checkpoint_format"]) == \
        ("gptq", config.bits, config.group_size, config.symmetric, False, "gptq")
    assert qc["comptrust"]["tag"] == config.tag and qc["comptrust"]["act_bits"] == config.act_bits
    assert written["tie_word_embeddings"] is not config.lm_head
    stored = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert "lm_head.weight" not in stored  # tied (written once) or packed
    first = summary.replaced[0]
    assert stored[f"{first}.g_idx"].dtype == torch.int32 and stored[f"{first}.scales"].dtype == torch.float16

    loaded = load_quantized(tmp_path / "ckpt")
    assert loaded.quantization.tag == config.tag and loaded.compression.replaced == sorted(summary.replaced)
    expected, got = gptq_tensors_of(model), gptq_tensors_of(loaded.model)
    assert expected.keys() == got.keys()
    for name in expected:
        for key, tensor in expected[name].items():
            assert got[name][key].dtype == tensor.dtype and torch.equal(got[name][key], tensor), f"{name}.{key}"
        layer = loaded.model.get_submodule(name)
        assert (layer.bits, layer.symmetric, layer.act_bits) == (config.bits, config.symmetric, config.act_bits)
    if config.lm_head:
        assert isinstance(loaded.model.lm_head, QuantLinear)
    else:
        assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert torch.equal(logits(loaded.model), logits(model))


def test_save_refuses_non_empty_dir_unless_asked(compressed_w4, smollm2_tokenizer, tmp_path):
    model, config = compressed_w4
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        save_quantized(model, smollm2_tokenizer, tmp_path, config)
    save_quantized(model, smollm2_tokenizer, tmp_path, config, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me" and (tmp_path / "model.safetensors").is_file()


def test_save_rejects_dense_model_and_wrong_config(tiny_llama, compressed_w4, smollm2_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="no QuantLinear layers"):
        save_quantized(tiny_llama, smollm2_tokenizer, tmp_path / "a")
    with pytest.raises(ValueError, match="group size 32"):
        save_quantized(compressed_w4[0], smollm2_tokenizer, tmp_path / "b", RTNConfig(bits=4, group_size=64))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------- other tools' checkpoints

def small_config(bias=False):
    """Every linear a multiple of 32 wide (int3 too); biases exercise the .bias tensors."""
    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=True, attention_bias=bias, mlp_bias=bias)


def decoder_linears(model):
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]


def write_checkpoint(path, model, quantization_config, layer_tensors, tokenizer, both_tied=False):
    """A checkpoint directory laid out the way AutoGPTQ / AutoAWQ / transformers write them (a tied
    embedding once, or under both names as some older writers did)."""
    path.mkdir()
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config))
    dense = {k: v.contiguous() for k, v in model.state_dict().items()
             if (both_tied or k != "lm_head.weight") and k.rpartition(".")[0] not in layer_tensors}
    if both_tied:
        dense["lm_head.weight"] = dense["lm_head.weight"].clone()  # safetensors stores no shared memory
    for name, tensors in layer_tensors.items():
        dense.update({f"{name}.{key}": t.contiguous() for key, t in tensors.items()})
    save_file(dense, str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(path))
    return path


def act_order_g_idx(k, g, seed):
    """What GPTQ desc_act writes: the j-th row quantized (a random order) is in group j // g."""
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // g).to(torch.int32)
    return g_idx


@pytest.mark.parametrize("bits", [4, 3, 8])
def test_act_order_gptq_checkpoint_matches_dequantized_reference(bits, smollm2_tokenizer, tmp_path):
    torch.manual_seed(1)
    reference = LlamaForCausalLM(small_config(bias=True)).eval()
    layers = {}
    for i, name in enumerate(decoder_linears(reference)):
        linear = reference.get_submodule(name)
        packed, codes, zeros, _ = RANDOM_LAYER[bits](linear.out_features, linear.in_features, 32, seed=i)
        g_idx = act_order_g_idx(linear.in_features, 32, seed=100 + i)
        tensors = to_gptq_tensors(packed, bits, bias=linear.bias.detach().half())  # rows packed as they are
        tensors["g_idx"] = g_idx
        layers[name] = tensors
        scales = packed.scales.t().float()[:, g_idx.long()]          # row i uses group g_idx[i]
        linear.weight.data = (codes - zeros[:, g_idx.long()]).float() * scales
        linear.bias.data = linear.bias.detach().half().float()
    qc = {"quant_method": "gptq", "bits": bits, "group_size": 32, "desc_act": True, "sym": False,
          "static_groups": False, "true_sequential": True, "damp_percent": 0.01, "checkpoint_format": "gptq"}
    path = write_checkpoint(tmp_path / "gptq", reference, qc, layers, smollm2_tokenizer)

    loaded = load_model(str(path))
    assert loaded.quantization.tag == f"gptq-w{bits}g32-act-order"
    assert all(isinstance(loaded.model.get_submodule(n), ActOrderQuantLinear) for n in layers)
    assert rel_err(logits(loaded.model), logits(reference)) < 1e-5

    # Re-saving gives the act-order tensors back bit for bit (desc_act stays true).
    save_quantized(loaded.model, loaded.tokenizer, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["desc_act"] is True
    stored = load_file(tmp_path / "again" / "model.safetensors")
    for name, tensors in layers.items():
        for key, tensor in tensors.items():
            expected = tensor.float() if key == "bias" else tensor  # QuantLinear keeps its bias in fp32
            assert torch.equal(stored[f"{name}.{key}"], expected), f"{name}.{key}"


def test_awq_gemm_checkpoint_matches_dequantized_reference(smollm2_tokenizer, tmp_path):
    torch.manual_seed(2)
    reference = LlamaForCausalLM(small_config(bias=True)).eval()
    gen = torch.Generator().manual_seed(3)
    layers = {}
    for name in decoder_linears(reference):
        linear = reference.get_submodule(name)
        n, k = linear.out_features, linear.in_features
        # Random words: every nibble value, including AWQ's zero point 0 (stored by flipping, see formats/awq.py).
        qweight = torch.randint(-2**31, 2**31, (k, n // 8), generator=gen, dtype=torch.int64).to(torch.int32)
        qzeros = torch.randint(-2**31, 2**31, (k // 32, n // 8), generator=gen, dtype=torch.int64).to(torch.int32)
        scales = (torch.rand(k // 32, n, generator=gen) * 0.02 + 1e-3).half()
        layers[name] = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "bias": linear.bias.detach().half()}
        linear.weight.data = dequantize_awq(qweight, qzeros, scales, 32)
        linear.bias.data = linear.bias.detach().half().float()
    zero_points = torch.cat([((t["qzeros"].unsqueeze(-1) >> torch.arange(0, 32, 4)) & 0xF).flatten()
                             for t in layers.values()])
    assert (zero_points == 0).any() and (zero_points == 15).any()
    qc = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
          "modules_to_not_convert": None}
    path = write_checkpoint(tmp_path / "awq", reference, qc, layers, smollm2_tokenizer, both_tied=True)

    loaded = load_quantized(path)
    assert loaded.quantization.tag == "awq-w4g32" and len(loaded.compression.replaced) == 14
    assert loaded.compression.kept_dense == {"lm_head": "not quantized in the checkpoint"}
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight  # stored twice, equal: tied
    assert rel_err(logits(loaded.model), logits(reference)) < 1e-5


# --------------------------------------------------------------------------------- malformed inputs

LAYER = "model.layers.0.self_attn.q_proj"


def rewrite(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def copy_checkpoint(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "ckpt")


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({f"{LAYER}.qweight": t[f"{LAYER}.qweight"][:-1].clone()}),
     rf"{LAYER}\.qweight: expected \[12, 96\] int32, got \[11, 96\] int32"),
    (lambda t: t.update({f"{LAYER}.scales": t[f"{LAYER}.scales"].float()}),
     rf"{LAYER}\.scales: expected \[3, 96\] float16, got \[3, 96\] float32"),
    (lambda t: t.pop(f"{LAYER}.qzeros"), rf"{LAYER}\.qzeros: missing \(expected \[3, 12\] int32\)"),
    (lambda t: t.pop(f"{LAYER}.qweight"), rf"{LAYER}\.qweight: missing"),
    (lambda t: t.pop("model.norm.weight"), r"missing tensors: model\.norm\.weight \(expected \[96\] float32\)"),
    (lambda t: t.update({"model.norm.weight": torch.ones(95)}), r"model\.norm\.weight: expected shape \[96\]"),
    (lambda t: t.update({f"{LAYER}.g_idx": torch.zeros(96, dtype=torch.int32)}), rf"{LAYER}\.g_idx: group 0 has 96"),
    (lambda t: t.update({"model.layers.0.extra": torch.ones(2)}), r"model\.layers\.0\.extra is not part of"),
], ids=["qweight-shape", "scales-dtype", "no-qzeros", "no-qweight", "no-dense", "dense-shape", "bad-g_idx", "extra"])
def test_malformed_tensors_are_named(saved_w4, tmp_path, change, message):
    path = copy_checkpoint(saved_w4, tmp_path)
    rewrite(path, change)
    with pytest.raises(ModelLoadError, match=message):
        load_quantized(path)


@pytest.mark.parametrize("update, message", [
    ({"quant_method": "bitsandbytes"}, r"quant_method 'bitsandbytes' is not supported"),
    ({"quant_method": "exl2"}, r"quant_method 'exl2' is not supported"),
    ({"format": "gptq_v2", "checkpoint_format": "gptq_v2"}, r"format 'gptq_v2' is not supported.*v1"),
    ({"format": None, "checkpoint_format": "marlin"}, r"format 'marlin' is not supported"),
    ({"bits": 2}, r"bits=2 are not supported"),
    ({"bits": 8, "comptrust": {"act_bits": 8}}, r"int8 weights run with float activations only"),
    ({"bits": "4"}, r"bits must be an integer"),
    ({"quant_method": "awq", "format": None, "version": "gemv"}, r"AWQ format 'gemv' is not supported"),
    ({"quant_method": "awq", "format": "gemm", "bits": 3}, r"AWQ checkpoints with bits=3"),
])
def test_unsupported_quantization_is_refused_before_reading_tensors(saved_w4, tmp_path, update, message):
    path = copy_checkpoint(saved_w4, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(update)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"not read")
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(path))


def test_missing_files(saved_w4, tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_quantized(tmp_path / "nowhere")
    path = copy_checkpoint(saved_w4, tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="never loads pickles"):
        load_quantized(path)
    (path / "pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_quantized(path)
    (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # truncated header
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load_quantized(path)
    (path / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_quantized(path)


# ------------------------------------------------------------------------------- load_model and CLI

def test_load_model_dispatches_a_quantized_directory(saved_w4, compressed_w4):
    assert checkpoint_quantization(str(saved_w4)).tag == "rtn-w4g32"
    loaded = load_model(str(saved_w4))
    assert loaded.quantization.quant_method == "gptq" and loaded.chat and loaded.source == str(saved_w4.resolve())
    assert sum(isinstance(m, QuantLinear) for m in loaded.model.modules()) == 14
    assert torch.equal(logits(loaded.model), logits(compressed_w4[0]))


def test_load_model_finds_a_cached_hub_checkpoint(saved_w4, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--some-org--tiny-gptq" / "snapshots" / ("a" * 40)
    shutil.copytree(saved_w4, snapshot)
    (tmp_path / "hub" / "models--some-org--tiny-gptq" / "refs").mkdir()
    (tmp_path / "hub" / "models--some-org--tiny-gptq" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("some-org/tiny-gptq")
    assert loaded.quantization.tag == "rtn-w4g32" and loaded.name == "some-org/tiny-gptq"


def test_cli_compress_round_trip(tiny_llama, smollm2_tokenizer, tmp_path, capsys):
    dense_dir = tmp_path / "dense"
    tiny_llama.save_pretrained(dense_dir)
    smollm2_tokenizer.save_pretrained(dense_dir)
    out = tmp_path / "int4"
    assert cli_main(["compress", "--model", str(dense_dir), "--method", "rtn", "--group-size", "32", "--out", str(out),
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "14 linear layers compressed rtn-w4g32" in printed and "model.safetensors" in printed and "MiB" in printed

    expected = copy.deepcopy(tiny_llama)
    compress_(expected, RTNConfig(bits=4, group_size=32), progress=False)
    assert torch.equal(logits(load_model(str(out)).model), logits(expected))

    assert cli_main(["compress", "--model", str(dense_dir), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli_main(["compress", "--model", str(out), "--out", str(tmp_path / "again")]) == 2
    assert "already compressed" in capsys.readouterr().err


def test_cli_gptq_compress_save_load_reproduces_outputs_exactly(tiny_llama, smollm2_tokenizer, tmp_path, capsys):
    from comptrust.compress import GPTQConfig, calibration_tokens

    dense_dir = tmp_path / "dense"
    tiny_llama.save_pretrained(dense_dir)
    smollm2_tokenizer.save_pretrained(dense_dir)
    out = tmp_path / "gptq"
    assert cli_main(["compress", "--model", str(dense_dir), "--method", "gptq", "--bits", "4", "--group-size", "32",
                     "--act-order", "--calib-samples", "4", "--calib-seqlen", "64", "--out", str(out),
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "14 linear layers compressed gptq-w4g32-act" in printed and "on 4 x 64 calibration tokens" in printed
    assert "per-layer error" in printed and "model.layers.1" in printed and "down_proj" in printed

    expected = copy.deepcopy(tiny_llama)
    calib = calibration_tokens(smollm2_tokenizer, "builtin", nsamples=4, seqlen=64, seed=0)
    compress_(expected, GPTQConfig(bits=4, group_size=32, act_order=True), calib, progress=False)
    loaded = load_model(str(out))
    assert any(isinstance(m, ActOrderQuantLinear) for m in loaded.model.modules())
    assert torch.equal(logits(loaded.model), logits(expected))
    assert loaded.quantization.tag == "gptq-w4g32-act" and loaded.quantization.desc_act


def test_cli_compress_saves_unstructured_pruning_dense(tiny_llama, smollm2_tokenizer, tmp_path, capsys):
    dense_dir = tmp_path / "dense"
    tiny_llama.save_pretrained(dense_dir)
    smollm2_tokenizer.save_pretrained(dense_dir)
    out = tmp_path / "wanda"
    assert cli_main(["compress", "--model", str(dense_dir), "--method", "wanda", "--pattern", "unstructured",
                     "--sparsity", "0.5", "--calib-samples", "2", "--calib-seqlen", "32", "--out", str(out),
                     "--no-progress"]) == 0
    assert "compressed wanda-50" in capsys.readouterr().out
    model = load_model(str(out)).model
    assert json.loads((out / "config.json").read_text())["comptrust_compression"]["tag"] == "wanda-50"
    down = model.model.layers[0].mlp.down_proj  # back on the bitmap kernel where it runs here, as when pruned
    assert isinstance(down, BitmapSparseLinear if ops.cpu_isa() == "avx512" else nn.Linear)
    weight = down.dense_weight() if isinstance(down, BitmapSparseLinear) else down.weight
    assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)

    assert cli_main(["compress", "--model", str(dense_dir), "--method", "rtn", "--act-order", "--out",
                     str(tmp_path / "r")]) == 2
    assert "--act-order applies to gptq" in capsys.readouterr().err


def test_run_evaluates_a_checkpoint_as_it_is(saved_w4, tmp_path):
    from comptrust.run import RunConfig, run

    output = run(RunConfig(model=str(saved_w4), out_dir=str(tmp_path / "report"), ppl_max_tokens=128,
                           prompt_tokens=16, decode_tokens=2, speed_repeats=1, progress=False))
    report = json.loads(open(output.paths["json"]).read())
    (row,) = report["configs"]
    assert row["name"] == "rtn-w4g32 (checkpoint)" and len(row["compression"]["replaced"]) == 14
    assert row["compression"]["config"]["quant_method"] == "gptq" and report["settings"]["compressions"] == []
    markdown = open(output.paths["markdown"]).read()
    assert "| rtn-w4g32 (checkpoint) |" in markdown and "| dense |" not in markdown


def test_run_with_a_cache_reuses_the_model_outputs(saved_w4, tmp_path):
    from comptrust.evals.adv_robustness import LABEL_WORDS, load_builtin_probes
    from comptrust.evals.cache import OutputCache
    from comptrust.run import RunConfig, run

    def scores(report_dir):
        config = RunConfig(model=str(saved_w4), out_dir=str(tmp_path / report_dir), ppl_max_tokens=128,
                           prompt_tokens=16, decode_tokens=2, speed_repeats=1, progress=False,
                           dimensions=("machine_ethics", "adversarial_robustness"),
                           cache=str(tmp_path / "outputs.sqlite"))
        report = json.loads(open(run(config).paths["json"]).read())
        return [r for r in report["configs"][0]["results"] if r["dimension"] != "perplexity"]

    first = scores("first")
    assert [r["dimension"] for r in first] == ["machine_ethics", "adversarial_robustness"]
    cache = OutputCache(tmp_path / "outputs.sqlite")
    stored = len(cache)
    # one log-likelihood per answer choice and item
    assert stored == 2 * first[0]["n"] + sum(len(LABEL_WORDS[item.task]) for item in load_builtin_probes())
    cache.close()
    assert scores("second") == first
    assert len(OutputCache(tmp_path / "outputs.sqlite")) == stored  # nothing was computed again


# 2:4 + int4 needs in_features % 16: the two down_proj (in 200) stay dense.
@pytest.mark.parametrize("flags,layer_type,count", [
    (["--method", "sparsegpt", "--pattern", "2:4"], "Sparse24Linear", 14),
    (["--method", "sparsegpt", "--pattern", "2:4", "--bits", "4", "--group-size", "16"], "Sparse24Int4Linear", 12),
    (["--method", "magnitude", "--bits", "4", "--group-size", "16"], "Sparse24Int4Linear", 12),
])
def test_cli_24_compress_save_load_reproduces_outputs_exactly(flags, layer_type, count, tiny_llama, smollm2_tokenizer,
                                                                tmp_path, capsys):
    from comptrust.compress import calibration_tokens, config_from_options, is_calibrated
    from comptrust.run import RunConfig, run

    dense_dir = tmp_path / "dense"
    tiny_llama.save_pretrained(dense_dir)
    smollm2_tokenizer.save_pretrained(dense_dir)
    out = tmp_path / "sparse"
    assert cli_main(["compress", "--model", str(dense_dir), *flags, "--calib-samples", "2", "--calib-seqlen", "32",
                     "--out", str(out), "--no-progress"]) == 0
    config = config_from_options(flags[1], int(flags[flags.index("--bits") + 1]) if "--bits" in flags else None,
                                 16 if "--group-size" in flags else None,
                                 pattern="2:4" if "--pattern" in flags else None)
    assert f"compressed {config.tag}" in capsys.readouterr().out
    expected = copy.deepcopy(tiny_llama)
    calib = calibration_tokens(smollm2_tokenizer, "builtin", 2, 32) if is_calibrated(config) else None
    compress_(expected, config, calib, progress=False)
    loaded = load_model(str(out))
    layers = [m for m in loaded.model.modules() if type(m).__name__ == layer_type]
    assert len(layers) == count
    assert torch.equal(logits(loaded.model), logits(expected))
    assert loaded.compression.method == config.tag

    assert cli_main(["compress", "--model", str(out), "--out", str(tmp_path / "again")]) == 2
    assert "already compressed" in capsys.readouterr().err
    # `run` evaluates it as it is, in one row named after it
    output = run(RunConfig(model=str(out), out_dir=str(tmp_path / "report"), ppl_max_tokens=64, prompt_tokens=8,
                           decode_tokens=2, speed_repeats=1, dimensions=(), progress=False))
    (row,) = output.rows
    assert row["name"] == f"{config.tag} (checkpoint)" and len(row["compression"]["replaced"]) == count


def test_run_compresses_with_a_calibrated_method(tiny_llama, smollm2_tokenizer, tmp_path):
    from comptrust.run import RunConfig, run

    dense_dir = tmp_path / "dense"
    tiny_llama.save_pretrained(dense_dir)
    smollm2_tokenizer.save_pretrained(dense_dir)
    output = run(RunConfig(model=str(dense_dir), compressions=("gptq-w4g32", "wanda-24"), out_dir=str(tmp_path / "r"),
                           ppl_max_tokens=64, prompt_tokens=8, decode_tokens=2, speed_repeats=1, dimensions=(),
                           progress=False, calib_samples=3, calib_seqlen=32))
    names = [row["name"] for row in output.rows]
    assert names == ["dense", "gptq-w4g32", "wanda-24"]
    gptq = output.rows[1]["compression"]
    assert gptq["config"]["calibration"] == {"nsamples": 3, "seqlen": 32} and len(gptq["replaced"]) == 14
    assert all("loss" in stats for stats in gptq["layer_stats"].values())


def test_24_int4_checkpoint_keeps_int8_activations(tiny_llama, smollm2_tokenizer, tmp_path):
    from comptrust.checkpoint import save_compressed
    from comptrust.checkpoint_sparse24 import load_sparse24
    from comptrust.compress import config_from_tag
    from comptrust.nn import Sparse24Int4Linear

    model = copy.deepcopy(tiny_llama)
    config = config_from_tag("mag-24-w4g16-a8")
    compress_(model, config, progress=False)
    save_compressed(model, smollm2_tokenizer, tmp_path / "a8", config)
    loaded = load_sparse24(tmp_path / "a8").model
    layers = [m for m in loaded.modules() if isinstance(m, Sparse24Int4Linear)]
    assert layers and all(layer.act_bits == 8 for layer in layers)
    assert torch.equal(logits(loaded), logits(model))


def test_corrupt_24_checkpoints_are_refused(tiny_llama, smollm2_tokenizer, tmp_path):
    from comptrust.checkpoint_sparse24 import load_sparse24
    from comptrust.compress import MagnitudeConfig

    model = copy.deepcopy(tiny_llama)
    compress_(model, MagnitudeConfig(), progress=False)
    from comptrust.checkpoint import save_compressed
    good = tmp_path / "good"
    save_compressed(model, smollm2_tokenizer, good, MagnitudeConfig())
    assert torch.equal(logits(load_sparse24(good).model), logits(model))
    tensors = load_file(str(good / "model.safetensors"))

    def broken(name: str, change) -> Path:
        path = tmp_path / name
        shutil.copytree(good, path)
        changed = dict(tensors)
        change(changed)
        save_file(changed, str(path / "model.safetensors"))
        return path

    meta = "model.layers.0.mlp.up_proj.meta"
    bad_meta = broken("meta", lambda t: t.__setitem__(meta, torch.full_like(t[meta], 0xFF)))
    with pytest.raises(ModelLoadError, match="up_proj.meta: meta is corrupt"):
        load_sparse24(bad_meta)
    values = "model.layers.1.self_attn.q_proj.values"
    short = broken("short", lambda t: t.__setitem__(values, t[values][:, :-4].contiguous()))
    with pytest.raises(ModelLoadError, match="q_proj"):
        load_sparse24(short)
    missing = broken("missing", lambda t: t.pop(values))
    with pytest.raises(ModelLoadError, match=r"missing tensors \['model.layers.1.self_attn.q_proj.values'\]"):
        load_sparse24(missing)
    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        load_sparse24(truncated)
