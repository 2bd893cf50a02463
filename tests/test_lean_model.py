"""comptrust.lean_model: Llama checkpoints loaded without transformers compute what the transformers-loaded model
computes, bit for bit, on every layer kind; comptrust.serving_process measures them in a process without it."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from comptrust import compress_, load_model
from comptrust.checkpoint import save_compressed
from comptrust.compress import calibration_tokens, config_from_tag, is_calibrated
from comptrust.lean_decode import LeanDecoder
from comptrust.lean_model import LeanLlamaConfig, LeanRotary, inverse_frequencies, load_lean_model
from comptrust.models import ModelLoadError, ModelNotFoundError
from comptrust.nn import BitmapSparseLinear, QuantLinear, Sparse24Int4Linear, Sparse24Linear
from comptrust.serving_process import main as serving_main
from comptrust.serving_process import measure_serving_process

PROMPT = torch.tensor([[1, 450, 3012, 7, 88, 20, 512, 49151, 3]])

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 100000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.5},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}


def llama_config(rope: dict, **overrides) -> LlamaConfig:
    settings = dict(vocab_size=300, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, rope_parameters=dict(rope))
    return LlamaConfig(**(settings | overrides))


# ------------------------------------------------------------------------------------------------- config

def test_config_reads_what_transformers_writes():
    config = LeanLlamaConfig.from_dict(llama_config(ROPES["llama3"], tie_word_embeddings=False).to_dict(), "c.json")
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (300, 96, 200)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 24)
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["factor"] == 8.0
    assert not config.tie_word_embeddings and config.model_type == "llama" and config.hidden_act == "silu"


def test_config_reads_the_older_rope_keys():
    raw = llama_config(ROPES["default"]).to_dict()
    del raw["rope_parameters"]
    older = raw | {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}
    params = LeanLlamaConfig.from_dict(older, "c.json").rope_parameters
    assert params == {"type": "linear", "rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}
    assert LeanLlamaConfig.from_dict(raw, "c.json").rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}


def test_config_defaults_are_llama_configs():
    raw = llama_config(ROPES["default"]).to_dict()
    for key in ("tie_word_embeddings", "rms_norm_eps", "num_key_value_heads", "head_dim"):
        raw.pop(key, None)
    config, theirs = LeanLlamaConfig.from_dict(raw, "c.json"), LlamaConfig(**raw)
    assert config.tie_word_embeddings is theirs.tie_word_embeddings is False
    assert config.rms_norm_eps == theirs.rms_norm_eps and config.num_key_value_heads == theirs.num_key_value_heads == 4
    assert config.head_dim == 24


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gemma3_text"}, "model_type 'gemma3_text'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope type 'yarn'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "low_freq_factor"),
    ({"hidden_size": None}, "hidden_size"),
    ({"num_key_value_heads": 3}, "does not divide"),
    ({"rms_norm_eps": "small"}, "rms_norm_eps"),
])
def test_config_refuses_what_the_lean_runtime_does_not_compute(change, message):
    raw = llama_config(ROPES["default"]).to_dict() | change
    with pytest.raises(ModelLoadError, match=message) as error:
        LeanLlamaConfig.from_dict(raw, "ckpt/config.json")
    assert "ckpt/config.json" in str(error.value)


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_rotary_angles_are_transformers_own(rope):
    hf_config = llama_config(ROPES[rope])
    ours = LeanRotary(LeanLlamaConfig.from_dict(hf_config.to_dict(), "c.json"))
    theirs = LlamaRotaryEmbedding(hf_config)
    assert torch.equal(ours.inv_freq, theirs.inv_freq)
    positions = torch.arange(0, 3000, 7).unsqueeze(0)
    for dtype in (torch.float32, torch.bfloat16):
        probe = torch.empty(1, 1, 1, dtype=dtype)
        for a, b in zip(ours(probe, positions), theirs(probe, positions)):
            assert a.dtype == dtype and torch.equal(a, b)
    if rope == "llama3":  # all three bands (kept, scaled, smoothed) occur at this short original context
        base = inverse_frequencies(LeanLlamaConfig.from_dict(llama_config(ROPES["default"]).to_dict() |
                                                             {"rope_parameters": {**ROPES["default"],
                                                                                  "rope_theta": 500000.0}}, "c"))
        ratio = base / ours.inv_freq
        assert (ratio == 1).any() and (ratio == 8).any() and ((ratio > 1) & (ratio < 8)).any()


# --------------------------------------------------------------------------------------------- checkpoints

def _checkpoint(tiny_llama, tokenizer, tag: str | None, folder):
    model = copy.deepcopy(tiny_llama)
    config = None
    if tag is not None:
        config = config_from_tag(tag)
        calib = calibration_tokens(tokenizer, "builtin", 2, 32) if is_calibrated(config) else None
        compress_(model, config, calib, progress=False)
    save_compressed(model, tokenizer, folder, config)
    return folder


LAYER_KINDS = {None: torch.nn.Linear, "rtn-w4g32": QuantLinear, "rtn-w4g32-a8": QuantLinear,
               "rtn-w3g32": QuantLinear, "gptq-w4g32-act": QuantLinear, "mag-24": Sparse24Linear,
               "mag-24-w4g16": Sparse24Int4Linear, "mag-50": BitmapSparseLinear}


@pytest.fixture(scope="module")
def checkpoints(tiny_llama, smollm2_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("lean")
    return {tag: _checkpoint(tiny_llama, smollm2_tokenizer, tag, root / (tag or "dense")) for tag in LAYER_KINDS}


@pytest.mark.parametrize("tag", list(LAYER_KINDS), ids=lambda tag: tag or "dense")
def test_lean_model_decodes_as_the_transformers_loaded_one(tag, checkpoints):
    lean = load_lean_model(checkpoints[tag])
    reference = load_model(str(checkpoints[tag])).model
    assert type(lean).__name__ == "LeanLlamaForCausalLM" and not lean.training
    # the same layer kinds in the same places
    kinds = {name: type(m) for name, m in reference.named_modules() if "proj" in name or name == "lm_head"}
    assert {name: type(lean.get_submodule(name)) for name in kinds} == kinds
    assert any(issubclass(kind, LAYER_KINDS[tag]) for kind in kinds.values())
    if reference.config.tie_word_embeddings:
        assert lean.lm_head.weight is lean.model.embed_tokens.weight
    ours, theirs = LeanDecoder(lean, 40), LeanDecoder(reference, 40)
    assert (ours.program is None) == (theirs.program is None) and ours.greedy_head == theirs.greedy_head
    assert torch.equal(ours.forward(PROMPT), theirs.forward(PROMPT))
    assert ours.greedy_tokens(PROMPT, 20) == theirs.greedy_tokens(PROMPT, 20)


def test_greedy_after_a_prompt_is_the_argmax_of_its_logits(checkpoints):
    decoder = LeanDecoder(load_lean_model(checkpoints["rtn-w4g32"]), 64)
    for length in (1, 5, 9):
        decoder.reset()
        logits = decoder.forward(PROMPT[:, :length])
        decoder.reset()
        assert decoder.greedy_after(PROMPT[:, :length]) == int(logits.argmax(-1))
    if decoder.program is not None:
        with pytest.raises(RuntimeError, match=r"head_argmax: expected a contiguous CPU hidden state \[96\]"):
            decoder.program.head_argmax(torch.zeros(95))


def test_loading_errors_name_the_file_and_tensor(checkpoints, tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_lean_model(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    for source in checkpoints["rtn-w4g32"].iterdir():
        (broken / source.name).write_bytes(source.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing tensors: model\.layers\.1\.post_attention_layernorm\.weight"):
        load_lean_model(broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(config | {"model_type": "mistral"}))
    with pytest.raises(ModelLoadError, match="Llama-architecture models only"):
        load_lean_model(broken)
    (broken / "config.json").write_text(json.dumps(config | {"attention_bias": True}))
    with pytest.raises(ModelLoadError, match="config.attention_bias is set"):
        load_lean_model(broken)


def test_the_serving_modules_do_not_import_transformers():
    code = ("import sys, comptrust.serving_process, comptrust.lean_model, comptrust.memory; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate', 'sympy')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


# ------------------------------------------------------------------------------------------ serving process

@pytest.mark.parametrize("tag", [None, "rtn-w4g32", "mag-24-w4g16", "mag-50"], ids=lambda tag: tag or "dense")
def test_serving_process_measures_a_checkpoint_without_transformers(tag, checkpoints, monkeypatch):
    # from the source checkout's root, where `python -m` would find the sources without their compiled kernels
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    result = measure_serving_process(str(checkpoints[tag]), PROMPT[0].tolist(), decode_tokens=6, repeats=1)
    assert result["transformers_imported"] is False and result["cpu_kernels"] and result["program"] is True
    # it decoded what the transformers-loaded model decodes
    expected = LeanDecoder(load_model(str(checkpoints[tag])).model, 40).greedy_tokens(PROMPT, 6)
    assert result["greedy_tokens"] == expected
    assert result["prompt_tokens"] == PROMPT.shape[1] and result["decode_tokens"] == 6
    assert result["decode_tokens_per_s"] > 0 and result["weight_bytes"] > 0
    assert 0 < result["baseline_rss_bytes"] < result["load_peak_rss_bytes"]
    if result["decode_peak_rss_bytes"] is not None:
        assert result["decode_peak_rss_bytes"] > result["baseline_rss_bytes"]
    # the embedding (and the packed tensors before it was built into tiles) came from the mapped file
    assert result["checkpoint_pages_released_bytes"] >= 49152 * 96 * 4


def test_serving_process_failures_are_clear(checkpoints, tmp_path, capsys):
    with pytest.raises(RuntimeError, match=r"failed \(exit 2\): error: checkpoint directory .* does not exist"):
        measure_serving_process(str(tmp_path / "nowhere"), [1, 2], decode_tokens=2, repeats=1)
    assert serving_main([str(checkpoints[None]), "--prompt-ids", "1,49152"]) == 2
    assert "prompt ids must lie in [0, 49152)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serving_main([str(checkpoints[None]), "--prompt-ids", "1,x"])
    assert "expected comma-separated integers" in capsys.readouterr().err
