"""comptrust.run: load a model, evaluate it dense and compressed, measure efficiency, write one report."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from comptrust.compress import calibration_tokens, compress_, config_from_tag, is_calibrated
from comptrust.efficiency import (current_rss_bytes, measure_speed, peak_rss_bytes, release_memory,
                                  reset_peak_rss, weight_bytes)
from comptrust.evals import DIMENSIONS, LanguageModel, perplexity
from comptrust.evals.cache import OutputCache
from comptrust.evals.perplexity import builtin_text, read_text_file
from comptrust.models import compressed_checkpoint_tag, load_model
from comptrust.report import write_report

SAMPLE_QUESTION = "What is the capital of France, and what river runs through it?"


@dataclass(frozen=True)
class RunConfig:
    model: str = "default"
    compressions: tuple[str, ...] = ("rtn-w4g128", "mag-24")
    dimensions: tuple[str, ...] = ("machine_ethics",)
    out_dir: str = "comptrust-out"
    ppl_file: str | None = None        # default: the built-in sample
    ppl_max_tokens: int | None = None
    prompt_tokens: int = 128            # prefill length for the speed measurement
    decode_tokens: int = 32
    speed_repeats: int = 3
    online: bool = False
    progress: bool = True
    # Calibration data for gptq / sparsegpt / wanda tags (comptrust.compress.calibration_tokens).
    calib_source: str = "builtin"
    calib_samples: int = 128
    calib_seqlen: int = 512
    seed: int = 0
    cache: str | None = None  # SQLite file of model outputs (comptrust.evals.cache): re-runs reuse them

    def __post_init__(self):
        unknown = [d for d in self.dimensions if d not in DIMENSIONS]
        if unknown:
            raise ValueError(f"unknown dimensions {unknown}; known: {sorted(DIMENSIONS)}")
        for tag in self.compressions:
            config_from_tag(tag)  # raises on a bad tag before any model is loaded


@dataclass
class RunOutput:
    paths: dict
    rows: list[dict] = field(default_factory=list)


@torch.inference_mode()
def _sample_answer(loaded, max_new_tokens: int = 40) -> dict:
    lm = LanguageModel(loaded.model, loaded.tokenizer, loaded.chat)
    prompt = lm.prompt(SAMPLE_QUESTION)
    inputs = loaded.tokenizer(prompt, return_tensors="pt", add_special_tokens=not loaded.chat)
    output = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=loaded.tokenizer.pad_token_id)
    text = loaded.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return {"prompt": SAMPLE_QUESTION, "output": text.strip()}


def run(config: RunConfig = RunConfig()) -> RunOutput:
    """Evaluate the dense model and each compression in `config`, one after another, in this process.

    A pre-quantized checkpoint (GPTQ/AWQ) is evaluated once, as it is, in a row named after its
    quantization: there is no dense model to compare with, and compressing it again changes nothing.
    """
    text_name = Path(config.ppl_file).name if config.ppl_file else "builtin-sample"
    text = read_text_file(config.ppl_file) if config.ppl_file else builtin_text()
    rows, all_samples, reference = [], [], {}
    model_info = None
    cache = OutputCache(config.cache) if config.cache else None
    precompressed = compressed_checkpoint_tag(config.model, config.online)
    tags = ("dense",) + tuple(config.compressions) if precompressed is None else (f"{precompressed} (checkpoint)",)
    for tag in tags:
        release_memory()
        seconds, clock = {}, time.perf_counter()
        loaded = load_model(config.model, online=config.online)
        seconds["load"] = time.perf_counter() - clock
        model_info = model_info or {"name": loaded.name, "source": loaded.source, "chat": loaded.chat,
                                    "fingerprint": loaded.fingerprint,
                                    "parameters": sum(p.numel() for p in loaded.model.parameters())}
        summary = loaded.compression  # set for a pre-quantized checkpoint, None for a dense model
        if tag != tags[0]:
            clock = time.perf_counter()
            compression = config_from_tag(tag)
            calib = None
            if is_calibrated(compression):
                calib = calibration_tokens(loaded.tokenizer, config.calib_source, config.calib_samples,
                                           config.calib_seqlen, config.seed, config.online)
            summary = compress_(loaded.model, compression, calib, progress=config.progress)
            seconds["compress"] = time.perf_counter() - clock
        release_memory()
        peak_resettable = reset_peak_rss()
        rss_start = current_rss_bytes()

        clock = time.perf_counter()
        results = [perplexity(loaded.model, loaded.tokenizer, text, text_name, max_tokens=config.ppl_max_tokens,
                              progress=config.progress)]
        seconds["perplexity"] = time.perf_counter() - clock
        lm = LanguageModel(loaded.model, loaded.tokenizer, loaded.chat, cache=cache,
                           fingerprint=_outputs_fingerprint(loaded, tag, config))
        for dimension in config.dimensions:
            clock = time.perf_counter()
            result, samples = DIMENSIONS[dimension](lm, reference.get(dimension), config.progress)
            results.append(result)
            seconds[dimension] = time.perf_counter() - clock
            if tag == tags[0]:
                reference[dimension] = samples
            all_samples += [{"config": tag, "dimension": dimension, **s} for s in samples]

        clock = time.perf_counter()
        prompt_ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"][0, :config.prompt_tokens]
        speed = measure_speed(loaded.model, prompt_ids, config.decode_tokens, config.speed_repeats)
        seconds["speed"] = time.perf_counter() - clock
        efficiency = {"weight_bytes": weight_bytes(loaded.model), "peak_rss_bytes": peak_rss_bytes(),
                      "rss_at_start_bytes": rss_start, "peak_rss_reset": peak_resettable, **speed.as_dict()}
        rows.append({"name": tag, "compression": asdict(summary) if summary else None,
                     "results": [r.as_dict() for r in results], "efficiency": efficiency,
                     "sample": _sample_answer(loaded), "seconds": seconds})
        del loaded, lm
    settings = {k: v for k, v in asdict(config).items() if k != "progress"}
    if precompressed is not None:
        settings["compressions"] = []  # not applied to a pre-quantized checkpoint
    paths = write_report(Path(config.out_dir), model_info, rows, all_samples, settings)
    if cache is not None:
        cache.close()
    return RunOutput(paths, rows)


def _outputs_fingerprint(loaded, tag: str, config: RunConfig) -> str:
    """What decides a configuration's answers: the source weights, the compression and, for calibrated
    methods, the calibration data."""
    parts = [loaded.fingerprint, tag]
    if tag != "dense" and not tag.endswith("(checkpoint)") and is_calibrated(config_from_tag(tag)):
        parts += [config.calib_source, str(config.calib_samples), str(config.calib_seqlen), str(config.seed)]
    return "|".join(parts)
