"""Perplexity on a text: the built-in sample (written by us, shipped in the package) or any local file
(e.g. WikiText-2's wiki.test.raw)."""
from __future__ import annotations

import math
from importlib.resources import files
from pathlib import Path

import torch
from tqdm.auto import tqdm

from comptrust.evals.schema import MetricResult

BUILTIN_TEXT = "perplexity_sample.txt"


def builtin_text() -> str:
    return files("comptrust.evals").joinpath("data", BUILTIN_TEXT).read_text(encoding="utf-8")


@torch.inference_mode()
def perplexity(model, tokenizer, text: str | None = None, text_name: str = "builtin-sample",
               seq_len: int = 256, max_tokens: int | None = None, progress: bool = True) -> MetricResult:
    """exp(mean NLL) over non-overlapping windows of seq_len tokens (each window starts fresh, so every
    model sees exactly the same contexts)."""
    text = builtin_text() if text is None else text
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"perplexity: text {text_name!r} has fewer than 2 tokens")
    windows = [ids[start:start + seq_len] for start in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) > 1]
    total_nll, total_tokens = 0.0, 0
    for window in tqdm(windows, desc="perplexity", disable=not progress, leave=False):
        logits = model(input_ids=window.unsqueeze(0)).logits[0, :-1].float()
        total_nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        total_tokens += len(window) - 1
    return MetricResult(
        dimension="perplexity", task=text_name, metric="perplexity", score=math.exp(total_nll / total_tokens),
        n=total_tokens, scorer="token log-likelihood", higher_is_better=False,
        details={"seq_len": seq_len, "windows": len(windows)})


def read_text_file(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"perplexity text file {str(path)!r} does not exist")
    return path.read_text(encoding="utf-8")
