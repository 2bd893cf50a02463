// CUDA int4 x float GEMM/GEMV over the GPTQ v1 layout (csrc/include/comptrust/int4_layout.h).
//
//   y[m, n] = x[m, k] @ W^T,   W[j, kk] = (q[kk, j] - zero[g, j]) * scale[g, j],  g = kk / group_size
//
// Plain CUDA launchers over raw device pointers: no torch headers here, so nvcc can compile-check the
// kernels without a CUDA build of torch (csrc/cuda/quant_gemm_cuda_binding.cpp binds them to torch).
//
// All pointers are device pointers to contiguous row-major arrays:
//   x       [m, k]          activations (fp32, fp16 or bf16); any alignment (16-byte aligned is faster)
//   qweight [k/8, n]        int32, 8 input rows per word
//   qzeros  [groups, n/8]   int32, zero points stored as zero-1
//   scales  [groups, n]     fp16
//   y       [m, n]          output, same type as x; accumulated in fp32, rounded once at the end
// with groups = ceil(k / group_size) (the last group may be partial; group_size >= k is per-channel).
//
// Requirements (else cudaErrorInvalidValue, nothing launched): m >= 0; n > 0 and n % 8 == 0;
// k > 0 and k % 8 == 0; group_size > 0 and group_size % 8 == 0; non-null pointers when m > 0;
// n <= 65535 * 32 and k <= 2^30. m == 0 returns cudaSuccess without a launch.
// Returns cudaGetLastError() after the launch (the kernel itself runs asynchronously on `stream`).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

cudaError_t comptrust_int4_gemm_cuda(const float* x, const int32_t* qweight, const int32_t* qzeros,
                                     const __half* scales, float* y, int64_t m, int64_t n, int64_t k,
                                     int64_t group_size, cudaStream_t stream);

cudaError_t comptrust_int4_gemm_cuda(const __half* x, const int32_t* qweight, const int32_t* qzeros,
                                     const __half* scales, __half* y, int64_t m, int64_t n, int64_t k,
                                     int64_t group_size, cudaStream_t stream);

cudaError_t comptrust_int4_gemm_cuda(const __nv_bfloat16* x, const int32_t* qweight, const int32_t* qzeros,
                                     const __half* scales, __nv_bfloat16* y, int64_t m, int64_t n, int64_t k,
                                     int64_t group_size, cudaStream_t stream);
