"""A quantized checkpoint of the real embedded model (SmolLM2-135M-Instruct): save, reload, same greedy text."""
import pytest
import torch

from comptrust import compress_
from comptrust.checkpoint import save_compressed, save_quantized
from comptrust.compress import config_from_tag
from comptrust.memory import weight_bytes
from comptrust.models import load_model
from comptrust.nn import QuantLinear

MIB = 1024 * 1024


@pytest.mark.slow
def test_smollm2_int4_checkpoint_generates_like_the_in_memory_model(tmp_path):
    loaded = load_model("default")
    dense_bytes = weight_bytes(loaded.model)
    config = config_from_tag("rtn-w4g128")
    compress_(loaded.model, config, progress=False)
    saved = save_quantized(loaded.model, loaded.tokenizer, tmp_path / "ckpt", config)
    reloaded = load_model(str(tmp_path / "ckpt"))
    assert sum(isinstance(m, QuantLinear) for m in reloaded.model.modules()) == 30 * 7
    assert reloaded.chat and reloaded.quantization.tag == "rtn-w4g128"

    inputs = loaded.tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        expected = loaded.model.generate(**inputs, max_new_tokens=8, do_sample=False)
        got = reloaded.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected), (loaded.tokenizer.decode(expected[0]), loaded.tokenizer.decode(got[0]))
    # int4 decoder linears (~4.1 bits with fp16 scales) + the fp32 tied embedding (108 MiB) stored once.
    weights = saved.files["model.safetensors"]
    assert weights < 0.35 * dense_bytes
    print(f"\nSmolLM2-135M rtn-w4g128 checkpoint: {saved.total_bytes / MIB:.1f} MiB on disk "
          f"(model.safetensors {weights / MIB:.1f} MiB) vs {dense_bytes / MIB:.1f} MiB dense fp32 weights")


@pytest.mark.slow
def test_smollm2_unstructured_pruning_saves_as_a_dense_checkpoint(tmp_path):
    """The embedded model is read from GGUF, whose models transformers' save_pretrained refuses to write: a pruned
    model that keeps its nn.Linear layers is written by our own writer, and comes back bit for bit, the
    embedding still tied to the output projection."""
    loaded = load_model("default")
    config = config_from_tag("mag-50")
    compress_(loaded.model, config, progress=False)
    saved = save_compressed(loaded.model, loaded.tokenizer, tmp_path / "ckpt", config)
    assert saved.quantized == [] and len(saved.kept_dense) == 30 * 7 + 1  # every linear, lm_head too
    reloaded = load_model(str(tmp_path / "ckpt")).model
    expected, got = loaded.model.state_dict(), reloaded.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert "quantization_config" not in (tmp_path / "ckpt" / "config.json").read_text()
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, loaded.model(ids).logits)
