"""The int4 benchmark's plumbing: every kernel timed on every (n, k, batch), one JSON schema, speedups that
agree with the times. Tiny shape, tiny time budget and a tiny cold-copy set: no timing is asserted."""
import json
import math
import statistics

import pytest
import torch

from comptrust import cli
from comptrust.bench import harness
from comptrust.bench import int4_gemm as bench
from comptrust.bench import sparse24_gemm as sparse_bench

SHAPE, BATCHES = (256, 256), [1, 2]
TINY = {"min_time": 0.002, "cold_bytes": 1 << 20, "bandwidth_bytes": 1 << 22}
MACHINE_KEYS = {"cpu_model", "physical_cores", "logical_cpus", "threads", "l3_bytes", "l1d_bytes",
                "cold_weight_bytes", "read_bandwidth_gb_per_s", "read_bandwidth_samples_gb_per_s",
                "read_bandwidth_method", "read_bandwidth_buffer_bytes", "read_bandwidth_threads_busy", "isa",
                "cpu_backend_available", "torch", "comptrust"}
ROW_KEYS = {"kernel", "role", "n", "k", "batch", "group_size", "ms", "ms_rounds", "bytes_read", "gb_per_s",
            "read_bandwidth_gb_per_s", "pct_of_read_bandwidth", "weight_copies"}


def check_result(result: dict, shapes, batches, bench=bench) -> None:
    assert MACHINE_KEYS <= set(result["machine"])
    assert result["machine"]["read_bandwidth_gb_per_s"] > 0
    assert result["settings"]["anchors"] == list(bench.ANCHORS)
    names = [kernel.name for kernel in bench.KERNELS]
    assert set(bench.ANCHORS) <= set(names) and "comptrust_int4_fp32" in set(names)
    rows = result["rows"]
    assert len(rows) == len(shapes) * len(batches) * len(names)
    by_key = {(r["n"], r["k"], r["batch"], r["kernel"]): r for r in rows}
    assert len(by_key) == len(rows), "one row per (n, k, batch, kernel)"
    # A read before the first shape and after each; a shape's rows against the better of the two around it.
    samples = result["machine"]["read_bandwidth_samples_gb_per_s"]
    assert len(samples) == len(shapes) + 1 and result["machine"]["read_bandwidth_gb_per_s"] == max(samples)
    for index, (n, k) in enumerate(shapes):
        bandwidth = max(samples[index], samples[index + 1])
        for m in batches:
            for name in names:
                row = by_key[(n, k, m, name)]
                expected_keys = ROW_KEYS | {f"speedup_vs_{a}" for a in bench.ANCHORS}
                assert expected_keys <= set(row), expected_keys - set(row)
                assert row["ms"] > 0 and row["bytes_read"] > 0 and row["weight_copies"] >= 1
                assert len(row["ms_rounds"]) == harness.ROUNDS and row["ms"] == statistics.median(row["ms_rounds"])
                assert row["role"] == ("anchor" if name in bench.ANCHORS else "ours")
                assert math.isclose(row["gb_per_s"], row["bytes_read"] / row["ms"] / 1e6, rel_tol=1e-9)
                assert row["read_bandwidth_gb_per_s"] == bandwidth
                assert math.isclose(row["pct_of_read_bandwidth"], 100 * row["gb_per_s"] / bandwidth, rel_tol=1e-9)
                for anchor in bench.ANCHORS:
                    expected = by_key[(n, k, m, anchor)]["ms"] / row["ms"]
                    assert math.isclose(row[f"speedup_vs_{anchor}"], expected, rel_tol=1e-9)
                    if name == anchor:
                        assert row[f"speedup_vs_{anchor}"] == 1.0
    # The targets' pairs, interleaved call by call: one row per (pair, shape, batch), its median inside its quartiles,
    # each kernel's time and GB/s over the same calls (of the bytes its own row counts).
    assert result["settings"]["pairs"] == [list(p) for p in bench.PAIRS]
    pairs = {(p["kernel"], p["versus"], p["n"], p["k"], p["batch"]): p for p in result["pairs"]}
    assert len(pairs) == len(result["pairs"]) == len(bench.PAIRS) * len(shapes) * len(batches)
    for (ours, versus, n, k, m), pair in pairs.items():
        assert (ours, versus) in bench.PAIRS and (n, k) in shapes and m in batches
        assert pair["calls"] >= 9 and 0 < pair["speedup_q1"] <= pair["speedup"] <= pair["speedup_q3"]
        for name, ms, gb_per_s in ((ours, pair["ms"], pair["gb_per_s"]),
                                   (versus, pair["versus_ms"], pair["versus_gb_per_s"])):
            assert ms > 0 and math.isclose(gb_per_s, by_key[(n, k, m, name)]["bytes_read"] / ms / 1e6, rel_tol=1e-9)


