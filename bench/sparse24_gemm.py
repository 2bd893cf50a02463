"""Sparse GEMM/GEMV benchmark: comptrust's CPU 2:4 and bitmap (unstructured) kernels against anchors timed in the
same run.

    comptrust bench sparse [--quick] [--json FILE]       (or python -m comptrust.bench.sparse24_gemm ...)
    from comptrust.bench.sparse24_gemm import run_sparse_bench; result = run_sparse_bench(quick=True)

Ours: the tiled 2:4 kernels as Sparse24Linear / Sparse24Int4Linear run them (tiled once), with fp32 kept
values and fp32 activations, bf16 values and bf16 activations, and int4 kept values (group of 64 kept
values, i.e. 128 inputs, the span of a dense g128 group) with fp32 and with bf16 activations, and with
fp32 activations quantized to int8 in the kernel (act_bits=8, the VNNI dot-product kernel); and the bitmap kernel
(BitmapSparseLinear's) on the same weight pruned 50% unstructured instead (the smallest half of each row).
Anchors on the same shapes: F.linear fp32 and bf16 on the dense (pruned) weight, comptrust's dense fp32 product as
the decode runs it (dense_gemv at one row, which shares the rows between threads where MKL's sgemv used one
thread here; F.linear from two), and our dense int4 g128 kernel. (Which 2:4 kernel runs
depends on the rows: on AVX-512, fp32 activations from 32 rows run the row-vector kernel, int4 values on
the large layers from 64; bf16 activations from 8 rows, and fp32 ones with int4 values below that, run on the
AMX tile unit where the CPU has it (bf16 activations from 8 to 511 rows, 1023 on layers of 2^22+ weights, on
AVX512-BF16's vdpbf16ps where it has that instead, each column's kept inputs gathered so the pruned zeros are
not multiplied); bf16 activations from 512 rows, and any from 192 without AVX-512, have the weight expanded block
by block for torch's GEMM. See csrc/cpu/sparse24_cpu.cpp's run_kind.) Row fields as in
`comptrust bench int` (comptrust.bench.harness). Timings are noisy: compare rows of one run only.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from comptrust.bench import harness
from comptrust.bench.harness import Kernel
from comptrust.compress.pruning import SparsityPattern, prune_by_score
from comptrust.compress.rtn import quantize_rtn
from comptrust.formats.bitmap_sparse import pack_bitmap
from comptrust.formats.cpu_tiles import tile, tile_sparse24, tile_sparse24_int4
from comptrust.formats.sparse24 import pack_sparse24, pack_sparse24_int4, prune_magnitude_24

from comptrust.bench.int4_gemm import BATCHES, QUICK_BATCHES, QUICK_SHAPES, SHAPES  # the same grid

INT4_GROUP = 128          # dense int4 anchor: inputs per group
SPARSE_INT4_GROUP = 64    # 2:4+int4: kept values per group (= 128 inputs)
ANCHORS = ("torch_fp32", "torch_bf16", "comptrust_dense_fp32", "comptrust_int4_fp32")
# The issue's targets, also timed with the two kernels' calls interleaved one by one (harness._pair_rows).
PAIRS = (("comptrust_24_fp32", "torch_fp32"), ("comptrust_24_int4_fp32", "torch_fp32"),
         ("comptrust_24_bf16", "torch_bf16"))
UNSTRUCTURED = SparsityPattern.parse("unstructured", 0.5)


@dataclass
class _Layer:
    pruned: torch.Tensor  # the dense fp32 2:4 weight [n, k]
    unstructured: torch.Tensor  # the same weight pruned 50% unstructured instead

    def bitmap(self) -> tuple[torch.Tensor, ...]:
        packed = pack_bitmap(self.unstructured)
        return packed.values, packed.mask, packed.row_start

    def sparse(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        tiled = tile_sparse24(pack_sparse24(self.pruned.to(dtype)))
        return tiled.values, tiled.meta

    def sparse_int4(self) -> tuple[torch.Tensor, ...]:
        tiled = tile_sparse24_int4(pack_sparse24_int4(self.pruned, SPARSE_INT4_GROUP))
        return tiled.int4.weight, tiled.meta, tiled.int4.zeros, tiled.int4.scales

    def dense_int4(self) -> tuple[torch.Tensor, ...]:
        tiled = tile(quantize_rtn(self.pruned, 4, INT4_GROUP))
        return tiled.weight, tiled.zeros, tiled.scales


def _layer(n: int, k: int) -> _Layer:
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
    return _Layer(prune_magnitude_24(weight), prune_by_score(weight, weight.abs(), UNSTRUCTURED))


def _sparse24(x, values, meta):
    return torch.ops.comptrust.sparse24_gemm_tiled(x, values, meta)


def _sparse24_int4(x, weight, meta, zeros, scales):
    return torch.ops.comptrust.sparse24_int4_gemm_tiled(x, weight, meta, zeros, scales, SPARSE_INT4_GROUP)


def _sparse24_int4_a8(x, weight, meta, zeros, scales):
    return torch.ops.comptrust.sparse24_int4_gemm_tiled(x, weight, meta, zeros, scales, SPARSE_INT4_GROUP, 8)


def _bitmap(x, values, mask, row_start):
    return torch.ops.comptrust.bitmap_sparse_gemm(x, values, mask, row_start, x.shape[-1])


def _dense(x, weight):
    return torch.ops.comptrust.dense_gemv(x, weight) if x.shape[0] == 1 else F.linear(x, weight)


def _int4(x, weight, zeros, scales):
    return torch.ops.comptrust.gemm_tiled(x, weight, zeros, scales, 4, INT4_GROUP, 0)


KERNELS = [
    Kernel("comptrust_24_fp32", torch.float32, lambda layer: layer.sparse(torch.float32), _sparse24),
    Kernel("comptrust_24_bf16", torch.bfloat16, lambda layer: layer.sparse(torch.bfloat16), _sparse24),
    Kernel("comptrust_24_int4_fp32", torch.float32, _Layer.sparse_int4, _sparse24_int4),
    Kernel("comptrust_24_int4_bf16", torch.bfloat16, _Layer.sparse_int4, _sparse24_int4),
    Kernel("comptrust_24_int4_a8", torch.float32, _Layer.sparse_int4, _sparse24_int4_a8),
    Kernel("comptrust_bitmap50_fp32", torch.float32, _Layer.bitmap, _bitmap),
    Kernel("comptrust_int4_fp32", torch.float32, _Layer.dense_int4, _int4),
    Kernel("comptrust_dense_fp32", torch.float32, lambda layer: (layer.pruned,), _dense),
    Kernel("torch_fp32", torch.float32, lambda layer: (layer.pruned,), F.linear),
    Kernel("torch_bf16", torch.bfloat16, lambda layer: (layer.pruned.to(torch.bfloat16),), F.linear),
]


def run_sparse_bench(quick: bool, shapes: Sequence[tuple[int, int]] | None = None,
                     batches: Sequence[int] | None = None, progress: bool = True, *,
                     min_time: float | None = None, cold_bytes: int | None = None,
                     bandwidth_bytes: int | None = None) -> dict:
    """Time every kernel in KERNELS on each (n, k) shape and batch; arguments as run_int_bench's."""
    shapes = list(shapes or (QUICK_SHAPES if quick else SHAPES))
    batches = list(batches or (QUICK_BATCHES if quick else BATCHES))
    for n, k in shapes:
        if n % 8 or k % 16:  # groups of 128 inputs may end short, as in the embedded model (k = 576)
            raise ValueError(f"bench sparse: shape {n}x{k} needs n % 8 == 0 and k % 16 == 0")
    return harness.run_kernel_bench("sparse", KERNELS, ANCHORS, _layer, shapes, batches, quick, progress,
                                    min_time, cold_bytes, bandwidth_bytes,
                                    row_fields={"group_size": INT4_GROUP, "sparse_int4_group_size": SPARSE_INT4_GROUP},
                                    pairs=PAIRS)


if __name__ == "__main__":
    import sys

    from comptrust.cli import main

    sys.exit(main(["bench", "sparse", *sys.argv[1:]]))
