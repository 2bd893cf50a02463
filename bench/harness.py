"""What every comptrust benchmark shares: timing, cold weights, the read-bandwidth anchor, machine info,
the printed table and the JSON file. The benchmarks themselves (int4_gemm.py, ...) only say which
kernels run on which shapes.

Why weights are cold. One weight matrix reused call after call stays in the last-level cache when it fits
(this machine reports a 480 MiB L3; a 64 MiB fp32 4096x4096 weight fits easily), so a "memory-bound"
kernel is then timed reading cache, not DRAM: F.linear fp32 4096x4096 showed 2-3x the machine's
measured DRAM read bandwidth. In inference each layer's weights are read once per token, and the other
layers' weights have evicted them in between; so every kernel here (ours and the anchors alike) rotates
through enough independent copies of its weights that the copies together exceed twice the L3 (at least
256 MiB, at most MAX_COLD_BYTES) and each call reads weights not touched since the cache was last filled.
Twice, not once: modern L3s do not evict in strict LRU order and may keep part of a streamed working set
that only slightly exceeds them. Activations stay the same tensor: in decoding they are small and hot.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

MIB = 1024 * 1024
MIN_COLD_BYTES = 256 * MIB
# Each kernel's copies live only while that kernel is timed, so this bounds the benchmark's extra memory.
MAX_COLD_BYTES = 2048 * MIB
# The read-bandwidth buffer: at least this, and at least as large as the cold-weight set.
MIN_BANDWIDTH_BYTES = 1024 * MIB
MIN_TIME = 0.2            # seconds of timed calls per (kernel, shape, batch), over all rounds
BANDWIDTH_MIN_TIME = 0.5
# Passes over a shape's kernels; a row's ms is the median of its passes (see _bench_shape).
ROUNDS = 3


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    units = {"K": 1024, "M": MIB, "G": 1024 * MIB}
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def l3_bytes() -> int | None:
    """The last-level (L3) cache size Linux reports for cpu0, or None where it reports none."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "level")) as handle:
                if handle.read().strip() != "3":
                    continue
            with open(os.path.join(base, entry, "size")) as handle:
                return _parse_size(handle.read())
        except (OSError, ValueError):
            continue
    return None


def cold_bytes_target(l3: int | None = None) -> int:
    """How many bytes of weight copies one kernel rotates through (see the module docstring)."""
    l3 = l3_bytes() if l3 is None else l3
    return min(max(2 * (l3 or 0), MIN_COLD_BYTES), MAX_COLD_BYTES)


def cold_copies(tensors: Sequence[torch.Tensor], target_bytes: int) -> list[tuple[torch.Tensor, ...]]:
    """Independent copies of `tensors`, enough that together they hold at least target_bytes.

    Each tensor is copied into one contiguous [copies, ...] block and handed out as views, so making
    thousands of copies of a small layer costs one allocation per tensor."""
    per_copy = sum(t.numel() * t.element_size() for t in tensors)
    count = max(1, math.ceil(target_bytes / per_copy))
    blocks = [t.unsqueeze(0).expand(count, *t.shape).contiguous() for t in tensors]
    return [tuple(block[i] for block in blocks) for i in range(count)]


def median_ms(call: Callable[[int], object], copies: int = 1, min_time: float = 0.2, warmup: int = 3,
              min_calls: int = 5) -> float:
    """Median wall time in ms of call(i), i cycling through 0..copies-1, after `warmup` calls; timed
    calls continue until min_time seconds and min_calls calls have passed."""
    i = 0
    for _ in range(warmup):
        call(i % copies)
        i += 1
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < min_calls:
        t0 = time.perf_counter()
        call(i % copies)
        times.append(time.perf_counter() - t0)
        i += 1
    return 1e3 * statistics.median(times)


def _thread_cpu_ticks() -> dict[str, int] | None:
    """CPU ticks (user + system) used so far by each thread of this process; None off Linux."""
    ticks = {}
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            ticks[tid] = int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None
    return ticks


# Columns of the matrix view the sgemv read test takes of the buffer.
_READ_TEST_COLUMNS = 4096


