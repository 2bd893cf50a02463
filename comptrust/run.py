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
from comptrust.evals.registry import EvalContext
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
    # Trust evaluation (comptrust.evals.registry.EvalContext): suite size and the official data.
    suite: str = "quick"
    data_dir: str | None = None        # the DecodingTrust data/ folder; None: the built-in probe sets
    advglue_file: str | None = None    # AdvGLUE dev.json (or AdvGLUE++)
    reading: str | None = None         # "loglikelihood" | "generation" where a dimension does both (stereotype)
    toxicity_scorer: str | None = None  # see EvalContext
    # Compressed checkpoints of `model` (from `comptrust compress`, or GPTQ/AWQ folders) evaluated after it,
    # so their answers are compared with the dense model's.
    checkpoints: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = [d for d in self.dimensions if d not in DIMENSIONS]
        if unknown:
            raise ValueError(f"unknown dimensions {unknown}; known: {', '.join(DIMENSIONS)}")
        for tag in self.compressions:
            config_from_tag(tag)  # raises on a bad tag before any model is loaded
        self.eval_context()  # raises on a bad suite, data folder or AdvGLUE file
        for folder in self.checkpoints:
            if compressed_checkpoint_tag(folder, self.online) is None:
                raise ValueError(f"--compressed {folder}: not a compressed checkpoint (a folder written by "
                                 "`comptrust compress`, or a GPTQ/AWQ model folder)")

    def eval_context(self, reference: list[dict] | None = None) -> EvalContext:
        if self.advglue_file is not None and not Path(self.advglue_file).is_file():
            raise ValueError(f"--advglue {self.advglue_file}: no such file")
        return EvalContext(suite=self.suite, data_dir=self.data_dir, reference=reference, progress=self.progress,
                           seed=self.seed, advglue_file=self.advglue_file, reading=self.reading,
                           toxicity_scorer=self.toxicity_scorer)


@dataclass(frozen=True)
class Variant:
    """One row of the report: which model files to load and which compression to apply after loading."""
    name: str
    model: str
    compression: str | None = None

    @property
    def is_dense(self) -> bool:
        return self.name == "dense"


def variants(config: RunConfig) -> list[Variant]:
    """Dense, then each compression tag, then each compressed checkpoint. A pre-quantized `model` is
    evaluated once, as it is, in a row named after its quantization: there is no dense model to compare
    with, and compressing it again changes nothing."""
    precompressed = compressed_checkpoint_tag(config.model, config.online)
    if precompressed is not None:
        if config.checkpoints:
            raise ValueError(f"{config.model} is already compressed ({precompressed}); --compressed checkpoints "
                             "are compared with a dense --model")
        return [Variant(f"{precompressed} (checkpoint)", config.model)]
    return ([Variant("dense", config.model)] + [Variant(tag, config.model, tag) for tag in config.compressions]
            + [Variant(f"{compressed_checkpoint_tag(folder, config.online)} ({Path(folder).name})", folder)
               for folder in config.checkpoints])


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


def run(config: RunConfig | None = None) -> RunOutput:
    """Evaluate each variant of `config` (default: RunConfig()), dense first, one after another, in this process."""
    config = RunConfig() if config is None else config
    text_name = Path(config.ppl_file).name if config.ppl_file else "builtin-sample"
    text = read_text_file(config.ppl_file) if config.ppl_file else builtin_text()
    rows, all_samples, reference, model_info = [], [], {}, None
    cache = OutputCache(config.cache) if config.cache else None
    try:
        for variant in variants(config):
            release_memory()
            clock = time.perf_counter()
            loaded = load_model(variant.model, online=config.online)
            load_seconds = time.perf_counter() - clock
            if model_info is None:
                model_info = {"name": loaded.name, "source": loaded.source, "chat": loaded.chat,
                              "fingerprint": loaded.fingerprint, "architecture": _architecture(loaded.model),
                              "parameters": sum(p.numel() for p in loaded.model.parameters())}
            elif _architecture(loaded.model) != model_info["architecture"]:
                raise ValueError(f"{variant.model} is not a compressed {model_info['name']}: its architecture "
                                 f"{_architecture(loaded.model)} differs from {model_info['architecture']}, so "
                                 "its answers cannot be compared with the dense model's")
            row, samples = _evaluate_variant(loaded, variant, config, text, text_name, cache, reference)
            row["seconds"] = {"load": load_seconds, **row["seconds"]}
            rows.append(row)
            all_samples += samples
            del loaded
    finally:
        if cache is not None:
            cache.close()
    # The process with no model left (interpreter, torch, transformers and the model code they imported, the
    # tokenizer): measured after the last model is freed, since loading the first one imports much of it.
    release_memory()
    baseline_rss = current_rss_bytes()
    for row in rows:
        row["efficiency"]["process_baseline_rss_bytes"] = baseline_rss
    settings = {k: v for k, v in asdict(config).items() if k != "progress"}
    if not variants(config)[0].is_dense:
        settings["compressions"] = []  # not applied to a pre-quantized checkpoint
    paths = write_report(Path(config.out_dir), model_info, rows, all_samples, settings)
    return RunOutput(paths, rows)


