"""int4 GEMM/GEMV benchmark: comptrust's CPU kernel against anchors timed in the same run.

    python bench/int4_gemm.py [--quick] [--json FILE]

Anchors on the same shapes: F.linear fp32 and bf16 on the dense weight, and torch's own int4 CPU op
(_weight_int4pack_mm_for_cpu, bf16 activations). Reports the median time, effective GB/s of the bytes each
kernel must read (weights + activations), its share of the machine's measured read bandwidth (a
STREAM-like sum over a 512 MiB buffer), and ratios. Timings are noisy: compare rows of one run only.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import comptrust
from comptrust import ops
from comptrust.formats import dequantize_int4, pack_int4

# (n, k) = (out, in): SmolLM2-135M layers and Llama-7B's
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096), (4096, 11008)]
QUICK_SHAPES = [(576, 1536), (4096, 4096)]
BATCHES, QUICK_BATCHES = (1, 4, 16, 64), (1, 32)
GROUP = 128


def median_ms(fn, min_time: float = 0.2, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def read_bandwidth_gbs(mib: int = 512) -> float:
    buffer = torch.ones(mib * 1024 * 1024 // 4)
    return buffer.numel() * 4 / median_ms(lambda: buffer.sum(), min_time=0.5) / 1e6


def bench_shape(n: int, k: int, batches, bandwidth: float) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (n, k), generator=g)
    packed = pack_int4(codes, torch.randint(1, 17, (n, k // GROUP), generator=g),
                       torch.rand(n, k // GROUP, generator=g) * 0.01, GROUP)
    w32 = dequantize_int4(packed)
    w16 = w32.to(torch.bfloat16)
    tinygemm_w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    tinygemm_sz = torch.stack([packed.scales.float(), torch.zeros(k // GROUP, n)], -1).to(torch.bfloat16)
    int4_bytes = packed.qweight.numel() * 4 + packed.scales.numel() * 2 + packed.qzeros.numel() * 4
    rows = []
    for m in batches:
        x32 = torch.randn(m, k, generator=g)
        x16 = x32.to(torch.bfloat16)
        kernels = {
            "comptrust_int4_fp32": (lambda: ops.int4_gemm(x32, packed.qweight, packed.qzeros, packed.scales, GROUP),
                                    int4_bytes + x32.numel() * 4),
            "comptrust_int4_bf16": (lambda: ops.int4_gemm(x16, packed.qweight, packed.qzeros, packed.scales, GROUP),
                                    int4_bytes + x16.numel() * 2),
            "torch_fp32": (lambda: F.linear(x32, w32), w32.numel() * 4 + x32.numel() * 4),
            "torch_bf16": (lambda: F.linear(x16, w16), w16.numel() * 2 + x16.numel() * 2),
            "torch_int4pack": (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x16, tinygemm_w, GROUP, tinygemm_sz),
                               tinygemm_w.numel() + tinygemm_sz.numel() * 2 + x16.numel() * 2),
        }
        times = {name: median_ms(fn) for name, (fn, _) in kernels.items()}
        for name, (_, nbytes) in kernels.items():
            gbs = nbytes / times[name] / 1e6
            rows.append({"kernel": name, "n": n, "k": k, "batch": m, "group_size": GROUP, "ms": times[name],
                         "gb_per_s": gbs, "pct_of_read_bandwidth": 100 * gbs / bandwidth,
                         "speedup_vs_torch_fp32": times["torch_fp32"] / times[name],
                         "speedup_vs_torch_bf16": times["torch_bf16"] / times[name],
                         "speedup_vs_torch_int4pack": times["torch_int4pack"] / times[name]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two shapes, batch 1 and 32")
    parser.add_argument("--json", help="write rows and machine info here")
    args = parser.parse_args()
    bandwidth = read_bandwidth_gbs()
    shapes, batches = (QUICK_SHAPES, QUICK_BATCHES) if args.quick else (SHAPES, BATCHES)
    print(f"read bandwidth {bandwidth:.1f} GB/s; {torch.get_num_threads()} threads; "
          f"{ops.backends()['cpu']['detail']}")
    print(f"{'kernel':<22}{'n':>7}{'k':>7}{'batch':>6}{'ms':>10}{'GB/s':>8}{'%bw':>6}{'vs fp32':>9}{'vs bf16':>9}{'vs int4pack':>12}")
    rows = []
    for n, k in shapes:
        for row in bench_shape(n, k, batches, bandwidth):
            rows.append(row)
            print(f"{row['kernel']:<22}{n:>7}{k:>7}{row['batch']:>6}{row['ms']:>10.3f}{row['gb_per_s']:>8.1f}"
                  f"{row['pct_of_read_bandwidth']:>6.0f}{row['speedup_vs_torch_fp32']:>9.2f}"
                  f"{row['speedup_vs_torch_bf16']:>9.2f}{row['speedup_vs_torch_int4pack']:>12.2f}")
    if args.json:
        info = {"machine": platform.machine(), "processor": platform.processor(), "threads": torch.get_num_threads(),
                "torch": torch.__version__, "comptrust": comptrust.__version__, "read_bandwidth_gb_per_s": bandwidth}
        with open(args.json, "w") as handle:
            json.dump({"machine": info, "rows": rows}, handle, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
