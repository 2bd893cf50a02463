"""Measured decode speed of a model as it runs here (memory: comptrust.memory)."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache

from comptrust.lean_decode import LeanDecoder, unsupported_reason
from comptrust.models import cache_keyword

RUNTIMES = ("auto", "lean", "hf")


@dataclass
class SpeedResult:
    prompt_tokens: int
    prefill_ms: float          # median time of one forward pass over the prompt
    decode_tokens: int
    decode_tokens_per_s: float  # greedy steps with the KV cache, after the prefill
    threads: int
    runtime: str               # "lean" (comptrust.lean_decode) or "hf" (transformers' forward with its cache)
    runtime_note: str | None = None  # why "auto" fell back to transformers
    greedy_head: str | None = None   # lean: "screened" (LeanDecoder.greedy_head) or "full"; None for "hf"

    def as_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def measure_speed(model: torch.nn.Module, prompt_ids: torch.Tensor, decode_tokens: int = 32,
                  repeats: int = 3, runtime: str = "auto") -> SpeedResult:
    """Prefill latency and decode throughput at batch 1, median over `repeats` after one warm-up.

    runtime "lean" decodes with comptrust.lean_decode (the model's own modules and kernels without
    transformers' per-layer machinery), "hf" with the model's forward and a DynamicCache, "auto" with lean
    where it computes the model exactly and transformers otherwise (the reason in `runtime_note`).
    """
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids.unsqueeze(0)
    step, runtime, note, greedy_head = _speed_steps(model, prompt_ids.shape[1] + decode_tokens, runtime)
    prefill_times, decode_rates = [], []
    for attempt in range(repeats + 1):
        prefill, decode = step(prompt_ids, decode_tokens)
        if attempt > 0:  # the first pass warms caches and lazy initialisation
            prefill_times.append(prefill)
            decode_rates.append(decode_tokens / decode)
    return SpeedResult(prompt_ids.shape[1], 1e3 * statistics.median(prefill_times), decode_tokens,
                       statistics.median(decode_rates), torch.get_num_threads(), runtime,
                       None if runtime == "lean" else note, greedy_head)


def _speed_steps(model: torch.nn.Module, positions: int, runtime: str):
    """(step, runtime, runtime_note, greedy_head) for measure_speed's `runtime`; step(prompt, n) -> (prefill
    seconds, seconds for n greedy steps), over at most `positions` positions."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    note = unsupported_reason(model)
    if runtime == "lean" and note is not None:
        raise ValueError(f"the lean runtime cannot run this model: {note}")
    if runtime == "hf" or note is not None:
        return _hf_steps(model), "hf", note, None
    decoder = LeanDecoder(model, positions)
    return decoder.steps, "lean", None, decoder.greedy_head


@torch.inference_mode()
def measure_speeds_side_by_side(models: list[torch.nn.Module], prompt_ids: torch.Tensor, decode_tokens: int = 32,
                                rounds: int = 5) -> list[float]:
    """Decode tokens/s of several models at batch 1 (each on the runtime measure_speed's "auto" picks), their
    greedy runs interleaved: one run of each model per round, `rounds` rounds after a warm-up one, the median of
    each model's. This machine's memory bandwidth drifts over seconds to minutes, and measured one model after
    another the drift lands in the ratios between them (one `make run`: int4/dense 3.4x timed in turn, 3.8x
    interleaved; another day 4.6x in turn against 3.9x); interleaved, a slow stretch falls on every model alike."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids.unsqueeze(0)
    steps = [_speed_steps(model, prompt_ids.shape[1] + decode_tokens, "auto")[0] for model in models]
    rates = [[] for _ in models]
    for round_index in range(rounds + 1):
        for step, model_rates in zip(steps, rates):
            _, decode = step(prompt_ids, decode_tokens)
            if round_index > 0:  # the first round warms caches and lazy initialisation
                model_rates.append(decode_tokens / decode)
    return [statistics.median(model_rates) for model_rates in rates]


def _hf_steps(model: torch.nn.Module):
    """(prompt, n) -> (prefill seconds, seconds for n greedy steps) through the model's own forward."""
    def run(prompt_ids: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
        cache = {cache_keyword(model): DynamicCache(config=model.config)}  # filled in place by each call
        start = time.perf_counter()
        # logits_to_keep=1: only the last position's logits, as generate() computes them (the full [128, vocab]
        # logits would add a vocabulary-sized product per prompt token and 25 MB to the decode-run peak RSS).
        token = model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1, **cache).logits[:, -1:].argmax(-1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(decode_tokens):
            token = model(input_ids=token, use_cache=True, **cache).logits[:, -1:].argmax(-1)
        return prefill, time.perf_counter() - start
    return run