def _evaluate_variant(loaded, variant: Variant, config: RunConfig, text: str, text_name: str,
                      cache: OutputCache | None, reference: dict[str, list[dict]]) -> tuple[dict, list[dict]]:
    """Compress (when the variant says so), then perplexity, the trust dimensions and speed: one report row
    and its per-item samples. The dense variant's samples become `reference` for the rows after it."""
    seconds = {}
    summary = loaded.compression  # set for a pre-quantized checkpoint, None for a dense model
    if variant.compression is not None:
        clock = time.perf_counter()
        compression = config_from_tag(variant.compression)
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
                       fingerprint=_outputs_fingerprint(loaded, variant, config))
    samples = []
    for dimension in config.dimensions:
        clock = time.perf_counter()
        result, items = DIMENSIONS[dimension].evaluate(lm, config.eval_context(reference.get(dimension)))
        results.append(result)
        seconds[dimension] = time.perf_counter() - clock
        if variant.is_dense:
            reference[dimension] = items
        samples += [{"config": variant.name, "dimension": dimension, **item} for item in items]

    # The evaluation's peak (batched long prompts) is read before the speed run resets it: the batch-1 speed
    # run has its own high-water mark, the memory it takes to serve the model.
    eval_peak = peak_rss_bytes()
    release_memory()
    decode_resettable = reset_peak_rss()
    clock = time.perf_counter()
    prompt_ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"][0, :config.prompt_tokens]
    speed = measure_speed(loaded.model, prompt_ids, config.decode_tokens, config.speed_repeats)
    decode_peak = peak_rss_bytes()
    # transformers' own forward too, side by side: the speed a user of generate() sees at batch 1
    hf_speed = speed if speed.runtime == "hf" else \
        measure_speed(loaded.model, prompt_ids, config.decode_tokens, config.speed_repeats, runtime="hf")
    seconds["speed"] = time.perf_counter() - clock
    efficiency = {"weight_bytes": weight_bytes(loaded.model),
                  "peak_rss_bytes": max(eval_peak or 0, decode_peak or 0) or None,
                  "decode_peak_rss_bytes": decode_peak if decode_resettable else None,
                  "rss_at_start_bytes": rss_start, "peak_rss_reset": peak_resettable, **speed.as_dict(),
                  "hf_prefill_ms": hf_speed.prefill_ms, "hf_decode_tokens_per_s": hf_speed.decode_tokens_per_s}
    row = {"name": variant.name, "compression": asdict(summary) if summary else None,
           "results": [r.as_dict() for r in results], "efficiency": efficiency,
           "sample": _sample_answer(loaded), "seconds": seconds}
    return row, samples


def _architecture(model) -> dict:
    """What a compressed checkpoint must share with its dense model for their answers to be comparable."""
    return {key: getattr(model.config, key, None)
            for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")}


def _outputs_fingerprint(loaded, variant: Variant, config: RunConfig) -> str:
    """What decides a configuration's answers: the weights' files, the compression applied after loading
    and, for calibrated methods, the calibration data. (A checkpoint's own files already say how it was
    compressed.)"""
    parts = [loaded.fingerprint, variant.name]
    if variant.compression is not None and is_calibrated(config_from_tag(variant.compression)):
        parts += [config.calib_source, str(config.calib_samples), str(config.calib_seqlen), str(config.seed)]
    return "|".join(parts)
