import pytest
import torch
import torch.nn as nn

from comptrust import _C
from comptrust.efficiency import (current_rss_bytes, measure_speed, peak_rss_bytes, release_memory,
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
