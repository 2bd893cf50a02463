// What the tensor-core tiles (quant_tiled.cuh, sparse24_mma.cuh) share: staging 16-bit activations, exact
// small integers in fp16/bf16, and the run-time check that the GPU has the sm_80 instructions they use.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace comptrust {

// 16 consecutive fp16/bf16 activations as two 16-byte words. `vec`: p is 16-byte aligned (callers stage
// 16-element slices of rows whose length is a multiple of 32, so an aligned x keeps every slice aligned).
template <typename T>
__device__ __forceinline__ void load16(const T* __restrict__ p, bool vec, uint4 (&v)[2]) {
  static_assert(sizeof(T) == 2, "fp16 / bf16");
  if (vec) {
    v[0] = __ldg(reinterpret_cast<const uint4*>(p));
    v[1] = __ldg(reinterpret_cast<const uint4*>(p) + 1);
  } else {
    const unsigned short* q = reinterpret_cast<const unsigned short*>(p);
    uint32_t w[8];
#pragma unroll
    for (int i = 0; i < 8; ++i)  // element 2i in the low half of word i (little-endian)
      w[i] = static_cast<uint32_t>(__ldg(q + 2 * i)) | static_cast<uint32_t>(__ldg(q + 2 * i + 1)) << 16;
    v[0] = make_uint4(w[0], w[1], w[2], w[3]);
    v[1] = make_uint4(w[4], w[5], w[6], w[7]);
  }
}

// An exact small integer (|v| <= 256: every int4/int3 code minus its zero point) as fp16 / bf16, and two of
// them as the 32-bit pair an mma fragment register holds (the first in the low half).
template <typename T>
__device__ __forceinline__ T small_int_as(int v);
template <>
__device__ __forceinline__ __half small_int_as<__half>(int v) { return __int2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 small_int_as<__nv_bfloat16>(int v) { return __int2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ uint32_t small_int_pair(int lo, int hi) {
  const T a = small_int_as<T>(lo), b = small_int_as<T>(hi);
  return static_cast<uint32_t>(*reinterpret_cast<const unsigned short*>(&a)) |
         static_cast<uint32_t>(*reinterpret_cast<const unsigned short*>(&b)) << 16;
}

// Whether the current device runs the tensor-core tiles: their bf16 WMMA and mma.sp need sm_80 (fp16 takes
// the same path). The kernels themselves trap when built for an older architecture.
inline bool tensor_cores_usable() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  return major >= 8;
}

}  // namespace comptrust
