// The large-batch path the tiled kernels share (gemm_tiled_*.cpp, sparse24_*.cpp): blocks of whole
// tiles are expanded into a dense W^T[k, columns] scratch and multiplied by torch's own GEMM (MKL's sgemm
// for fp32; oneDNN for bf16, on AMX or AVX512-BF16 where the CPU has them). Expanding costs k*n per call and
// the product m*k*n, so from a few dozen rows on the expansion is small and the product runs at BLAS speed,
// which the register-blocked AVX2 kernels do not reach. The layer still holds only its compressed weight:
// the scratch is one block (at most kDenseBlockBytes), kept per thread and reused.
#pragma once
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "comptrust/cpu_tiles.h"

namespace comptrust::cpu {

constexpr int64_t kDenseBlockBytes = 8 << 20;

// y[m, n] = x[m, k] @ W^T for x, y and the scratch of element type Out (float or at::BFloat16).
// expand_tile(t, out, ld) writes tile t's weights as out[kk][0..7], kk = 0..k-1, rows ld elements apart.
template <typename Out, class ExpandTile>
void gemm_by_dense_blocks(const at::Tensor& x, at::Tensor& y, ExpandTile&& expand_tile) {
  const int64_t k = x.size(1), tiles = y.size(1) / kTileCols;
  const int64_t tile_bytes = k * kTileCols * static_cast<int64_t>(sizeof(Out));
  const int64_t block_tiles = std::clamp<int64_t>(kDenseBlockBytes / tile_bytes, 1, tiles);
  const int64_t ld = block_tiles * kTileCols;
  // A fresh allocation this size goes back to the OS when freed, and faulting its pages in again on every
  // call cost more than the expansion itself.
  thread_local std::vector<Out> buffer;
  if (static_cast<int64_t>(buffer.size()) < k * ld) buffer.resize(k * ld);
  Out* w = buffer.data();  // not `buffer` inside the parallel region: there it would name each worker's own
  const at::Tensor scratch = at::from_blob(w, {k, ld}, x.options());
  for (int64_t t0 = 0; t0 < tiles; t0 += block_tiles) {
    const int64_t count = std::min(block_tiles, tiles - t0);
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) expand_tile(t0 + u, w + u * kTileCols, ld);
    });
    at::Tensor y_block = y.narrow(1, t0 * kTileCols, count * kTileCols);  // rows n apart: BLAS writes in place
    at::mm_out(y_block, x, scratch.narrow(1, 0, count * kTileCols));
  }
}

}  // namespace comptrust::cpu
