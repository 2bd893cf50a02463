// CUDA 2:4 semi-structured sparse GEMM/GEMV over the storage layout of comptrust/formats/sparse24.py
// (csrc/include/comptrust/sparse24_layout.h):
//
//   y[m, n] = x[m, k] @ W^T,   W [n, k] 2:4, given by its kept values and their positions (meta)
//
// Plain CUDA launchers over raw device pointers: no torch headers here, so nvcc can compile-check the
// kernels without a CUDA build of torch (csrc/cuda/sparse24_gemm_cuda_binding.cpp binds them to torch).
//
// All pointers are device pointers to contiguous row-major arrays:
//   x       [m, k]          activations T (fp32, fp16 or bf16); any alignment (16-byte aligned is faster)
//   meta    [n, k/8]        uint8, two groups of 4 inputs per byte
//   y       [m, n]          output, type T; accumulated in fp32, rounded once at the end
// and the kept values either as
//   values  [n, k/2]        V (fp32, fp16 or bf16; need not match T)             comptrust_sparse24_gemm_cuda
// or as GPTQ v1 int4 over the compact [n, k/2] matrix                      comptrust_sparse24_int4_gemm_cuda
//   qweight [k/16, n]       int32, 8 kept values per word
//   qzeros  [groups, n/8]   int32, zero points stored as zero-1
//   scales  [groups, n]     fp16,  groups = ceil((k/2) / group_size), group_size counted in kept values
//
// Requirements (else cudaErrorInvalidValue, nothing launched): m >= 0; n > 0; k > 0 and k % 8 == 0
// (int4: k % 16 == 0, n % 8 == 0, group_size > 0 and group_size % 8 == 0); non-null pointers when m > 0;
// n <= 65535 * 64 and k <= 2^30. m == 0 returns cudaSuccess without a launch.
// Returns cudaGetLastError() after the launch (the kernel itself runs asynchronously on `stream`).
//
// The launchers are templates instantiated (in the .cu files) for exactly the types listed below.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

template <typename T, typename V>
cudaError_t comptrust_sparse24_gemm_cuda(const T* x, const V* values, const uint8_t* meta, T* y, int64_t m,
                                         int64_t n, int64_t k, cudaStream_t stream);

template <typename T>
cudaError_t comptrust_sparse24_int4_gemm_cuda(const T* x, const int32_t* qweight, const int32_t* qzeros,
                                              const __half* scales, const uint8_t* meta, T* y, int64_t m, int64_t n,
                                              int64_t k, int64_t group_size, cudaStream_t stream);

#define COMPTRUST_SPARSE24_GEMM_TYPES(X) \
  X(float, float)                         \
  X(float, __half)                        \
  X(float, __nv_bfloat16)                 \
  X(__half, float)                        \
  X(__half, __half)                       \
  X(__half, __nv_bfloat16)                \
  X(__nv_bfloat16, float)                 \
  X(__nv_bfloat16, __half)                \
  X(__nv_bfloat16, __nv_bfloat16)

#define COMPTRUST_SPARSE24_DECLARE(T, V)                                                                   \
  extern template cudaError_t comptrust_sparse24_gemm_cuda<T, V>(const T*, const V*, const uint8_t*, T*, \
                                                                 int64_t, int64_t, int64_t, cudaStream_t);
COMPTRUST_SPARSE24_GEMM_TYPES(COMPTRUST_SPARSE24_DECLARE)
#undef COMPTRUST_SPARSE24_DECLARE

extern template cudaError_t comptrust_sparse24_int4_gemm_cuda<float>(const float*, const int32_t*, const int32_t*,
                                                                     const __half*, const uint8_t*, float*, int64_t,
                                                                     int64_t, int64_t, int64_t, cudaStream_t);
extern template cudaError_t comptrust_sparse24_int4_gemm_cuda<__half>(const __half*, const int32_t*,
                                                                      const int32_t*, const __half*,
                                                                      const uint8_t*, __half*, int64_t, int64_t,
                                                                      int64_t, int64_t, cudaStream_t);
extern template cudaError_t comptrust_sparse24_int4_gemm_cuda<__nv_bfloat16>(
    const __nv_bfloat16*, const int32_t*, const int32_t*, const __half*, const uint8_t*, __nv_bfloat16*, int64_t,
    int64_t, int64_t, int64_t, cudaStream_t);
