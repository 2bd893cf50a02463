// CUDA version of GPTQ / SparseGPT's column loop over one block (the op comptrust::hessian_block_update;
// semantics in csrc/ops.cpp, pure-torch reference in comptrust.reference.hessian_block_update).
//
// Plain CUDA launcher over raw device pointers (no torch headers, so nvcc compile-checks it without a CUDA
// build of torch; csrc/cuda/hessian_update_cuda_binding.cpp binds it). All arrays contiguous, row-major:
//   w         [n, width]   float, in: the block; out: the quantized / pruned values
//   hinv      [width, width] float, the block's upper Cholesky factor of H^-1
//   mask      [n, width]   uint8 (0/1; torch bool), true = pruned; written per group of prune_m when prune_n > 0
//   scales, zeros [n, groups_per_row] float, col_group [width] int32 (read only when maxq > 0)
//   err       [n, width]   float out; loss [n] float out
// maxq = 2^bits - 1, 0 for no quantization. Requirements (else cudaErrorInvalidValue, nothing launched):
// n >= 0, 0 < width <= 4096, 0 <= prune_n < prune_m with width % prune_m == 0 when prune_n > 0.
// Returns cudaGetLastError() after the launch (the kernel runs asynchronously on `stream`).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

cudaError_t comptrust_hessian_block_update_cuda(float* w, const float* hinv, uint8_t* mask, const float* scales,
                                                const float* zeros, const int32_t* col_group, float* err, float* loss,
                                                int64_t n, int64_t width, int64_t groups_per_row, int64_t maxq,
                                                int64_t prune_n, int64_t prune_m, cudaStream_t stream);
