"""comptrust.run: load a model, evaluate it dense and compressed, measure efficiency, write one report."""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from comptrust.checkpoint import save_compressed
from comptrust.compress import calibration_tokens, compress_, config_from_tag, is_calibrated
from comptrust.efficiency import measure_speed, measure_speeds_side_by_side
from comptrust.evals import DIMENSIONS, LanguageModel, perplexity
from comptrust.evals.cache import OutputCache
from comptrust.evals.perplexity import builtin_text, read_text_file
from comptrust.evals.registry import EvalContext
from comptrust.gguf_models import current_entry
from comptrust.lean_decode import unsupported_reason
from comptrust.memory import (available_memory_bytes, current_rss_bytes, peak_rss_bytes, release_memory, reset_peak_rss,
                              weight_bytes)
from comptrust.models import compressed_checkpoint_tag, load_model
from comptrust.report import write_report
from comptrust.serving_process import measure_serving_process

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
    # After every variant is evaluated, their decode runs again, interleaved round by round with every model in
    # memory at once (compressed ones reloaded from checkpoints written to a temporary folder), so bandwidth drift
    # does not land in the ratios between them (efficiency.measure_speeds_side_by_side); 0 turns that off.
    side_by_side_rounds: int = 5
    # Then each configuration's checkpoint is served alone, in a fresh process that imports torch and comptrust's
    # kernels but not transformers (comptrust.serving_process): the memory and decode speed of serving it there.
    serving_process: bool = True
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
        if self.side_by_side_rounds < 0:
            raise ValueError(f"side_by_side_rounds must be 0 (off) or more, got {self.side_by_side_rounds}")
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
    side_by_side = config.side_by_side_rounds > 0 and len(variants(config)) > 1
    needs_checkpoints = side_by_side or config.serving_process
    scratch = tempfile.TemporaryDirectory(prefix="comptrust-speed-") if needs_checkpoints else None
    sources = []  # where each row's model loads from again for the side-by-side speeds (None: it cannot)
    checkpoints = []  # each row's checkpoint directory for the serving process (None: it has none)
    prompt_ids = None  # the speed runs' prompt, the same for every configuration
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
            if prompt_ids is None:
                prompt_ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"][0, :config.prompt_tokens]
            row, samples = _evaluate_variant(loaded, variant, config, text, text_name, cache, reference, prompt_ids)
            row["seconds"] = {"load": load_seconds, **row["seconds"]}
            rows.append(row)
            all_samples += samples
            servable = config.serving_process and _servable(loaded.model, row)
            if scratch is not None:
                source, checkpoint = _reloadable(loaded, variant, Path(scratch.name) / str(len(rows)), servable)
                sources.append(source)
                checkpoints.append(checkpoint)
            del loaded
        if side_by_side:
            _side_by_side_speeds(rows, sources, config, prompt_ids)
        if config.serving_process:
            _serving_processes(rows, checkpoints, config, prompt_ids)
    finally:
        if cache is not None:
            cache.close()
        if scratch is not None:
            scratch.cleanup()
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
                      cache: OutputCache | None, reference: dict[str, list[dict]],
                      prompt_ids: torch.Tensor) -> tuple[dict, list[dict]]:
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


def _reloadable(loaded, variant: Variant, folder: Path, serving: bool) -> tuple[str | None, str | None]:
    """(where this variant's model loads from again, its checkpoint directory for the serving process). A model
    compressed here is written to `folder` for both; a dense one loads again from its own source, and is written
    there too when `serving` needs a directory and its source is a GGUF file or a hub id, unless the GGUF file's
    cache entry (gguf_models) already is that folder. None where the model has no checkpoint form (e.g. mixed
    int4 and 2:4 layers) or no room for one: the row stays out of that phase."""
    if variant.compression is None:
        if os.path.isdir(variant.model) or not serving:
            return variant.model, variant.model if os.path.isdir(variant.model) else None
        cached = current_entry(Path(loaded.source)) if loaded.source.endswith(".gguf") else None
        if cached is not None:  # what load_model read it from: a plain safetensors model, written once, not per run
            return variant.model, str(cached)
        try:
            save_compressed(loaded.model, loaded.tokenizer, folder)  # no compression: a plain safetensors model
        except (ValueError, OSError):
            return variant.model, None
        return variant.model, str(folder)
    try:
        save_compressed(loaded.model, loaded.tokenizer, folder, config_from_tag(variant.compression))
    except (ValueError, OSError):
        return None, None
    return str(folder), str(folder)