def read_bandwidth(nbytes: int, min_time: float = 0.5) -> dict:
    """A STREAM-like read test over an fp32 buffer of nbytes, which should be much larger than the L3 so it
    comes from DRAM on every pass: the faster of two whole-buffer reads, torch.sum and a matrix-vector
    product over the buffer seen as a [rows, 4096] matrix (MKL's sgemv). Which one is faster depends on the
    torch build: an earlier one summed on one thread at 15-17 GB/s where sgemv read 22-24; torch 2.13 sums on
    every thread (47 GB/s here) while sgemv stays on one (24). Either alone could have let a kernel show more
    than 100% of "bandwidth" on some build, so `method` names the read that set the anchor.

    Both run on all intra-op threads. We count the threads that did work in each read and report those of the
    anchor's read, so an anchor set on fewer threads than the kernels use shows up in the machine info instead
    of hiding behind a too-low bandwidth."""
    buffer = torch.ones(nbytes // 4)
    matrix = buffer[: buffer.numel() // _READ_TEST_COLUMNS * _READ_TEST_COLUMNS].view(-1, _READ_TEST_COLUMNS)
    vector = torch.ones(_READ_TEST_COLUMNS)
    reads = {"sum": (buffer.numel() * 4, lambda _: buffer.sum()),
             "sgemv": (matrix.numel() * 4, lambda _: torch.mv(matrix, vector))}
    rates, busy = {}, {}
    for name, (read_bytes, call) in reads.items():
        before = _thread_cpu_ticks()
        rates[name] = read_bytes / median_ms(call, min_time=min_time / len(reads)) / 1e6
        after = _thread_cpu_ticks()
        busy[name] = None if before is None or after is None else _busy_threads(before, after)
    method = max(rates, key=rates.get)
    return {"gb_per_s": rates[method], "method": method, "gb_per_s_by_method": rates,
            "buffer_bytes": buffer.numel() * 4, "threads_busy": busy[method], "threads_busy_by_method": busy}


def _busy_threads(before: dict[str, int], after: dict[str, int]) -> int:
    """The threads that used at least a quarter of the CPU time of the busiest one between two tick samples
    (0 when the ticks did not move: the read was shorter than the kernel's tick)."""
    deltas = [after[tid] - before.get(tid, 0) for tid in after]
    top = max(deltas, default=0)
    return sum(1 for delta in deltas if top and delta >= 0.25 * top)


def _cpuinfo() -> tuple[str, int | None]:
    """(CPU model name, physical cores) from /proc/cpuinfo; (platform.processor(), None) elsewhere."""
    try:
        with open("/proc/cpuinfo") as handle:
            text = handle.read()
    except OSError:
        return platform.processor() or platform.machine(), None
    model, cores, physical, core = None, set(), None, None
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and model is None:
            model = value
        elif key == "physical id":
            physical = value
        elif key == "core id":
            core = value
        elif not key and core is not None:
            cores.add((physical, core))
            core = None
    if core is not None:
        cores.add((physical, core))
    return model or platform.processor() or platform.machine(), len(cores) or None


def machine_info(bandwidth: dict, cold_bytes: int) -> dict:
    import comptrust
    from comptrust import ops

    model, cores = _cpuinfo()
    return {
        "cpu_model": model,
        "physical_cores": cores,
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "l3_bytes": l3_bytes(),
        # what the kernels size their L1-resident data by (one-stream limbs); None without the compiled ops
        "l1d_bytes": ops._C.cpu_l1d_bytes() if ops._C is not None else None,
        "cold_weight_bytes": cold_bytes,
        "read_bandwidth_gb_per_s": bandwidth["gb_per_s"],
        "read_bandwidth_samples_gb_per_s": bandwidth.get("samples_gb_per_s", [bandwidth["gb_per_s"]]),
        "read_bandwidth_method": bandwidth["method"],
        "read_bandwidth_buffer_bytes": bandwidth["buffer_bytes"],
        "read_bandwidth_threads_busy": bandwidth["threads_busy"],
        "isa": ops.backends()["cpu"]["detail"],
        "cpu_backend_available": ops.backends()["cpu"]["available"],
        "torch": torch.__version__,
        "comptrust": comptrust.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def add_speedups(rows: list[dict], anchors: Sequence[str]) -> None:
    """speedup_vs_<anchor> = ms of the anchor / ms of the row, for rows of the same (n, k, batch)."""
    anchor_ms = {(r["n"], r["k"], r["batch"], r["kernel"]): r["ms"] for r in rows if r["kernel"] in anchors}
    for row in rows:
        for anchor in anchors:
            reference = anchor_ms.get((row["n"], row["k"], row["batch"], anchor))
            row[f"speedup_vs_{anchor}"] = None if reference is None else reference / row["ms"]


def progress_line(text: str, enabled: bool) -> None:
    if enabled:
        print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Kernel:
    """One benchmarked product: weights(layer) are the tensors each call reads (copied cold), call(x, *weights).
    weights(layer) is None where the kernel cannot run the layer's shape: it then has no rows there."""
    name: str
    act_dtype: torch.dtype
    weights: Callable[[object], tuple[torch.Tensor, ...] | None]
    call: Callable[..., torch.Tensor]


def _bench_shape(kernels: Sequence[Kernel], anchors: Sequence[str], layer, n: int, k: int, batches: Sequence[int],
                 cold_bytes: int, min_time: float, row_fields: dict, rounds: int = ROUNDS) -> list[dict]:
    """Every kernel on every batch of one shape, in `rounds` passes over the kernels, each timing every
    (kernel, batch) for min_time / rounds; a row's ms is the median of its passes (all in ms_rounds).
    Why passes: this machine's speed drifts within a run (its memory is shared with other tenants), and a
    kernel timed once, in a slow stretch, showed int3 at 0.74x of int4 in a run where the passes around it
    gave 1.05-1.18x. Interleaved, each ratio of two rows rests on samples spread over the same stretch.
    Still one kernel's copies at a time (memory stays near cold_bytes), made again each pass; all batches
    reuse them."""
    activations = {m: torch.randn(m, k, generator=torch.Generator().manual_seed(m)) for m in batches}
    weights = {kernel.name: kernel.weights(layer) for kernel in kernels}
    runnable = [kernel for kernel in kernels if weights[kernel.name] is not None]
    times = {(m, kernel.name): [] for kernel in runnable for m in batches}
    copy_counts = {}
    for _ in range(rounds):
        for kernel in runnable:
            copies = cold_copies(weights[kernel.name], cold_bytes)
            copy_counts[kernel.name] = len(copies)
            for m in batches:
                x = activations[m].to(kernel.act_dtype)
                times[(m, kernel.name)].append(median_ms(lambda i: kernel.call(x, *copies[i]), copies=len(copies),
                                                         min_time=min_time / rounds))
            del copies
    rows = []
    for m in batches:
        for kernel in runnable:
            ms = statistics.median(times[(m, kernel.name)])
            nbytes = bytes_read(weights[kernel.name], m, k, kernel.act_dtype)
            rows.append({
                "kernel": kernel.name, "role": "anchor" if kernel.name in anchors else "ours",
                "n": n, "k": k, "batch": m, **row_fields, "activation_dtype": str(kernel.act_dtype),
                "ms": ms, "ms_rounds": times[(m, kernel.name)], "bytes_read": nbytes, "gb_per_s": nbytes / ms / 1e6,
                "pct_of_read_bandwidth": None,  # set once the run's bandwidth is known
                "weight_copies": copy_counts[kernel.name],
            })
    return rows


def interleaved_times(ours: Callable[[int], object], anchor: Callable[[int], object], min_time: float,
                      warmup: int = 3, min_calls: int = 9) -> list[tuple[float, float]]:
    """(ours seconds, anchor seconds) of calls made back to back: the i-th pair calls ours(i) and anchor(i) (each
    picks its own cold copy by i), which of the two goes first alternating. The ratio of a pair rests on two calls
    some hundred microseconds apart, so the machine's drift over seconds reaches it less than it reaches a ratio of
    two separately timed rows (int3 / int4 fp32, 4096x4096, batch 1, five quick runs: rows 0.94-1.37x,
    interleaved 1.06-1.26x); the memory's state from run to run still moves both."""
    i = 0
    for _ in range(warmup):
        ours(i)
        anchor(i)
        i += 1
    pairs, start, clock = [], time.perf_counter(), time.perf_counter
    while clock() - start < min_time or len(pairs) < min_calls:
        timed = {}
        for name, call in (("ours", ours), ("anchor", anchor)) if i % 2 else (("anchor", anchor), ("ours", ours)):
            t0 = clock()
            call(i)
            timed[name] = clock() - t0
        pairs.append((timed["ours"], timed["anchor"]))
        i += 1
    return pairs


def bytes_read(weights: Sequence[torch.Tensor], m: int, k: int, act_dtype: torch.dtype) -> int:
    """What a product of m rows must read: its weight tensors and the activations."""
    return sum(t.numel() * t.element_size() for t in weights) + m * k * act_dtype.itemsize


def _pair_rows(pairs: Sequence[tuple[str, str]], kernels: Sequence[Kernel], layer, n: int, k: int,
               batches: Sequence[int], cold_bytes: int, min_time: float) -> list[dict]:
    """One row per (pair, batch): the speedup of pair[0] over pair[1] with their calls interleaved
    (interleaved_times), the median of the per-pair ratios and their quartiles, and each kernel's median time and
    GB/s over the same calls: whether the anchor read at the memory's pace at the time tells a reader what the
    ratio means (int3 gains its bytes over int4 only where int4 waits on memory). Both kernels' cold copies live
    at once here (twice cold_bytes)."""
    by_name = {kernel.name: kernel for kernel in kernels}
    rows = []
    for ours_name, anchor_name in pairs:
        ours, anchor = by_name[ours_name], by_name[anchor_name]
        weights = ours.weights(layer), anchor.weights(layer)
        if weights[0] is None or weights[1] is None:
            continue
        co, ca = (cold_copies(w, cold_bytes) for w in weights)
        for m in batches:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            xo, xa = x.to(ours.act_dtype), x.to(anchor.act_dtype)
            times = interleaved_times(lambda i: ours.call(xo, *co[i % len(co)]),
                                      lambda i: anchor.call(xa, *ca[i % len(ca)]), min_time)
            ratios = sorted(t_anchor / t_ours for t_ours, t_anchor in times)
            ms = 1e3 * statistics.median(t for t, _ in times)
            versus_ms = 1e3 * statistics.median(t for _, t in times)
            rows.append({"kernel": ours_name, "versus": anchor_name, "n": n, "k": k, "batch": m,
                         "speedup": statistics.median(ratios), "speedup_q1": ratios[len(ratios) // 4],
                         "speedup_q3": ratios[(3 * len(ratios)) // 4], "calls": len(ratios),
                         "ms": ms, "versus_ms": versus_ms,
                         "gb_per_s": bytes_read(weights[0], m, k, ours.act_dtype) / ms / 1e6,
                         "versus_gb_per_s": bytes_read(weights[1], m, k, anchor.act_dtype) / versus_ms / 1e6})
        del co, ca
    return rows


def run_kernel_bench(bench: str, kernels: Sequence[Kernel], anchors: Sequence[str], make_layer: Callable,
                     shapes: Sequence[tuple[int, int]], batches: Sequence[int], quick: bool, progress: bool,
                     min_time: float | None, cold_bytes: int | None, bandwidth_bytes: int | None,
                     row_fields: dict | None = None, pairs: Sequence[tuple[str, str]] = ()) -> dict:
    """Time every kernel on make_layer(n, k) for each shape and batch, with a read-bandwidth test before the first
    shape and after each; {"machine", "settings", "rows", "pairs"} with % of bandwidth and speedups over `anchors`
    filled in, and for each (ours, versus) in `pairs` the speedup with the two kernels' calls interleaved one by
    one (_pair_rows). None for min_time / cold_bytes / bandwidth_bytes means MIN_TIME / twice the L3 / the larger
    of that and MIN_BANDWIDTH_BYTES. Shapes are the caller's to check (each format has its own divisibility rules)."""
    from comptrust import ops

    if any(m < 1 for m in batches):
        raise ValueError(f"bench {bench}: batches must be positive, got {list(batches)}")
    start = time.perf_counter()
    min_time = MIN_TIME if min_time is None else min_time
    row_fields = row_fields or {}
    cold_bytes = cold_bytes_target() if cold_bytes is None else cold_bytes
    if bandwidth_bytes is None:
        bandwidth_bytes = max(MIN_BANDWIDTH_BYTES, cold_bytes)
    if not ops.backends()["cpu"]["available"]:
        progress_line(f"bench {bench}: warning: comptrust._C is not loaded, so the comptrust_* rows time the "
                      "pure-torch reference: " + ops.backends()["cpu"]["detail"], True)
    progress_line(f"bench {bench}: read bandwidth over {bandwidth_bytes // MIB} MiB ...", progress)
    bandwidth_time = BANDWIDTH_MIN_TIME * min_time / MIN_TIME
    reads = [read_bandwidth(bandwidth_bytes, min_time=bandwidth_time)]
    rows, pair_rows = [], []
    for index, (n, k) in enumerate(shapes, 1):
        t0 = time.perf_counter()
        layer = make_layer(n, k)
        shape_rows = _bench_shape(kernels, anchors, layer, n, k, batches, cold_bytes, min_time, row_fields)
        pair_rows += _pair_rows(pairs, kernels, layer, n, k, batches, cold_bytes, min_time)
        reads.append(read_bandwidth(bandwidth_bytes, min_time=bandwidth_time))
        # The machine's bandwidth drifts over seconds to minutes (its memory is shared with other tenants; one run
        # read 63 GB/s at its start and 32 at its end): each shape's rows are measured against the better of the
        # two reads around them, as STREAM reports its best run, not against a read taken far from their timing.
        anchor = max(reads[-2]["gb_per_s"], reads[-1]["gb_per_s"])
        for row in shape_rows:
            row["read_bandwidth_gb_per_s"] = anchor
            row["pct_of_read_bandwidth"] = 100 * row["gb_per_s"] / anchor
        rows += shape_rows
        progress_line(f"bench {bench}: [{index}/{len(shapes)}] {n}x{k} batches {list(batches)}: "
                      f"{time.perf_counter() - t0:.1f} s", progress)
    samples = [read["gb_per_s"] for read in reads]
    bandwidth = dict(max(reads, key=lambda read: read["gb_per_s"]), samples_gb_per_s=samples)
    add_speedups(rows, anchors)
    settings = {"bench": bench, "quick": quick, "shapes": [list(s) for s in shapes], "batches": list(batches),
                **row_fields, "min_time_s": min_time, "anchors": list(anchors),
                "kernels": [kernel.name for kernel in kernels], "pairs": [list(p) for p in pairs],
                "wall_s": time.perf_counter() - start}
    return {"machine": machine_info(bandwidth, cold_bytes), "settings": settings, "rows": rows, "pairs": pair_rows}


def format_table(result: dict) -> str:
    """The benchmark's rows as a text table, one block per (n, k, batch), with the machine line first."""
    machine, rows = result["machine"], result["rows"]
    anchors = result["settings"]["anchors"]
    l1d = f"; L1d {machine['l1d_bytes'] // 1024} KiB" if machine.get("l1d_bytes") else ""
    lines = [f"{machine['cpu_model']}; {machine['threads']} threads; {machine['isa']}{l1d}",
             f"read bandwidth {machine['read_bandwidth_gb_per_s']:.1f} GB/s, best of "
             f"{len(machine['read_bandwidth_samples_gb_per_s'])} reads ("
             f"{', '.join(f'{sample:.1f}' for sample in machine['read_bandwidth_samples_gb_per_s'])}: one before "
             "each shape and after the last; %bw is against the better of the two around a row's shape)",
             f"read test: {machine['read_bandwidth_method']}, {machine['read_bandwidth_buffer_bytes'] // MIB} MiB buffer, "
             f"{machine['read_bandwidth_threads_busy']} threads busy); weights cold: "
             f"{machine['cold_weight_bytes'] // MIB} MiB of copies per kernel (L3 "
             f"{(machine['l3_bytes'] or 0) // MIB} MiB)"]
    header = f"{'kernel':<22}{'n':>7}{'k':>7}{'batch':>6}{'ms':>10}{'GB/s':>8}{'%bw':>6}"
    labels = ["vs " + a.removeprefix("torch_") for a in anchors]
    widths = [max(12, len(label) + 2) for label in labels]  # "vs comptrust_int4_fp32" is wider than a ratio
    header += "".join(f"{label:>{width}}" for label, width in zip(labels, widths))
    lines.append(header)
    previous = None
    for row in rows:
        key = (row["n"], row["k"], row["batch"])
        if previous is not None and key != previous:
            lines.append("")
        previous = key
        line = (f"{row['kernel']:<22}{row['n']:>7}{row['k']:>7}{row['batch']:>6}{row['ms']:>10.3f}"
                f"{row['gb_per_s']:>8.1f}{row['pct_of_read_bandwidth']:>6.0f}")
        for anchor, width in zip(anchors, widths):
            value = row.get(f"speedup_vs_{anchor}")
            line += f"{'-' if value is None else format(value, '.2f'):>{width}}"
        lines.append(line)
    lines.append(f"({len(rows)} rows in {result['settings']['wall_s']:.1f} s; speedup = anchor ms / row ms; "
                 f"compare rows of one run only)")
    if result.get("pairs"):
        lines += ["", "side by side, calls interleaved one by one (speedup = median of the per-call-pair ratios, "
                      "with quartiles; GB/s of each kernel over the same calls):",
                  f"{'kernel':<24}{'versus':<24}{'n':>7}{'k':>7}{'batch':>6}{'speedup':>9}{'q1':>7}{'q3':>7}{'calls':>7}"
                  f"{'GB/s':>8}{'vs GB/s':>9}"]
        for pair in result["pairs"]:
            lines.append(f"{pair['kernel']:<24}{pair['versus']:<24}{pair['n']:>7}{pair['k']:>7}{pair['batch']:>6}"
                         f"{pair['speedup']:>9.2f}{pair['speedup_q1']:>7.2f}{pair['speedup_q3']:>7.2f}"
                         f"{pair['calls']:>7}{pair['gb_per_s']:>8.1f}{pair['versus_gb_per_s']:>9.1f}")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as handle:
        json.dump(result, handle, indent=2)
        handle.write("\n")