def test_library_rows_cover_every_kernel_and_speedups_agree():
    result = bench.run_int_bench(False, shapes=[SHAPE], batches=BATCHES, progress=False, **TINY)
    check_result(result, [SHAPE], BATCHES)
    json.dumps(result)  # plain data only
    # ours reads packed int4/int3/int8 codes + fp16 scales + uint8 zero points; fp32 reads 8x the int4 bytes
    row = {(r["kernel"], r["batch"]): r for r in result["rows"]}
    n, k = SHAPE
    assert row[("torch_fp32", 1)]["bytes_read"] == n * k * 4 + k * 4
    assert row[("comptrust_int4_fp32", 1)]["bytes_read"] == n * k // 2 + n * k // 128 * (2 + 1) + k * 4
    assert row[("comptrust_int3_a8", 1)]["bytes_read"] == n * k * 3 // 8 + n * k // 128 * (2 + 1) + k * 4
    assert row[("comptrust_int8_fp32", 1)]["bytes_read"] == n * k + n * k // 128 * (2 + 1) + k * 4


def test_interleaved_times_alternate_the_calls_and_time_each(monkeypatch):
    """A fake clock that each call moves on: ours takes 2 units, the anchor 6, and each pair says so; the order
    of the two calls alternates and both calls of a pair get the pair's index."""
    clock = {"now": 0.0}
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock["now"])
    calls = []

    def call(name, cost):
        def run(i):
            calls.append((name, i))
            clock["now"] += cost
        return run

    times = harness.interleaved_times(call("ours", 2.0), call("anchor", 6.0), min_time=0.0, warmup=1, min_calls=9)
    assert times == [(2.0, 6.0)] * 9
    timed = calls[2:]  # after the warm-up pair
    assert [c[0] for c in timed[0::2]] == ["ours" if j % 2 else "anchor" for j in range(1, 10)]
    assert [c[1] for c in timed[0::2]] == list(range(1, 10)) == [c[1] for c in timed[1::2]]


def test_pair_rows_divide_the_anchor_time_by_ours_and_count_each_kernels_bytes(monkeypatch):
    """_pair_rows on two fake kernels under a fake clock: ours takes 2 ms and reads 4 KiB, the anchor 6 ms and
    16 KiB, so the speedup and both quartiles are 3 and each side's GB/s is its own bytes over its own time."""
    clock = {"now": 0.0}
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock["now"])

    def kernel(name, cost_s, weight_bytes):
        def call(x, w):
            clock["now"] += cost_s
        return harness.Kernel(name, torch.float32, lambda layer: (torch.zeros(weight_bytes // 4),), call)

    ours, anchor = kernel("ours", 0.002, 4096), kernel("anchor", 0.006, 16384)
    (row,) = harness._pair_rows([("ours", "anchor")], [ours, anchor], None, n=8, k=16, batches=[1],
                                cold_bytes=1, min_time=0.0)
    for key in ("speedup", "speedup_q1", "speedup_q3"):
        assert row[key] == pytest.approx(3.0)
    assert row["ms"] == pytest.approx(2.0) and row["versus_ms"] == pytest.approx(6.0)
    assert row["gb_per_s"] == pytest.approx((4096 + 16 * 4) / 2.0 / 1e6)
    assert row["versus_gb_per_s"] == pytest.approx((16384 + 16 * 4) / 6.0 / 1e6)


def test_each_shape_is_measured_against_the_reads_around_it(monkeypatch):
    """The machine's bandwidth drifts within a run: a shape's % of bandwidth uses the better of the reads just before
    and after it, not a read taken far away (here a 60 GB/s first read would have held the second shape to half)."""
    scripted = iter([60.0, 30.0, 31.0])
    real = harness.read_bandwidth
    monkeypatch.setattr(harness, "read_bandwidth",
                        lambda nbytes, min_time: {**real(nbytes, min_time=min_time), "gb_per_s": next(scripted)})
    shapes = [SHAPE, (128, 256)]
    result = bench.run_int_bench(False, shapes=shapes, batches=[1], progress=False, **TINY)
    check_result(result, shapes, [1])
    assert result["machine"]["read_bandwidth_samples_gb_per_s"] == [60.0, 30.0, 31.0]
    assert {(r["n"], r["read_bandwidth_gb_per_s"]) for r in result["rows"]} == {(256, 60.0), (128, 31.0)}
    table = harness.format_table(result)
    assert "best of 3 reads (60.0, 30.0, 31.0" in table
    if result["machine"]["l1d_bytes"]:  # the L1 the one-row kernels were picked by
        assert f"L1d {result['machine']['l1d_bytes'] // 1024} KiB" in table.splitlines()[0]


@pytest.fixture
def tiny_defaults(monkeypatch):
    """The CLI takes no test-only knobs: shrink the library's defaults instead."""
    monkeypatch.setattr(harness, "MIN_TIME", TINY["min_time"])
    monkeypatch.setattr(harness, "MAX_COLD_BYTES", TINY["cold_bytes"])
    monkeypatch.setattr(harness, "MIN_COLD_BYTES", TINY["cold_bytes"])
    monkeypatch.setattr(harness, "MIN_BANDWIDTH_BYTES", TINY["bandwidth_bytes"])


def test_cli_bench_int_writes_json(tmp_path, tiny_defaults, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "int", "--shapes", "256x256", "--batches", "1,2", "--json", str(out),
                     "--no-progress"]) == 0
    table = capsys.readouterr().out
    for name in ("comptrust_int4_fp32", "torch_int4pack", "vs int4pack", "read bandwidth", "calls interleaved"):
        assert name in table
    result = json.loads(out.read_text())
    assert result["settings"]["shapes"] == [[256, 256]] and result["settings"]["batches"] == BATCHES
    check_result(result, [SHAPE], BATCHES)


def test_cli_rejects_bad_shapes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "int", "--shapes", "4096"])
    assert "NxK" in capsys.readouterr().err
    with pytest.raises(ValueError, match="multiples of 32"):
        bench.run_int_bench(False, shapes=[(256, 200)], batches=[1], progress=False, **TINY)


