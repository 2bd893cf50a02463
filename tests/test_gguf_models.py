"""The dense model a GGUF file de-quantizes to, cached as safetensors (comptrust.gguf_models): the cached model is
the one transformers reads from the file, bit for bit, and a stale, damaged or unwritable cache is never used."""
import copy
import json

import pytest
import torch

from comptrust import gguf_models
from comptrust.gguf_models import STAMP_NAME, entry_dir, read_gguf
from comptrust.models import load_model, smollm2_gguf_path

TEXTS = ["Hello world!", "  leading spaces, tabs\tand\nnewlines", "ñ, 😀 and 日本語", "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def reference():
    """What transformers reads from the embedded model's GGUF file (fp32), uncached."""
    return read_gguf(smollm2_gguf_path(), torch.float32)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPTRUST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("COMPTRUST_DENSE_CACHE", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def gguf_reads(monkeypatch, reference):
    """Replaces the (25 s) GGUF read by a copy of the reference; counts the reads."""
    reads = []

    def fake_read(path, dtype):
        reads.append(path)
        model, tokenizer = reference
        return copy.deepcopy(model).to(dtype), copy.deepcopy(tokenizer)

    monkeypatch.setattr(gguf_models, "read_gguf", fake_read)
    return reads


def assert_same_model(loaded, reference, dtype=torch.float32):
    model, tokenizer = reference
    expected = model.state_dict()
    got = loaded.model.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == dtype and torch.equal(got[name], tensor.to(dtype)), name
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()  # still tied
    for text in TEXTS:
        assert loaded.tokenizer(text).input_ids == tokenizer(text).input_ids, text
    assert loaded.tokenizer.chat_template == tokenizer.chat_template
    messages = [{"role": "user", "content": "Is this the same model?"}]
    assert (loaded.tokenizer.apply_chat_template(messages, tokenize=False)
            == tokenizer.apply_chat_template(messages, tokenize=False))
    assert loaded.source == str(smollm2_gguf_path()) and loaded.chat


def test_first_load_writes_the_entry_later_loads_read_it(cache, reference, monkeypatch):
    first = load_model("default")  # a real read of the GGUF file
    entry = entry_dir(smollm2_gguf_path())
    assert entry.parent.parent == cache and (entry / "model.safetensors").is_file()
    recorded = json.loads((entry / STAMP_NAME).read_text())
    assert recorded["source"]["gguf_file"] == str(smollm2_gguf_path()) and "model.safetensors" in recorded["files"]
    assert not list(entry.parent.glob(".*partial"))  # the writer's scratch folder is gone

    def no_read(path, dtype):
        raise AssertionError("the GGUF file was read again")

    monkeypatch.setattr(gguf_models, "read_gguf", no_read)
    second = load_model("default")
    for loaded in (first, second):
        assert_same_model(loaded, reference)
        assert getattr(loaded.model.config, "quantization_config", None) is None  # the GGUF storage is gone
    maps = open("/proc/self/maps").read()
    assert str(entry / "model.safetensors") not in maps  # memory of its own (memory.copy_into_process_memory)
    ids = reference[1]("The cache must not change the answers.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(second.model(ids).logits, reference[0](ids).logits)
    assert first.fingerprint == second.fingerprint  # output caches keyed on the source still hit


def test_bf16_from_the_cache_rounds_the_fp32_weights(cache, reference, gguf_reads):
    load_model("default")
    loaded = load_model("default", dtype=torch.bfloat16)
    assert len(gguf_reads) == 1
    assert_same_model(loaded, reference, torch.bfloat16)


def _flip_a_weight_byte(entry):
    path = entry / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _edit_the_source_stamp(entry):
    stamp = json.loads((entry / STAMP_NAME).read_text())
    stamp["source"]["mtime_ns"] += 1  # as if the GGUF file had been replaced
    (entry / STAMP_NAME).write_text(json.dumps(stamp))


@pytest.mark.parametrize("sabotage, message", [
    (_flip_a_weight_byte, "damaged (model.safetensors does not match its recorded sha256)"),
    (_edit_the_source_stamp, "from another version of the file or of its reader"),
    (lambda entry: (entry / "tokenizer.json").unlink(), "incomplete (tokenizer.json is missing)"),
    (lambda entry: (entry / STAMP_NAME).unlink(), "incomplete"),
    (lambda entry: (entry / STAMP_NAME).write_text("{not json"), "unreadable"),
])
def test_a_bad_entry_is_rebuilt_not_used(cache, reference, gguf_reads, capfd, sabotage, message):
    load_model("default")
    entry = entry_dir(smollm2_gguf_path())
    sabotage(entry)
    capfd.readouterr()
    loaded = load_model("default")
    assert f"is {message}" in capfd.readouterr().err
    assert len(gguf_reads) == 2
    assert_same_model(loaded, reference)
    load_model("default")  # the rebuilt entry is used again
    assert len(gguf_reads) == 2


def test_an_unwritable_cache_still_loads_the_model(tmp_path, monkeypatch, reference, gguf_reads, capfd):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("COMPTRUST_CACHE", str(blocker))
    loaded = load_model("default")
    assert "could not cache" in capfd.readouterr().err
    assert_same_model(loaded, reference)
    assert blocker.read_text() == "a file where the cache folder would go"


def test_the_cache_can_be_turned_off(cache, reference, gguf_reads, monkeypatch):
    monkeypatch.setenv("COMPTRUST_DENSE_CACHE", "0")
    load_model("default")
    load_model("default")
    assert len(gguf_reads) == 2 and not cache.exists()


def test_a_writer_that_loses_the_race_keeps_the_winners_entry(cache, reference, gguf_reads, monkeypatch):
    path = smollm2_gguf_path()
    entry, stamp = entry_dir(path), gguf_models.source_stamp(path)
    model, tokenizer = reference
    gguf_models.write_entry(model, tokenizer, entry, stamp)
    before = (entry / "model.safetensors").stat().st_ino
    gguf_models.write_entry(model, tokenizer, entry, stamp)  # finds a good entry in place: leaves it
    assert (entry / "model.safetensors").stat().st_ino == before
    assert gguf_models.entry_problem(entry, stamp) is None and not list(entry.parent.glob(".*partial"))


def test_the_current_entry_serves_as_the_dense_checkpoint(cache, reference, gguf_reads, tmp_path, monkeypatch):
    from comptrust.run import Variant, _reloadable

    path = smollm2_gguf_path()
    assert gguf_models.current_entry(path) is None  # nothing cached yet
    loaded = load_model("default")
    entry = gguf_models.current_entry(path)
    assert entry == entry_dir(path) and (entry / "config.json").is_file()
    # comptrust run's serving process takes it as the dense model's checkpoint instead of writing one per run
    scratch = tmp_path / "scratch"
    assert _reloadable(loaded, Variant("dense", "default"), scratch, serving=True) == ("default", str(entry))
    assert not scratch.exists()
    _flip_a_weight_byte(entry)  # a damaged entry is never handed out: the run writes its own checkpoint again
    assert gguf_models.current_entry(path) is None
    assert _reloadable(loaded, Variant("dense", "default"), scratch, serving=True) == ("default", str(scratch))
    assert (scratch / "config.json").is_file()
    monkeypatch.setenv("COMPTRUST_DENSE_CACHE", "0")
    assert gguf_models.current_entry(path) is None
