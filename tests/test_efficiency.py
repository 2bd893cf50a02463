import copy

import pytest
import torch
import torch.nn as nn

from comptrust import _C, compress_, efficiency
from comptrust.compress import config_from_tag
from comptrust.efficiency import measure_speed
from comptrust.memory import (MappedPages, current_rss_bytes, peak_rss_bytes, release_mapped_file, release_memory,
                              reset_peak_rss, weight_bytes)


def test_weight_bytes_counts_tied_weights_once():
    model = nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 100, bias=False))
    model[1].weight = model[0].weight
    assert weight_bytes(model) == 100 * 16 * 4
    model.register_buffer("extra", torch.zeros(10, dtype=torch.int32))
    assert weight_bytes(model) == 100 * 16 * 4 + 40


def test_peak_rss_reset_follows_allocations():
    if not reset_peak_rss():
        pytest.skip("this OS cannot reset the peak RSS")
    big = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
    peak_with = peak_rss_bytes()
    del big
    release_memory()
    assert reset_peak_rss()
    assert peak_rss_bytes() < peak_with - 32 * 1024 * 1024
    assert current_rss_bytes() <= peak_rss_bytes()


def _mapped(tmp_path, values: torch.Tensor) -> torch.Tensor:
    """`values` read back from a safetensors file, as checkpoints are: a view of the file's private mapping."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file({"small": torch.ones(3), "table": values}, str(tmp_path / "t.safetensors"))
    return safe_open(str(tmp_path / "t.safetensors"), framework="pt").get_tensor("table")


def test_release_mapped_file_hands_back_pages_and_keeps_the_values(tmp_path):
    values = torch.randn(4096, 1024)  # 16 MiB
    table = _mapped(tmp_path, values)
    assert torch.equal(table, values)  # every page read: in this process's RSS
    before = current_rss_bytes()
    released = release_mapped_file(table)
    assert released >= values.numel() * 4
    if before is not None:
        assert current_rss_bytes() < before - 8 * 1024 * 1024
    assert torch.equal(table, values)  # read again from the page cache
    assert release_mapped_file(values) == 0  # anonymous memory: nothing to hand back
    assert release_mapped_file(torch.empty(0)) == 0


def test_release_mapped_file_leaves_a_written_mapping_alone(tmp_path):
    values = torch.randn(4096, 256)
    table = _mapped(tmp_path, values)
    table[7, 3] = 1234.5  # the process's own copy of that page now: dropping it would lose the write
    assert release_mapped_file(table) == 0
    assert float(table[7, 3]) == 1234.5 and torch.equal(table[8:], values[8:])


def test_mapped_pages_released_tensor_by_tensor(tmp_path):
    values = torch.randn(4096, 1024)  # 16 MiB
    table = _mapped(tmp_path, values)
    small = table[:1]  # one row: no whole page of its own to release
    assert torch.equal(table, values)
    before = current_rss_bytes()
    pages = MappedPages()
    assert pages.release(small) == 0
    released = pages.release(table)
    assert released >= values.numel() * 4 - 2 * 4096 and pages.released == released
    if before is not None:
        assert current_rss_bytes() < before - 8 * 1024 * 1024
    assert torch.equal(table, values)  # read again from the page cache
    anonymous = MappedPages()
    assert anonymous.release(values) == 0 and anonymous.release(table) == 0  # gave up: a load has one source
    (tmp_path / "w").mkdir()
    written = _mapped(tmp_path / "w", values)
    written[0, 0] = 7.0  # that page is the process's own copy now
    assert MappedPages().release(written) == 0 and float(written[0, 0]) == 7.0


def _mappings_of(path) -> list[str]:
    return [line for line in open("/proc/self/maps") if line.rstrip().endswith(str(path))]


def test_a_loaded_safetensors_model_holds_no_file_mapping(tmp_path, tiny_llama, smollm2_tokenizer):
    """A model read from safetensors has memory of its own, as a GGUF read gives: a view of the file's mapping would
    keep the mapping, and every page ever read of it, in RSS as long as any tensor (say the embedding) lives."""
    from comptrust.memory import copy_into_process_memory
    from comptrust.models import load_model

    tiny_llama.save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    loaded = load_model(str(tmp_path))
    assert not _mappings_of(weights)
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()
    for name, tensor in tiny_llama.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    mapped = nn.Module()  # what transformers hands over before the copy
    mapped.table = nn.Parameter(_mapped(tmp_path, torch.randn(256, 64)), requires_grad=False)
    mapped.register_buffer("same", mapped.table)
    expected = mapped.table.clone()
    assert _mappings_of(tmp_path / "t.safetensors")
    copy_into_process_memory(mapped)
    assert not _mappings_of(tmp_path / "t.safetensors") and torch.equal(mapped.table, expected)


def test_replacing_layers_hands_back_the_heap_their_conversion_freed():
    """Converting layer after layer keeps only what the new layers hold: glibc would otherwise keep the freed
    temporaries' pages between the layers' results (here 37-53 MB of RSS came back of the 113 freed)."""
    from comptrust.nn import BitmapSparseLinear, replace_linears

    if current_rss_bytes() is None:
        pytest.skip("this OS does not report RSS")
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1536, bias=False) for _ in range(40)])
    with torch.no_grad():
        for layer in model:
            layer.weight.mul_(torch.rand_like(layer.weight) < 0.5)
    dense = 40 * 1024 * 1536 * 4
    release_memory()
    before = current_rss_bytes()
    replace_linears(model, lambda name, linear: BitmapSparseLinear.from_linear(linear), skip=(), progress=False)
    growth = current_rss_bytes() - before
    kept = sum(m.values.numel() * 4 + m.mask.numel() * 2 + m.row_start.numel() * 8 for m in model)
    assert growth < kept - dense + kept // 4  # measured: kept - dense + 10 MB


def test_measure_speed_on_tiny_model(tiny_llama):
    result = measure_speed(tiny_llama, torch.randint(0, 1000, (20,)), decode_tokens=4, repeats=2)
    assert result.prompt_tokens == 20 and result.decode_tokens == 4
    assert result.prefill_ms > 0 and result.decode_tokens_per_s > 0
    assert result.threads == torch.get_num_threads()
    assert result.runtime == "lean" and result.runtime_note is None  # a Llama: the lean runtime runs it
    assert result.greedy_head == ("screened" if _C.cpu_avx512_vnni() else "full")  # test_screened_argmax.py


def test_measure_speed_through_transformers_on_request(tiny_llama):
    result = measure_speed(tiny_llama, torch.randint(0, 1000, (12,)), decode_tokens=3, repeats=1, runtime="hf")
    assert result.runtime == "hf" and result.decode_tokens_per_s > 0 and result.greedy_head is None
    with pytest.raises(ValueError, match="runtime must be one of"):
        measure_speed(tiny_llama, torch.randint(0, 1000, (12,)), runtime="fast")


def test_side_by_side_speeds_interleave_the_models_runs(tiny_llama, monkeypatch):
    """One run of each model per round, a warm-up round first, then each model's median over the rounds: a slow
    stretch (here round 2) falls on every model alike, so the ratio stays the true one."""
    calls = []
    seconds = {"a": [9.0, 1.0, 5.0, 1.0], "b": [9.0, 2.0, 10.0, 2.0]}  # per round; round 0 is the warm-up

    def fake_steps(model, positions, runtime):
        def step(prompt_ids, decode_tokens):
            calls.append(model)
            return 0.0, seconds[model][sum(1 for c in calls if c == model) - 1]
        return step, "lean", None, None

    monkeypatch.setattr(efficiency, "_speed_steps", fake_steps)
    rates = efficiency.measure_speeds_side_by_side(["a", "b"], torch.zeros(4, dtype=torch.long), decode_tokens=10,
                                                   rounds=3)
    assert calls == ["a", "b"] * 4
    assert rates == [10.0, 5.0]  # medians of 10/1, 10/5, 10/1 and of 10/2, 10/10, 10/2: the ratio 2.0
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        efficiency.measure_speeds_side_by_side(["a"], torch.zeros(4, dtype=torch.long), rounds=0)


def test_side_by_side_speeds_of_real_models(tiny_llama):
    int4 = copy.deepcopy(tiny_llama)
    compress_(int4, config_from_tag("rtn-w4g128"), progress=False)
    rates = efficiency.measure_speeds_side_by_side([tiny_llama, int4], torch.randint(0, 1000, (12,)), decode_tokens=4,
                                                   rounds=2)
    assert len(rates) == 2 and all(rate > 0 for rate in rates)


def _thp_mode() -> str | None:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


@pytest.mark.parametrize("setting", [None, "0"])
def test_importing_comptrust_puts_large_tensors_on_huge_pages_unless_told_not_to(setting):
    """After `import comptrust` (in a fresh interpreter: torch reads its switch once) a 16 MB tensor lies on huge
    pages; an explicit THP_MEM_ALLOC_ENABLE=0 is left as the user set it."""
    import os
    import subprocess
    import sys

    if _thp_mode() not in ("madvise", "always"):
        pytest.skip("this kernel gives no transparent huge pages")
    env = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    script = ("import os, comptrust, torch; t = torch.ones(1 << 22)\n"
              "huge = [l for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages:')][0].split()[1]\n"
              "print(os.environ['THP_MEM_ALLOC_ENABLE'], huge)")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(__file__))  # tests/: imports the installed package
    assert done.returncode == 0, done.stderr
    switch, huge_kib = done.stdout.split()
    if setting is None:
        assert switch == "1" and int(huge_kib) >= 8 * 1024  # at least 8 MB of the 16 on 2 MB pages
    elif _thp_mode() == "madvise":
        assert switch == "0" and int(huge_kib) == 0