@pytest.mark.parametrize("run, module", [(bench.run_int_bench, bench), (sparse_bench.run_sparse_bench, sparse_bench)])
def test_smollm2_shapes_run_with_a_partial_last_group(run, module):
    """SmolLM2's k = 576 is 4.5 groups of 128: our kernels take a last group of 64 (as the embedded model's
    layers do); torch's int4pack needs whole groups, so it has no rows there and its speedups are None."""
    assert (192, 576) in module.SHAPES
    result = run(False, shapes=[(192, 576)], batches=[1], progress=False, **TINY)
    kernels = {row["kernel"] for row in result["rows"]}
    expected = {kernel.name for kernel in module.KERNELS} - {"torch_int4pack"}
    assert kernels == expected
    assert all(row["ms"] > 0 and row.get("speedup_vs_torch_int4pack") is None for row in result["rows"])
    assert {(p["kernel"], p["versus"]) for p in result["pairs"]} == {
        pair for pair in module.PAIRS if "torch_int4pack" not in pair}  # no interleaved pair without its weights


def test_kernels_are_timed_in_interleaved_rounds():
    """Each kernel's time is the median of ROUNDS passes, and the passes alternate between kernels (A's calls,
    B's, A's, B's, ...), so a slow stretch of a shared machine lands on both; a kernel without weights for
    the shape has no rows and no calls."""
    import torch

    calls = []

    def kernel(name, weights=True):
        def call(x, w):
            calls.append(name)
            return x @ w
        return harness.Kernel(name, torch.float32, lambda layer: (torch.ones(8, 8),) if weights else None, call)

    kernels = [kernel("a"), kernel("b"), kernel("none", weights=False)]
    rows = harness._bench_shape(kernels, ("a",), None, 8, 8, [1, 2], cold_bytes=4096, min_time=0.003,
                                row_fields={}, rounds=3)
    runs = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]
    assert runs == ["a", "b"] * 3
    assert [(r["kernel"], r["batch"]) for r in rows] == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    for row in rows:
        assert len(row["ms_rounds"]) == 3 and row["ms"] == statistics.median(row["ms_rounds"])
        assert row["bytes_read"] == 8 * 8 * 4 + row["batch"] * 8 * 4


def test_read_bandwidth_is_the_faster_of_its_reads():
    """The anchor is the best whole-buffer read (which of torch.sum and sgemv is faster depends on the torch
    build; one method alone could let a kernel read faster than "bandwidth"), and it says which read set it
    and how many threads that read kept busy."""
    result = harness.read_bandwidth(1 << 22, min_time=0.01)
    rates = result["gb_per_s_by_method"]
    assert set(rates) == {"sum", "sgemv"} and all(rate > 0 for rate in rates.values())
    assert result["gb_per_s"] == max(rates.values()) and rates[result["method"]] == result["gb_per_s"]
    assert result["buffer_bytes"] == 1 << 22
    assert set(result["threads_busy_by_method"]) == {"sum", "sgemv"}
    assert result["threads_busy"] == result["threads_busy_by_method"][result["method"]]


def test_busy_threads_counts_those_near_the_busiest():
    """A thread counts as busy with at least a quarter of the busiest one's ticks; threads born during the
    read count from zero; no movement at all means no thread was seen working."""
    before = {"1": 100, "2": 50, "3": 7}
    after = {"1": 200, "2": 80, "3": 8, "4": 25}
    assert harness._busy_threads(before, after) == 3  # 100, 30 and 25 ticks; the idle one's 1 tick is not
    assert harness._busy_threads(before, before) == 0
    assert harness._busy_threads({}, {}) == 0


