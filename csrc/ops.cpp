// The one place comptrust's op schemas are declared. CPU (csrc/cpu/) and CUDA (csrc/cuda/)
// implementations register under these names with TORCH_LIBRARY_IMPL; the Python layer
// (comptrust/ops.py) adds fake/meta kernels and the pure-torch reference fallback.
#include <torch/extension.h>

#include "cpu/isa.h"

TORCH_LIBRARY(comptrust, m) {
  // y[m, n] = x[m, k] @ dequant(qweight, qzeros, scales)^T, GPTQ v1 int4 layout
  // (csrc/include/comptrust/int4_layout.h). Output has x's dtype.
  m.def("int4_gemm(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, int group_size) -> Tensor");
  // The same product with x first quantized to int8 (w4a8): symmetric, one scale max|x|/127 per row and
  // per block of 32 inputs (blocks restart at each weight group), then integer dot products. Exactly
  // x8 * sx @ dequant(W)^T up to float summation order; see comptrust.reference.int4_gemm_a8.
  m.def("int4_gemm_a8(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, int group_size) -> Tensor");
  // y[m, n] = x[m, k] @ dequant(qweight, qzeros, scales)^T, GPTQ v1 int3 layout (comptrust/formats/int3.py:
  // 32 inputs per 3 words, value i of a block at bits 3i..3i+2 of the 96-bit little-endian block).
  m.def("int3_gemm(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, int group_size) -> Tensor");
  // The CPU kernels' own layout (csrc/include/comptrust/cpu_tiles.h, built by comptrust.formats.cpu_tiles):
  // y = x @ dequant(W)^T for int4 or int3 weights (bits) tiled 8 output columns at a time; act_bits 0 keeps
  // x in float, 8 quantizes it like int4_gemm_a8. x is [..., k] (as F.linear), y [..., n] in x's dtype.
  m.def("gemm_tiled(Tensor x, Tensor weight, Tensor zeros, Tensor scales, int bits, int group_size, "
        "int act_bits) -> Tensor");
  // gemm_tiled of one x by several weights of the same bits and group size (a decoder's q/k/v, gate/up),
  // one y per weight: at batch 1 in one parallel region, else one product after another.
  m.def("gemm_tiled_many(Tensor x, Tensor[] weights, Tensor[] zeros, Tensor[] scales, int bits, int group_size, "
        "int act_bits) -> Tensor[]");
  // 2:4 semi-structured sparse weights (comptrust/formats/sparse24.py): y = x @ W^T where W [n, k] is given
  // by its kept values [n, k/2] (float32/bfloat16/float16) and meta [n, k/8] uint8. Output has x's dtype.
  m.def("sparse24_gemm(Tensor x, Tensor values, Tensor meta) -> Tensor");
  // The same with the kept values int4-quantized: GPTQ v1 int4 tensors over the compact [n, k/2] matrix
  // (group_size counts kept values), meta as above.
  m.def("sparse24_int4_gemm(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, Tensor meta, "
        "int group_size) -> Tensor");
  // The CPU kernels' 2:4 layout (csrc/include/comptrust/sparse24_tiles.h, built by
  // comptrust.formats.cpu_tiles.tile_sparse24*): float values, or int4 values tiled like gemm_tiled's; x [..., k].
  m.def("sparse24_gemm_tiled(Tensor x, Tensor values, Tensor meta) -> Tensor");
  // act_bits 8: x quantized to int8 per row and per block of 32 inputs within each group of 2 * group_size
  // inputs (comptrust.reference.quantize_activations_int8), for the int8 dot-product kernel.
  m.def("sparse24_int4_gemm_tiled(Tensor x, Tensor weight, Tensor meta, Tensor zeros, Tensor scales, "
        "int group_size, int act_bits=0) -> Tensor");
  // Unstructured sparse fp32 weights in the bitmap layout (comptrust/formats/bitmap_sparse.py): kept values [nnz]
  // row by row, mask [n, ceil(k/16)] int16 (bit i of word j: input 16j + i kept), row_start [n + 1] int64.
  // y = x @ W^T for fp32 x [..., k]; a mask that disagrees with row_start is refused, naming the row.
  m.def("bitmap_sparse_gemm(Tensor x, Tensor values, Tensor mask, Tensor row_start, int k) -> Tensor");
  // Batch-1 decoding steps around the linears (comptrust.lean_decode; torch versions in comptrust.reference).
  // hidden += delta (when given) in place, then LlamaRMSNorm of each row: weight * (h / rms(h)).
  m.def("residual_rms_norm(Tensor(a!) hidden, Tensor? delta, Tensor weight, float eps) -> Tensor");
  // One new token's attention: rotary embedding (cos/sin of its position, rotate_half convention) on q and k,
  // k and v written at `position` of the caches [kv_heads, max_len, head_dim], then each query head attends to
  // positions 0..position of its KV head (heads / kv_heads queries share one). Returns q's shape.
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor cos, "
        "Tensor sin, int position, float scale) -> Tensor");
  // The MLP's F.silu(gate) * up for gate and up of one shape and float dtype.
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  // y [..., n] = x @ weight^T for x holding one row [..., k] and a dense weight [n, k] of x's dtype, summed in
  // fp32, the rows shared among threads (the vocabulary projection of a decoding step).
  m.def("dense_gemv(Tensor x, Tensor weight) -> Tensor");
  // GPTQ / SparseGPT: the error-feedback pass over one block of columns (comptrust/compress/hessian.py).
  // w [n, B] is overwritten with the quantized / pruned values. Column i: prune it where mask says so
  // (with prune_n > 0, the prune_n of each prune_m columns with the smallest w^2 / hinv[j, j]^2 are marked
  // first), quantize it to `bits` (0: none) on the grid scales/zeros[:, col_group[i]], then spread the error
  // e = (w - q) / hinv[i, i] over the later columns: w[:, j] -= e * hinv[i, j]. Returns (err [n, B],
  // loss [n] = sum (w - q)^2 / hinv[i, i]^2 / 2). Bit-exact with comptrust.reference.hessian_block_update.
  m.def("hessian_block_update(Tensor(a!) w, Tensor hinv, Tensor scales, Tensor zeros, Tensor col_group, int bits, "
        "Tensor(b!) mask, int prune_n, int prune_m) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "comptrust compiled ops (registered as torch.ops.comptrust.*)";
  module.def("cpu_isa", &comptrust::cpu::selected_isa_name,
             "The SIMD path the CPU kernels use on this machine (COMPTRUST_CPU_ISA overrides).");
  module.def("cpu_amx_bf16", &comptrust::cpu::amx_bf16_usable,
             "Whether bf16 activations run on the AMX tile unit here (COMPTRUST_CPU_AMX=0 turns it off).");
  module.def("cpu_avx512_bf16", &comptrust::cpu::avx512_bf16_usable,
             "Whether bf16 panel products can run on AVX512-BF16 (vdpbf16ps) here, where there is no AMX tile unit "
             "(COMPTRUST_CPU_BF16=0 turns it off).");
  module.def("cpu_l1d_bytes", &comptrust::cpu::l1d_bytes,
             "The L1 data cache per core the CPU kernels size their choices by (COMPTRUST_CPU_L1D_BYTES overrides).");
  module.def("cpu_avx512_vnni", &comptrust::cpu::avx512_vnni_usable,
             "Whether int8 activations (act_bits=8) run on the AVX-512 VNNI kernels here.");
  module.def("cpu_avx512_vnni_vbmi", &comptrust::cpu::avx512_vnni_vbmi_usable,
             "Whether 2:4 int4 kept values run int8 activations (and fp32 ones as int8 limbs at batch 1) on the "
             "AVX-512 VNNI + VBMI kernel here.");
#ifdef COMPTRUST_WITH_CUDA
  module.attr("cuda_built") = true;
#else
  module.attr("cuda_built") = false;
#endif
}
