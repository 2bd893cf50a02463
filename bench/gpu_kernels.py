"""GPU benchmark: comptrust's CUDA and Triton kernels against torch on one GPU, fp16 activations.

Usage: comptrust bench gpu [--quick] [--json FILE] [--shapes NxK,...] [--batches M,...]
(scripts/gpu_check.sh runs it after the GPU tests in a device session).

Per shape (Llama-7B's 4096x4096, 11008x4096, 4096x11008) and batch (1, 16, 64), in one run:
  anchors  torch_fp16 (F.linear on the dense fp16 weight) and torch_24_fp16 (torch's 2:4 semi-structured
           fp16 weight, where this torch and GPU run it);
  ours     CUDA (torch.ops.comptrust.*): int4 and int3 g128, 2:4 fp16 kept values, 2:4 + int4 g64;
           Triton (comptrust.kernels): the same four.
Every kernel's output is checked once against the fp32 product of the weight it stands for before it is timed
(a kernel that computes something else is reported as failed, not timed). Timing: CUDA events around a pass
over a ring of weight copies that together exceed the L2 (weights come from HBM, as in decoding), median
over rounds, the kernels interleaved round by round so that clock or thermal drift falls on all alike.
Each row: ms per call, bytes read (weights + x), GB/s and the ratio to torch_fp16 in the same run.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from comptrust import ops
from comptrust.compress.rtn import quantize_rtn
from comptrust.formats import dequantize_int3, dequantize_int4
from comptrust.formats.sparse24 import (dequantize_sparse24_int4, pack_sparse24, pack_sparse24_int4,
                                        prune_magnitude_24)

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
BATCHES = (1, 16, 64)
QUICK_SHAPES, QUICK_BATCHES = [(4096, 4096)], (1, 64)
GROUP, SPARSE_INT4_GROUP = 128, 64
ROUNDS = 7
MIN_RING_BYTES = 512 * 2**20  # weight copies per kernel: several times an H100/H200 L2 (50-60 MB)
CHECK_TOL = 2e-2  # fp16 output and fp16 weights against an fp32 product: ~1e-3 when right, ~1 when wrong


@dataclass
class GpuKernel:
    name: str
    role: str  # "anchor" or "ours"
    tensors: tuple[torch.Tensor, ...]  # the weight's device tensors
    call: Callable[..., torch.Tensor]  # call(x, *tensors)
    dense: torch.Tensor  # the fp32 [n, k] weight it stands for (the check's reference)
    weight_bytes: int = 0  # what one call reads of the weight; 0: the tensors' bytes
    copy: Callable[[], tuple[torch.Tensor, ...]] | None = None  # a fresh copy of the tensors; None: clones

    def __post_init__(self):
        self.weight_bytes = self.weight_bytes or sum(t.numel() * t.element_size() for t in self.tensors)
        if self.copy is None:
            self.copy = lambda: tuple(t.clone() for t in self.tensors)


def make_kernels(n: int, k: int, device: torch.device | str, seed: int = 0) -> tuple[list[GpuKernel], list[str]]:
    """The kernels of one shape on `device`, and a line per kernel this torch or GPU cannot run (why).

    Runs on CPU too (the CUDA ops' CPU kernels, Triton under TRITON_INTERPRET=1): the tests check the plumbing
    there."""
    from comptrust.kernels import int3_gemm as triton_int3
    from comptrust.kernels import int4_gemm as triton_int4
    from comptrust.kernels import sparse24_gemm as triton_sparse24

    device = torch.device(device)
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
    pruned = prune_magnitude_24(weight)
    int4, int3 = quantize_rtn(weight, 4, GROUP), quantize_rtn(weight, 3, GROUP)
    sparse, sparse_int4 = pack_sparse24(pruned.half()), pack_sparse24_int4(pruned, SPARSE_INT4_GROUP)

    def on(*tensors):
        return tuple(t.to(device) for t in tensors)

    int4_t = on(int4.qweight, int4.qzeros, int4.scales)
    int3_t = on(int3.qweight, int3.qzeros, int3.scales)
    sparse_t = on(sparse.values, sparse.meta)
    q = sparse_int4.qvalues
    sparse_int4_t = on(q.qweight, q.qzeros, q.scales, sparse_int4.meta)
    int4_dense, int3_dense = dequantize_int4(int4), dequantize_int3(int3)
    sparse_int4_dense = dequantize_sparse24_int4(sparse_int4)
    kernels = [
        GpuKernel("torch_fp16", "anchor", on(weight.half()), lambda x, w: F.linear(x, w), weight.half().float()),
        GpuKernel("cuda_int4", "ours", int4_t, lambda x, *t: torch.ops.comptrust.int4_gemm(x, *t, GROUP), int4_dense),
        GpuKernel("cuda_int3", "ours", int3_t, lambda x, *t: torch.ops.comptrust.int3_gemm(x, *t, GROUP), int3_dense),
        GpuKernel("cuda_24_fp16", "ours", sparse_t, lambda x, *t: torch.ops.comptrust.sparse24_gemm(x, *t),
                  pruned.half().float()),
        GpuKernel("cuda_24_int4", "ours", sparse_int4_t,
                  lambda x, *t: torch.ops.comptrust.sparse24_int4_gemm(x, *t, SPARSE_INT4_GROUP), sparse_int4_dense),
        GpuKernel("triton_int4", "ours", int4_t, lambda x, *t: triton_int4.int4_gemm(x, *t, GROUP), int4_dense),
        GpuKernel("triton_int3", "ours", int3_t, lambda x, *t: triton_int3.int3_gemm(x, *t, GROUP), int3_dense),
        GpuKernel("triton_24_fp16", "ours", sparse_t, lambda x, *t: triton_sparse24.sparse24_gemm(x, *t),
                  pruned.half().float()),
        GpuKernel("triton_24_int4", "ours", sparse_int4_t,
                  lambda x, *t: triton_sparse24.sparse24_int4_gemm(x, *t, SPARSE_INT4_GROUP), sparse_int4_dense),
    ]
    skipped = []
    if device.type == "cuda":
        pruned16 = pruned.half().to(device)
        try:
            semi = torch.sparse.to_sparse_semi_structured(pruned16)
            # Its kept fp16 values and 4 bits of positions per group of 4 (a tensor subclass: bytes by format).
            kernels.insert(1, GpuKernel("torch_24_fp16", "anchor", (semi,), lambda x, w: F.linear(x, w),
                                        pruned.half().float(), weight_bytes=n * k + n * k // 8,
                                        copy=lambda: (torch.sparse.to_sparse_semi_structured(pruned16),)))
        except (RuntimeError, ValueError, NotImplementedError) as err:  # torch or GPU without its 2:4 kernels
            skipped.append(f"torch_24_fp16: {_first_line(err)}")
    return kernels, skipped


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"


def check_kernel(kernel: GpuKernel, x: torch.Tensor) -> float:
    """Relative Frobenius error of kernel's y against x (fp32) @ dense^T."""
    y = kernel.call(x, *kernel.tensors).float().cpu()
    ref = x.float().cpu() @ kernel.dense.T
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def _ring(kernel: GpuKernel) -> list[tuple[torch.Tensor, ...]]:
    """Copies of the kernel's weight holding at least MIN_RING_BYTES together."""
    return [kernel.copy() for _ in range(max(1, -(-MIN_RING_BYTES // kernel.weight_bytes)))]


def _pass_ms(kernel: GpuKernel, x: torch.Tensor, ring) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for tensors in ring:
        kernel.call(x, *tensors)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / len(ring)


def run_gpu_bench(quick: bool, shapes: Sequence[tuple[int, int]] | None = None,
                  batches: Sequence[int] | None = None, progress: bool = True) -> dict:
    if not torch.cuda.is_available():
        raise RuntimeError("bench gpu needs a CUDA device; torch sees none "
                           f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
    if ops._cuda_reason() is not None:
        raise RuntimeError("bench gpu needs comptrust._C built with its CUDA ops (setup.py builds them where torch "
                           "has CUDA and a toolkit): " + ops._cuda_reason())
    start = time.perf_counter()
    shapes = list(shapes or (QUICK_SHAPES if quick else SHAPES))
    batches = list(batches or (QUICK_BATCHES if quick else BATCHES))
    rows, notes = [], []
    for n, k in shapes:
        t0 = time.perf_counter()
        kernels, skipped = make_kernels(n, k, "cuda")
        notes += [f"{n}x{k} {line}" for line in skipped]
        xs = {m: torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half().cuda() for m in batches}
        runs = []  # (kernel, batch) pairs that computed the right product; a warm-up call each (Triton compiles)
        for kernel in kernels:
            for m in batches:
                try:
                    err = check_kernel(kernel, xs[m])
                except (RuntimeError, ValueError, NotImplementedError) as exc:
                    notes.append(f"{n}x{k} batch {m} {kernel.name}: failed: {_first_line(exc)}")
                    continue
                if err < CHECK_TOL:
                    runs.append((kernel, m))
                else:
                    notes.append(f"{n}x{k} batch {m} {kernel.name}: output off the reference (rel err {err:.2e}): "
                                 "not timed")
        timed = {kernel.name: kernel for kernel, _ in runs}
        rings = {name: _ring(kernel) for name, kernel in timed.items()}
        times = {(kernel.name, m): [] for kernel, m in runs}
        torch.cuda.synchronize()
        for _ in range(ROUNDS):
            for kernel, m in runs:
                times[(kernel.name, m)].append(_pass_ms(kernel, xs[m], rings[kernel.name]))
        for m in batches:
            anchor = statistics.median(times[("torch_fp16", m)]) if ("torch_fp16", m) in times else None
            for kernel in (kernel for kernel, batch in runs if batch == m):
                ms = statistics.median(times[(kernel.name, m)])
                nbytes = kernel.weight_bytes + m * k * 2
                rows.append({"kernel": kernel.name, "role": kernel.role, "n": n, "k": k, "batch": m,
                             "activation_dtype": "torch.float16", "ms": ms, "ms_rounds": times[(kernel.name, m)],
                             "bytes_read": nbytes, "gb_per_s": nbytes / ms / 1e6,
                             "vs_torch_fp16": anchor / ms if anchor else None})
        del rings
        torch.cuda.empty_cache()
        if progress:
            print(f"bench gpu: {n}x{k} batches {batches}: {time.perf_counter() - t0:.1f} s", flush=True)
    props = torch.cuda.get_device_properties(0)
    machine = {"gpu": props.name, "multiprocessors": props.multi_processor_count,
               "memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
               "cuda": torch.version.cuda}
    settings = {"bench": "gpu", "quick": quick, "shapes": [list(s) for s in shapes], "batches": batches,
                "rounds": ROUNDS, "ring_bytes_min": MIN_RING_BYTES, "group_size": GROUP,
                "sparse_int4_group_size": SPARSE_INT4_GROUP, "notes": notes, "wall_s": time.perf_counter() - start}
    return {"machine": machine, "settings": settings, "rows": rows}


def format_gpu_table(result: dict) -> str:
    machine = result["machine"]
    lines = [f"{machine['gpu']} ({machine['multiprocessors']} SMs, {machine['memory_gib']} GiB); torch "
             f"{machine['torch']}, CUDA {machine['cuda']}; fp16 activations; weights from HBM (ring of copies "
             f">= {result['settings']['ring_bytes_min'] // 2**20} MiB per kernel)",
             f"{'kernel':<18}{'n':>7}{'k':>7}{'batch':>6}{'ms':>10}{'GB/s':>9}{'vs fp16':>9}"]
    last = None
    for row in result["rows"]:
        if last is not None and (row["n"], row["k"], row["batch"]) != last:
            lines.append("")
        last = (row["n"], row["k"], row["batch"])
        ratio = f"{row['vs_torch_fp16']:.2f}" if row["vs_torch_fp16"] else "-"
        lines.append(f"{row['kernel']:<18}{row['n']:>7}{row['k']:>7}{row['batch']:>6}{row['ms']:>10.4f}"
                     f"{row['gb_per_s']:>9.0f}{ratio:>9}")
    lines += [f"note: {note}" for note in result["settings"]["notes"]]
    return "\n".join(lines)