def test_cold_copies_are_independent_and_cover_the_target():
    import torch

    weight = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    copies = harness.cold_copies([weight], 10_000)
    assert len(copies) == math.ceil(10_000 / weight.nbytes)
    pointers = {c[0].data_ptr() for c in copies}
    assert len(pointers) == len(copies) and all(torch.equal(c[0], weight) for c in copies)
    assert harness.cold_bytes_target(l3=480 * harness.MIB) == 960 * harness.MIB
    assert harness.cold_bytes_target(l3=0) == harness.MIN_COLD_BYTES
    assert harness.cold_bytes_target(l3=10 * 1024 * harness.MIB) == harness.MAX_COLD_BYTES


def test_sparse_bench_rows_and_bytes():
    result = sparse_bench.run_sparse_bench(False, shapes=[SHAPE], batches=BATCHES, progress=False, **TINY)
    check_result(result, [SHAPE], BATCHES, sparse_bench)
    row = {(r["kernel"], r["batch"]): r for r in result["rows"]}
    n, k = SHAPE
    # 2:4 reads half the values plus 4 bits of metadata per 4 inputs; with int4 values, 64 kept values a group
    assert row[("comptrust_24_fp32", 1)]["bytes_read"] == n * k // 2 * 4 + n * k // 8 + k * 4
    assert row[("comptrust_24_bf16", 1)]["bytes_read"] == n * k // 2 * 2 + n * k // 8 + k * 2
    assert row[("comptrust_24_int4_fp32", 1)]["bytes_read"] == n * k // 4 + n * k // 8 + n * k // 128 * 3 + k * 4
    assert row[("comptrust_24_int4_bf16", 1)]["bytes_read"] == n * k // 4 + n * k // 8 + n * k // 128 * 3 + k * 2
    assert row[("comptrust_24_int4_a8", 1)]["bytes_read"] == n * k // 4 + n * k // 8 + n * k // 128 * 3 + k * 4
    # bitmap at 50% unstructured: half the values, a bit per weight, a row start per row (and one more)
    assert row[("comptrust_bitmap50_fp32", 1)]["bytes_read"] == n * k // 2 * 4 + n * k // 8 + (n + 1) * 8 + k * 4
    assert row[("comptrust_dense_fp32", 1)]["bytes_read"] == row[("torch_fp32", 1)]["bytes_read"] == n * k * 4 + k * 4


def test_cli_bench_sparse_writes_json(tmp_path, tiny_defaults, capsys):
    out = tmp_path / "sparse.json"
    assert cli.main(["bench", "sparse", "--shapes", "256x256", "--batches", "1,2", "--json", str(out),
                     "--no-progress"]) == 0
    assert "comptrust_24_int4_fp32" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["settings"]["bench"] == "sparse"
    check_result(result, [SHAPE], BATCHES, sparse_bench)
    assert cli.main(["bench", "sparse", "--shapes", "256x200", "--no-progress"]) == 2  # k % 16


# ------------------------------------------------------------------------------------------ bench gpu
# The GPU benchmark times on a GPU only; its kernels and its output check are the same code on CPU (the CUDA ops'
# CPU kernels, Triton under TRITON_INTERPRET=1), checked here so that a device session's minutes go to timing.

def test_gpu_bench_kernels_compute_their_weights_product():
    """Every kernel `bench gpu` times (ours and the anchors) gives x @ W^T of the weight it stands for, at fp16
    accuracy, on a small shape; and check_kernel reports a kernel computing another weight's product."""
    import dataclasses

    import torch

    from comptrust.bench import gpu_kernels

    kernels, skipped = gpu_kernels.make_kernels(64, 256, "cpu")
    assert skipped == []  # torch's 2:4 anchor is tried on CUDA only
    assert [k.name for k in kernels] == ["torch_fp16", "cuda_int4", "cuda_int3", "cuda_24_fp16", "cuda_24_int4",
                                         "triton_int4", "triton_int3", "triton_24_fp16", "triton_24_int4"]
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1)).half()
    for kernel in kernels:
        assert gpu_kernels.check_kernel(kernel, x) < 1e-3, kernel.name
    wrong = dataclasses.replace(kernels[1], dense=kernels[2].dense)  # int4's kernel against int3's weight
    assert gpu_kernels.check_kernel(wrong, x) > gpu_kernels.CHECK_TOL


def test_bench_gpu_without_a_gpu_exits_2_with_the_reason(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cli.main(["bench", "gpu", "--quick", "--no-progress"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
