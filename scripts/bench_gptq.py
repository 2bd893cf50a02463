"""GPTQ and SparseGPT on one layer: comptrust (C++ column loop + BLAS block updates) against the
straightforward pure-torch reference algorithm (tests/gptq_oracle.py), timed side by side on the same
weights and Hessian. Prints the time ratio, how many codes / mask entries agree, and the loss ratio.

    .venv/bin/python scripts/bench_gptq.py [--shapes 576x576,1536x576,576x1536,4096x4096] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import gptq_oracle as oracle  # noqa: E402

from comptrust.compress.hessian import HessianAccumulator, QuantGrid, error_feedback  # noqa: E402


def _median_seconds(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="576x576,1536x576,576x1536,4096x4096", help="out x in, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats}")
    print(f"{'layer (out x in)':<18} {'method':<14} {'reference s':>11} {'ours s':>8} {'speed-up':>8} "
          f"{'agree':>7} {'loss ratio':>10}")
    for shape in args.shapes.split(","):
        n, k = (int(side) for side in shape.split("x"))
        acc = HessianAccumulator(k)
        acc.add_batch(oracle.correlated_inputs(2048, k))
        weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
        cases = {
            "gptq w4g128": (lambda: oracle.gptq(weight, acc.hessian, 4, 128),
                            lambda: error_feedback(weight, acc.hessian, QuantGrid(4, 128)),
                            lambda ref, ours: (ref[0] == ours.weight, ref[1], ours.loss)),
            "sparsegpt 2:4": (lambda: oracle.sparsegpt(weight, acc.hessian, 0.0, 2, 4),
                              lambda: error_feedback(weight, acc.hessian, None, prune_n=2, prune_m=4),
                              lambda ref, ours: (ref[1] == ours.mask, ref[2], ours.loss)),
        }
        for name, (reference, ours, compare) in cases.items():
            ref_s, ref_result = _median_seconds(reference, args.repeats)
            our_s, our_result = _median_seconds(ours, args.repeats)
            agree, ref_loss, our_loss = compare(ref_result, our_result)
            print(f"{shape:<18} {name:<14} {ref_s:>11.3f} {our_s:>8.3f} {ref_s / our_s:>7.2f}x "
                  f"{float(agree.float().mean()):>7.2%} {our_loss / ref_loss:>10.5f}", flush=True)


if __name__ == "__main__":
    main()