def _side_by_side_speeds(rows: list[dict], sources: list[str | None], config: RunConfig,
                         prompt_ids: torch.Tensor) -> None:
    """Every reloadable row's decode tokens/s again, all models in memory and their runs interleaved
    (efficiency.measure_speeds_side_by_side), into efficiency["side_by_side_decode_tokens_per_s"]; skipped,
    with the reason in efficiency["side_by_side_note"], where the models would take more than half the
    available memory."""
    chosen = [(row, source) for row, source in zip(rows, sources) if source is not None]
    needed = sum(row["efficiency"]["weight_bytes"] for row, _ in chosen)
    available = available_memory_bytes()
    if len(chosen) < 2 or (available is not None and 2 * needed > available):
        note = (f"not measured: the {len(chosen)} models' {needed / 2 ** 20:.0f} MiB of weights would take more than "
                f"half the {available / 2 ** 20:.0f} MiB available" if len(chosen) >= 2 else
                "not measured: fewer than two models load again (no checkpoint form)")
        for row in rows:
            row["efficiency"]["side_by_side_note"] = note
        return
    release_memory()
    clock = time.perf_counter()
    try:
        loaded = [load_model(source, online=config.online) for _, source in chosen]
        rates = measure_speeds_side_by_side([each.model for each in loaded], prompt_ids, config.decode_tokens,
                                            config.side_by_side_rounds)
    except (OSError, RuntimeError) as exc:  # ModelLoadError among them; the evaluations stand without this phase
        for row in rows:
            row["efficiency"]["side_by_side_note"] = f"not measured: {exc}"
        return
    seconds = time.perf_counter() - clock  # the whole phase (loading included), shared by every row in it
    for (row, _), rate in zip(chosen, rates):
        row["efficiency"].update(side_by_side_decode_tokens_per_s=rate, side_by_side_rounds=config.side_by_side_rounds,
                                 side_by_side_phase_seconds=seconds)
    del loaded
    release_memory()


def _servable(model, row: dict) -> bool:
    """Whether the serving process can run this model (the lean runtime's Llama family); if not, the row's
    efficiency["serving_note"] says why (and no checkpoint is written for it)."""
    reason = unsupported_reason(model)
    if reason is not None:
        row["efficiency"]["serving_note"] = f"not measured: the lean runtime cannot run this model ({reason})"
    return reason is None


def _serving_processes(rows: list[dict], checkpoints: list[str | None], config: RunConfig,
                       prompt_ids: torch.Tensor) -> None:
    """Each row's checkpoint served alone in a fresh process (comptrust.serving_process) into
    efficiency["serving"], or the reason it was not into efficiency["serving_note"]; the rest of the row stands."""
    for row, checkpoint in zip(rows, checkpoints):
        efficiency = row["efficiency"]
        if "serving_note" in efficiency:  # _servable said why not
            continue
        if checkpoint is None:
            efficiency["serving_note"] = "not measured: no checkpoint form to serve"
            continue
        try:
            result = measure_serving_process(checkpoint, prompt_ids.tolist(), config.decode_tokens,
                                             config.speed_repeats)
        except RuntimeError as exc:
            efficiency["serving_note"] = f"not measured: {exc}"
            continue
        del result["checkpoint"], result["greedy_tokens"]  # a temporary folder gone after the run; token ids
        efficiency["serving"] = result


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
