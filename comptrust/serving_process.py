"""What a checkpoint takes to serve: memory and decode speed in a process that does nothing else.

`python -m comptrust.serving_process DIR --prompt-ids 1,2,3 [--decode-tokens 32] [--repeats 3]` starts from a
fresh interpreter that imports torch and comptrust's kernels only (never transformers: checked and reported),
loads the checkpoint onto its kernels without transformers (comptrust.lean_model), decodes greedily with
LeanDecoder and prints one JSON object. `measure_serving_process` runs it from another process; `comptrust run`
does so for every configuration (the report's "serving" columns).

Why another process: the run's own process holds transformers, the evaluators and the tokenizer (~570 MiB of RSS
before any model is loaded), which buries what a model itself needs: the int4 embedded model adds ~190 MiB to that,
the dense one ~510. Here the floor is torch's (~225 MiB, `baseline_rss_bytes`).

The JSON: baseline_rss_bytes (after the imports), load_peak_rss_bytes (high-water mark while loading and building
the decoder, which reads the whole fp32 embedding once for its int8 screen of the tied head, handing the pages back
piece by piece: ScreenedArgmax's release_read_pages), decode_peak_rss_bytes
(high-water mark over the decode runs, reset after loading; None where the OS cannot reset it),
checkpoint_pages_released_bytes (the checkpoint file's pages then handed back, comptrust.memory.release_mapped_file:
the packed tensors the layers were built from, and the embedding, of which decoding reads a row per token and the
few rows the screen leaves), weight_bytes, load_seconds,
decode_tokens_per_s (median of `repeats` runs after a warm-up one), greedy_head, program (whether the layer
stack runs as one DecodeProgram call), cpu_kernels (comptrust's C++ ops built), threads, transformers_imported,
greedy_tokens (the `decode_tokens` tokens chosen after the prompt, decoded again after the measurements).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from comptrust import ops
from comptrust.lean_decode import LeanDecoder
from comptrust.lean_model import load_lean_model
from comptrust.memory import (current_rss_bytes, peak_rss_bytes, release_mapped_file, release_memory, reset_peak_rss,
                              weight_bytes)


def serve_and_measure(path: str, prompt_ids: list[int], decode_tokens: int = 32, repeats: int = 3) -> dict:
    """In this process: load `path` and decode; the measurements the module docstring lists."""
    if not prompt_ids or decode_tokens < 1 or repeats < 1:
        raise ValueError(f"need prompt ids, decode_tokens >= 1 and repeats >= 1 (got {len(prompt_ids)} ids, "
                         f"{decode_tokens}, {repeats})")
    baseline = current_rss_bytes()
    reset_peak_rss()
    clock = time.perf_counter()
    model = load_lean_model(path)
    vocab = model.config.vocab_size
    if not all(0 <= token < vocab for token in prompt_ids):
        raise ValueError(f"prompt ids must lie in [0, {vocab}): the model's vocabulary")
    decoder = LeanDecoder(model, len(prompt_ids) + decode_tokens)
    load_seconds = time.perf_counter() - clock
    released = release_mapped_file(model.model.embed_tokens.weight)
    load_peak = peak_rss_bytes()
    release_memory()
    resettable = reset_peak_rss()
    prompt = torch.tensor([prompt_ids])
    rates = []
    for attempt in range(repeats + 1):
        _, seconds = decoder.steps(prompt, decode_tokens)
        if attempt > 0:  # the first run warms caches and lazy initialisation
            rates.append(decode_tokens / seconds)
    decode_peak = peak_rss_bytes() if resettable else None
    tokens = decoder.greedy_tokens(prompt, decode_tokens)  # what the timed runs chose, for callers to check
    return {"checkpoint": os.path.abspath(path), "baseline_rss_bytes": baseline, "load_peak_rss_bytes": load_peak,
            "decode_peak_rss_bytes": decode_peak, "greedy_tokens": tokens,
            "checkpoint_pages_released_bytes": released, "weight_bytes": weight_bytes(model),
            "load_seconds": load_seconds,
            "decode_tokens_per_s": statistics.median(rates), "decode_tokens": decode_tokens, "repeats": repeats,
            "prompt_tokens": len(prompt_ids), "greedy_head": decoder.greedy_head,
            "program": decoder.program is not None, "cpu_kernels": ops.cpu_kernels_available(),
            "threads": torch.get_num_threads(),
            "transformers_imported": "transformers" in sys.modules}


def measure_serving_process(path: str, prompt_ids: list[int], decode_tokens: int = 32, repeats: int = 3,
                            timeout: float = 600.0) -> dict:
    """serve_and_measure in a fresh Python process; RuntimeError with its last stderr lines if it fails."""
    # `python -m` puts the working directory first on sys.path: run where this comptrust was imported from, so the
    # child imports the same package (from a source checkout's root it would find the sources without their
    # compiled kernels, and time the fallbacks).
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "comptrust.serving_process", os.path.abspath(path),
               "--prompt-ids", ",".join(str(int(t)) for t in prompt_ids),
               "--decode-tokens", str(decode_tokens), "--repeats", str(repeats)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=package_root)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the serving process for {path} ran past {timeout:.0f} s") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"the serving process for {path} failed (exit {done.returncode}): {tail}")
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comptrust.serving_process", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a Llama checkpoint directory (dense, pruned, GPTQ/AWQ or comptrust 2:4)")
    parser.add_argument("--prompt-ids", required=True, help="the prompt's token ids, comma-separated")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        prompt_ids = [int(part) for part in args.prompt_ids.split(",")]
    except ValueError:
        parser.error(f"--prompt-ids: expected comma-separated integers, got {args.prompt_ids!r}")
    try:
        result = serve_and_measure(args.checkpoint, prompt_ids, args.decode_tokens, args.repeats)
    except (OSError, RuntimeError, ValueError) as exc:  # ModelNotFoundError / ModelLoadError among them
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
