// What the two CUDA 2:4 kernels (float values, int4 values) share: the tiled path for larger m, which
// expands each 2:4 weight tile into a dense fp32 tile in shared memory and multiplies it with FMAs, and
// small helpers for reading kept values and choosing among the inputs their meta points at.
//
// Tiled path: a block of 256 threads owns a kTileM x kTileN tile of y. Per kTileK slice of the inputs it
//   * stages x[rows, slice] as fp32, transposed (xs[kk][row]), one 8-input load per thread;
//   * has the WeightTile fill ws[kk][col] with the dense weight slice: one thread per (column, meta byte),
//     so it decodes one meta byte and writes 8 dense entries, the 2 x 2 kept ones and 4 zeros;
//   * accumulates a 4 x 4 register block per thread from shared memory.
// Rows are padded to 65 floats: the transposed writes (8 rows x 4 chunks per warp) and the weight writes
// (8 columns x 4 bytes per warp) then land in 32 different banks, and the reads are broadcasts or
// consecutive. The zeros cost FMAs; what the format saves here is memory traffic, and the GEMV path
// (m <= 8), which does skip them, is where the traffic dominates.
#pragma once

#include "activations.cuh"
#include "comptrust/sparse24_layout.h"

namespace comptrust {

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 32;                                   // 4 meta bytes per column
constexpr int kTileThreads = 256;
constexpr int kTileBytes = kTileK / kSparse24InputsPerMeta;  // meta bytes per column per slice
constexpr int kTilePad = kTileM + 1;
static_assert(kTileN * kTileBytes == kTileThreads, "one thread per (column, meta byte) of a weight slice");
static_assert(kTileM * kTileK / 8 == kTileThreads, "one 8-input x load per thread per slice");
static_assert(kTileM == kTileN, "xs and ws share the padded row length");

// Four consecutive kept values as fp32. `vec`: p is aligned to 4 elements of V (callers check the base
// pointer; every offset they use is a multiple of 4 elements).
__device__ __forceinline__ void load4(const float* __restrict__ p, bool vec, float (&v)[4]) {
  if (vec) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = __ldg(p + i);
  }
}

__device__ __forceinline__ void load4(const __half* __restrict__ p, bool vec, float (&v)[4]) {
  if (vec) {
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
    const uint32_t words[2] = {raw.x, raw.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // element 2i in the low half of word i (little-endian)
      v[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[i] & 0xFFFFu)));
      v[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[i] >> 16)));
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = __half2float(p[i]);
  }
}

__device__ __forceinline__ void load4(const __nv_bfloat16* __restrict__ p, bool vec, float (&v)[4]) {
  if (vec) {
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
    const uint32_t words[2] = {raw.x, raw.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // bf16 is the top half of an fp32: widening is a shift, exact
      v[2 * i] = __uint_as_float(words[i] << 16);
      v[2 * i + 1] = __uint_as_float(words[i] & 0xFFFF0000u);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = __bfloat162float(p[i]);
  }
}

// a[idx] for idx in 0..3 with selects rather than a dynamically indexed (local-memory) array.
__device__ __forceinline__ float pick4(float a0, float a1, float a2, float a3, int idx) {
  const float lo = (idx & 1) ? a1 : a0;
  const float hi = (idx & 1) ? a3 : a2;
  return (idx & 2) ? hi : lo;
}

// Dense input p (0..7) of a meta byte: kept value `kept[2h + t]` when position p % 4 of group h = p / 4
// is that group's idx_t, else `zero`. Used to expand a byte's 4 kept values (floats or int4 codes).
template <typename Q>
__device__ __forceinline__ Q expand_kept(uint32_t meta_byte, int p, const Q (&kept)[4], Q zero) {
  const int h = p / kSparse24Group, pos = p % kSparse24Group;
  if (sparse24_position(meta_byte, h, 0) == pos) return kept[2 * h];
  if (sparse24_position(meta_byte, h, 1) == pos) return kept[2 * h + 1];
  return zero;
}

// WeightTile: a struct with `__device__ void fill(float (*ws)[kTilePad], int k0, int col0, int c, int b)
// const` that writes ws[8b .. 8b+8)[c], the dense weights of column col0 + c at inputs k0 + 8b .. + 8
// (zeros past n or k).
template <typename T, class WeightTile>
__global__ void __launch_bounds__(kTileThreads)
    sparse24_tiled_kernel(const T* __restrict__ x, WeightTile weights, T* __restrict__ y, int64_t m, int n, int k,
                          bool x_vec) {
  __shared__ float xs[kTileK][kTilePad];  // x slice, transposed
  __shared__ float ws[kTileK][kTilePad];  // dense weight slice

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16, ty = tid / 16;  // this thread's outputs: rows ty + 16i, columns tx + 16j
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int col0 = static_cast<int>(blockIdx.y) * kTileN;
  const int x_row = tid / 4, x_chunk = tid % 4;               // the 8 inputs this thread stages
  const int w_col = tid / kTileBytes, w_byte = tid % kTileBytes;  // the meta byte this thread expands

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int k0 = 0; k0 < k; k0 += kTileK) {
    {
      const int64_t row = row0 + x_row;
      const int kk = k0 + 8 * x_chunk;
      float v[8];
      if (row < m && kk < k) {  // k % 8 == 0: an 8-input chunk is wholly in or out
        load8(x + row * k + kk, x_vec, v);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) xs[8 * x_chunk + i][x_row] = v[i];
    }
    weights.fill(ws, k0, col0, w_col, w_byte);
    __syncthreads();

#pragma unroll 8
    for (int kk = 0; kk < kTileK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = xs[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = ws[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();  // before the next slice overwrites xs and ws
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = row0 + ty + 16 * i;
    if (row >= m) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = col0 + tx + 16 * j;
      if (col < n) y[row * n + col] = Act<T>::from_float(acc[i][j]);
    }
  }
}

// Grid of the tiled path; the caller has checked n <= 65535 * kTileN (gridDim.y).
inline dim3 sparse24_tiled_grid(int64_t m, int64_t n) {
  return dim3(static_cast<unsigned>((m + kTileM - 1) / kTileM), static_cast<unsigned>((n + kTileN - 1) / kTileN));
}

inline bool aligned_to(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }
inline bool aligned16(const void* p) { return aligned_to(p, 16); }

}  // namespace comptrust
