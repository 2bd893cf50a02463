"""int4/int3/int8 GEMM/GEMV benchmark: comptrust's CPU kernels against anchors timed in the same run.

    comptrust bench int [--quick] [--json FILE]          (or python -m comptrust.bench.int4_gemm ...)
    from comptrust.bench.int4_gemm import run_int_bench; result = run_int_bench(quick=True)

Ours: the tiled CPU kernels as QuantLinear runs them (weights tiled once, comptrust.formats.cpu_tiles), int4
and int3, with float activations and with int8 activations (a8); int8 weights with fp32 activations. bf16
activations run on the AMX tile unit from 8 rows where the CPU has it, else on AVX512-BF16's vdpbf16ps from 8
to 127 rows (to 1023 on layers of 2^22+ weights) where the CPU has that (Zen 4), else in fp32 below 64 rows;
the rest through a dequantized bf16 block and torch's bf16 GEMM. fp32 activations stay on our kernels at every
batch (in passes of up to 256 rows) except on the scalar ISA, where dequantized blocks and torch's GEMM take
them from 64 rows.
Anchors on the same shapes: F.linear fp32 and bf16 on the dense weight, and torch's own int4 CPU op
(_weight_int4pack_mm_for_cpu, bf16 activations). Each row has the median time, the effective GB/s of the
bytes the kernel must read (weights + activations), its share of the machine's measured read bandwidth,
and its speedup over each anchor. Every kernel reads cold weights (see comptrust.bench.harness). Timings
are noisy: compare rows of one run only.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from comptrust import ops
from comptrust.bench import harness
from comptrust.bench.harness import Kernel
from comptrust.formats import Int3Packed, Int4Packed, Int8Packed, dequantize_int4, pack_int3, pack_int4, pack_int8
from comptrust.formats.cpu_tiles import tile

# (n, k) = (out, in): SmolLM2-135M's layers (q/o, k/v, gate/up, down), then Llama-7B's
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096), (4096, 11008)]
QUICK_SHAPES = [(576, 1536), (4096, 4096)]
BATCHES, QUICK_BATCHES = (1, 4, 16, 64), (1, 32)
GROUP = 128
ANCHORS = ("torch_fp32", "torch_bf16", "torch_int4pack")
# The issue's targets, also timed with the two kernels' calls interleaved one by one (harness._pair_rows):
# int4 vs torch's int4 op, int3 vs our int4 (fp32 and int8 activations), and each against bf16 F.linear.
PAIRS = (("comptrust_int4_fp32", "torch_int4pack"), ("comptrust_int3_fp32", "comptrust_int4_fp32"),
         ("comptrust_int3_a8", "comptrust_int4_a8"), ("comptrust_int4_bf16", "torch_bf16"),
         ("comptrust_int3_bf16", "torch_bf16"))


@dataclass
class _Layer:
    """One shape's quantized weight; the dense and tinygemm forms are made only when a kernel needs them."""
    codes: torch.Tensor
    packed: Int4Packed
    packed_int3: Int3Packed  # the same codes' low 3 bits, when the shape allows int3 (n % 32 == 0)
    packed_int8: Int8Packed  # the same codes times 17 (0..255): the bytes are what is timed

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int4(self.packed, dtype)

    def int4pack(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        # torch's layout: codes pre-swizzled by its own converter, and [groups, n, 2] bf16 (scale, zero).
        # Its zero is a float offset rather than our integer zero point; the work per call is the same.
        # It needs whole groups: none on SmolLM2's k = 576 (4.5 groups of 128; ours end with a group of 64).
        n, k = self.codes.shape
        if k % GROUP:
            return None
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes.to(torch.int32), 1)
        scale_zero = torch.stack([self.packed.scales.float(), torch.zeros(k // GROUP, n)], -1).to(torch.bfloat16)
        return weight, scale_zero


def _tiled(bits: int) -> Callable[[_Layer], tuple[torch.Tensor, ...]]:
    def weights(layer: _Layer) -> tuple[torch.Tensor, ...]:
        tiled = tile({4: layer.packed, 3: layer.packed_int3, 8: layer.packed_int8}[bits])
        return tiled.weight, tiled.zeros, tiled.scales
    return weights


def _gemm_tiled(bits: int, act_bits: int) -> Callable[..., torch.Tensor]:
    def call(x, weight, zeros, scales):
        return torch.ops.comptrust.gemm_tiled(x, weight, zeros, scales, bits, GROUP, act_bits)
    return call


KERNELS = [
    Kernel("comptrust_int4_fp32", torch.float32, _tiled(4), _gemm_tiled(4, 0)),
    Kernel("comptrust_int4_bf16", torch.bfloat16, _tiled(4), _gemm_tiled(4, 0)),
    Kernel("comptrust_int4_a8", torch.float32, _tiled(4), _gemm_tiled(4, 8)),
    Kernel("comptrust_int3_fp32", torch.float32, _tiled(3), _gemm_tiled(3, 0)),
    Kernel("comptrust_int3_bf16", torch.bfloat16, _tiled(3), _gemm_tiled(3, 0)),
    Kernel("comptrust_int3_a8", torch.float32, _tiled(3), _gemm_tiled(3, 8)),
    Kernel("comptrust_int8_fp32", torch.float32, _tiled(8), _gemm_tiled(8, 0)),
    Kernel("torch_fp32", torch.float32, lambda layer: (layer.dense(torch.float32),), F.linear),
    Kernel("torch_bf16", torch.bfloat16, lambda layer: (layer.dense(torch.bfloat16),), F.linear),
    Kernel("torch_int4pack", torch.bfloat16, _Layer.int4pack,
           lambda x, w, sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, GROUP, sz)),
]


def _layer(n: int, k: int) -> _Layer:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (n, k), generator=g)
    groups = -(-k // GROUP)  # a partial last group where GROUP does not divide k, as in the embedded model
    zeros, scales = torch.randint(1, 17, (n, groups), generator=g), torch.rand(n, groups, generator=g) * 0.01
    packed = pack_int4(codes, zeros, scales, GROUP)
    packed_int3 = pack_int3(codes % 8, (zeros - 1) % 8 + 1, scales, GROUP)
    packed_int8 = pack_int8(codes * 17, zeros * 16, scales, GROUP)
    return _Layer(codes, packed, packed_int3, packed_int8)


def run_int_bench(quick: bool, shapes: Sequence[tuple[int, int]] | None = None,
                  batches: Sequence[int] | None = None, progress: bool = True, *,
                  min_time: float | None = None, cold_bytes: int | None = None,
                  bandwidth_bytes: int | None = None) -> dict:
    """Time every kernel in KERNELS on each (n, k) shape and batch; {"machine", "settings", "rows"}.

    quick picks QUICK_SHAPES x QUICK_BATCHES instead of SHAPES x BATCHES; shapes/batches override either.
    The keyword-only arguments exist for tests and quick looks and make the numbers meaningless as
    DRAM figures when shrunk: min_time (s of timed calls per row, default harness.MIN_TIME), cold_bytes
    (weight copies per kernel, default twice the L3) and bandwidth_bytes (read-test buffer)."""
    shapes = list(shapes or (QUICK_SHAPES if quick else SHAPES))
    batches = list(batches or (QUICK_BATCHES if quick else BATCHES))
    for n, k in shapes:
        if n % 32 or k % 32:
            raise ValueError(f"bench int: shape {n}x{k} needs n and k multiples of 32 (int3's packing)")
    return harness.run_kernel_bench("int", KERNELS, ANCHORS, _layer, shapes, batches, quick, progress,
                                    min_time, cold_bytes, bandwidth_bytes,
                                    row_fields={"group_size": GROUP}, pairs=PAIRS)


if __name__ == "__main__":
    import sys

    from comptrust.cli import main

    sys.exit(main(["bench", "int", *sys.argv[1:]]))
