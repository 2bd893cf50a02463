// The 2:4 tensor-core tile: fp16/bf16 x on sm_80's sparse mma (mma.sp m16n8k32), for m past the GEMVs.
// Shared by the float-values kernel (values stored in x's type) and the int4-values one.
//
// The sparse operand is the weight: A = W [n, k] (2:4 along k, which is what mma.sp wants of A), B = x^T
// and D = y^T, so a warp's fragments are 16 output columns x 8 rows of x. Our layout already is mma.sp's:
// A's compressed rows are the kept values in input order (sparse24_layout.h), and its metadata, per group
// of 4 inputs idx0 | idx1 << 2 with idx0 < idx1, groups in order from the low bits, is the 2-bit-index
// stream the instruction reads: a 16-bit load of the meta row gives one thread's share. Fragment
// ownership (PTX ISA, "sparse mma metadata 16832 f16/bf16"; g = lane / 4, t = lane % 4):
//   A (16 x 16 kept)  a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (32 x 8)        b_q = (inputs 2t + 8q .. +1, column g), q = 0..3
//   D (16 x 8, fp32)  d0, d1 = (g, 2t..2t+1), d2, d3 = (g+8, 2t..2t+1)
//   metadata          selector 0: lanes 4g and 4g+1 each give row g's 16 bits for kept values 8(lane%2)..+8
//                     in the low half and row g+8's in the high half (the other lanes' are ignored).
// A block of 128 threads owns 64 rows of x x 64 output columns; each of its 4 warps 32 x 32, i.e. 2 x 4
// mma.sp per k-step of 32 inputs. x is staged in shared memory (row-major, 16 activations per thread), the
// weight's kept values and metadata go from global memory straight into fragment registers (the two warps
// over the same 32 columns load the same ones, the second from L1), both fetched a step ahead. Where the kept values are quantized (ASource::kGrouped), A
// holds q - z (exact in fp16/bf16) and each group's scale is applied to the fp32 sums when it closes, as the
// GEMV kernels do. Not tuned on a GPU yet.
#pragma once

#include "activations.cuh"
#include "comptrust/int4_layout.h"
#include "comptrust/sparse24_layout.h"
#include "mma_common.cuh"

namespace comptrust {
namespace sparse24_mma {

constexpr int kTileM = 64;    // rows of x per block
constexpr int kTileN = 64;    // output columns per block
constexpr int kTileK = 32;    // inputs per k-step ...
constexpr int kStepKept = kTileK / 2;  // ... 16 kept values of each weight row
constexpr int kThreads = 128;
constexpr int kWarpEdge = 32;     // a warp's 32 x 32
constexpr int kATiles = kWarpEdge / 16;  // 16-column A fragments per warp
constexpr int kBTiles = kWarpEdge / 8;   // 8-row B fragments per warp
constexpr int kXsLd = kTileK + 8;  // padded row: the B-fragment reads of a warp hit 32 different banks
constexpr uint32_t kNoRowMeta = 0x4444u;  // rows past n: valid indices (0, 1) over zero values

// Whether the tile takes this k (whole steps) and, for quantized kept values, this group size (kept values
// per group: whole steps, or one group for the row).
inline bool fits(int64_t k) { return k % kTileK == 0; }
inline bool fits(int64_t k, int64_t group_size_kept) {
  return fits(k) && (group_size_kept >= k / 2 || group_size_kept % kStepKept == 0);
}

// d += A(a, e) . b on the sparse tensor cores, fp32 accumulators. Our indices are ordered (idx0 < idx1), which
// is what .sp::ordered_metadata asks; ptxas advises it over .sp from CUDA 12.5 on (.sp "is expected to have
// substantially reduced performance on some future architectures").
#if (__CUDACC_VER_MAJOR__ > 12) || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5)
#define COMPTRUST_MMA_SP "mma.sp::ordered_metadata"
#else
#define COMPTRUST_MMA_SP "mma.sp"
#endif
template <typename T>
__device__ __forceinline__ void mma_sp(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e);
template <>
__device__ __forceinline__ void mma_sp<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                               uint32_t e) {
  asm volatile(
      COMPTRUST_MMA_SP ".sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, "
      "{%0,%1,%2,%3}, %12, 0x0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}
template <>
__device__ __forceinline__ void mma_sp<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                      const uint32_t (&b)[4], uint32_t e) {
  asm volatile(
      COMPTRUST_MMA_SP ".sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, "
      "{%0,%1,%2,%3}, %12, 0x0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}

// ---------------------------------------------------------------------------------------- A sources
// `pairs(kb, r, t, p)`: weight row r's kept values 2t, 2t+1 (p[0]) and 2t+8, 2t+9 (p[1]) of step kb as
// fragment pairs, zero past n; `scale(g, r)`: the scale of group g on row r (kGrouped only).

// Kept values stored in x's own type (V == T): the fragments are the stored values themselves.
template <typename T>
struct ValuesA {
  static constexpr bool kGrouped = false;
  const T* values;  // [n, k/2], 4-byte aligned (the launcher checks)
  int n;
  int kept_per_row;
  int steps_per_group;  // the whole row: one "group" with scale 1
  __device__ __forceinline__ void pairs(int kb, int r, int t, uint32_t (&p)[2]) const {
    if (r >= n) {
      p[0] = p[1] = 0u;
      return;
    }
    const uint32_t* row = reinterpret_cast<const uint32_t*>(values + static_cast<int64_t>(r) * kept_per_row + kb * kStepKept);
    p[0] = __ldg(row + t);
    p[1] = __ldg(row + t + 4);
  }
  __device__ __forceinline__ float scale(int /*g*/, int /*r*/) const { return 1.f; }
};

// Kept values as GPTQ v1 int4 over the compact [n, k/2] matrix: qweight [k/16, n], a word per 8 kept values.
template <typename T>
struct Int4A {
  static constexpr bool kGrouped = true;
  const int32_t* qweight;
  const int32_t* qzeros;
  const __half* scales;
  int n;
  int steps_per_group;  // group_size (kept values) / 16, or the whole row
  __device__ __forceinline__ void pairs(int kb, int r, int t, uint32_t (&p)[2]) const {
    if (r >= n) {
      p[0] = p[1] = 0u;
      return;
    }
    const int zero = int4_zero_at(qzeros + static_cast<int64_t>(kb / steps_per_group) * (n / kInt4PerWord), r);
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // word 2kb holds kept values 0..7 of the step, word 2kb + 1 values 8..15
      const uint32_t word = static_cast<uint32_t>(__ldg(qweight + (2 * static_cast<int64_t>(kb) + h) * n + r));
      p[h] = small_int_pair<T>(int4_at(word, 2 * t) - zero, int4_at(word, 2 * t + 1) - zero);
    }
  }
  __device__ __forceinline__ float scale(int g, int r) const {
    return r < n ? __half2float(scales[static_cast<int64_t>(g) * n + r]) : 0.f;
  }
};

// Row r's metadata for kept values 8s .. 8s+7 of step kb: meta bytes 4kb + 2s and the next (k % 32 == 0
// keeps the 16-bit load aligned).
__device__ __forceinline__ uint32_t meta16(const uint8_t* __restrict__ meta, int meta_bytes, int n, int r, int kb,
                                           int s) {
  if (r >= n) return kNoRowMeta;
  return __ldg(reinterpret_cast<const unsigned short*>(meta + static_cast<int64_t>(r) * meta_bytes + 4 * kb + 2 * s));
}

// ------------------------------------------------------------------------------------------- kernel
template <typename T, class ASource>
__global__ void __launch_bounds__(kThreads)
    sparse24_mma_kernel(const T* __restrict__ x, ASource src, const uint8_t* __restrict__ meta, T* __restrict__ y,
                        int64_t m, int k, bool x_vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // never launched there: the launchers send GPUs before sm_80 to the FMA tile
#else
  __shared__ __align__(16) T xs[kTileM][kXsLd];

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int col0 = static_cast<int>(blockIdx.y) * kTileN;
  const int warp_m = (warp / 2) * kWarpEdge, warp_n = (warp % 2) * kWarpEdge;  // within the block's tile
  const int n = src.n;
  const int k_steps = k / kTileK, meta_bytes = k / kSparse24InputsPerMeta;

  // Weight rows of this lane's A fragments: row g (h = 0) and g + 8 (h = 1) of fragment i.
  int w_row[kATiles][2];
#pragma unroll
  for (int i = 0; i < kATiles; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) w_row[i][h] = col0 + warp_n + 16 * i + g + 8 * h;

  // x staging: 16 activations (half a step's row) per thread.
  const int x_row = tid / 2, x_half = tid % 2;
  const int64_t x_grow = row0 + x_row;

  uint4 x_next[2];
  uint32_t a_next[kATiles][4], e_next[kATiles];
  uint32_t a_cur[kATiles][4], e_cur[kATiles];
  auto fetch = [&](int kb) {
    if (x_grow < m) {
      load16(x + x_grow * k + static_cast<int64_t>(kb) * kTileK + x_half * (kTileK / 2), x_vec, x_next);
    } else {
      x_next[0] = x_next[1] = make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int i = 0; i < kATiles; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t p[2];
        src.pairs(kb, w_row[i][h], t, p);
        a_next[i][h] = p[0];      // a0 / a1: kept values 2t, 2t+1 of rows g / g+8
        a_next[i][2 + h] = p[1];  // a2 / a3: kept values 2t+8, 2t+9
      }
      e_next[i] = meta16(meta, meta_bytes, n, w_row[i][0], kb, lane % 2) |
                  meta16(meta, meta_bytes, n, w_row[i][1], kb, lane % 2) << 16;
    }
  };
  auto store = [&]() {
    uint4* dst = reinterpret_cast<uint4*>(&xs[x_row][x_half * (kTileK / 2)]);  // 16-byte aligned: kXsLd * 2 = 80
    dst[0] = x_next[0];
    dst[1] = x_next[1];
#pragma unroll
    for (int i = 0; i < kATiles; ++i) {
#pragma unroll
      for (int q = 0; q < 4; ++q) a_cur[i][q] = a_next[i][q];
      e_cur[i] = e_next[i];
    }
  };

  float d[kATiles][kBTiles][4];    // the current group's sums
  float out[kATiles][kBTiles][4];  // sum over closed groups of scale * d
#pragma unroll
  for (int i = 0; i < kATiles; ++i)
#pragma unroll
    for (int j = 0; j < kBTiles; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) d[i][j][c] = out[i][j][c] = 0.f;

  fetch(0);
  store();
  __syncthreads();
  for (int kb = 0; kb < k_steps; ++kb) {
    const bool more = kb + 1 < k_steps;  // block-uniform, so the barriers below are safe
    if (more) fetch(kb + 1);
#pragma unroll
    for (int j = 0; j < kBTiles; ++j) {
      const T* x_row_j = xs[warp_m + 8 * j + g];
      uint32_t b[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) b[q] = *reinterpret_cast<const uint32_t*>(x_row_j + 2 * t + 8 * q);
#pragma unroll
      for (int i = 0; i < kATiles; ++i) mma_sp<T>(d[i][j], a_cur[i], b, e_cur[i]);
    }
    if (!more || (kb + 1) % src.steps_per_group == 0) {  // a group closes: block-uniform
      const int group = kb / src.steps_per_group;
#pragma unroll
      for (int i = 0; i < kATiles; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float s = ASource::kGrouped ? src.scale(group, w_row[i][h]) : 1.f;
#pragma unroll
          for (int j = 0; j < kBTiles; ++j)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              out[i][j][2 * h + c] = fmaf(s, d[i][j][2 * h + c], out[i][j][2 * h + c]);
              d[i][j][2 * h + c] = 0.f;
            }
        }
    }
    __syncthreads();  // everyone is done reading this step's xs
    if (more) {
      store();
      __syncthreads();
    }
  }

  // y[row][col] = D[col][row]: d0, d1 at rows 2t, 2t+1 of the B tile, column g; d2, d3 at column g + 8.
#pragma unroll
  for (int i = 0; i < kATiles; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int col = w_row[i][h];
      if (col >= n) continue;
#pragma unroll
      for (int j = 0; j < kBTiles; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int64_t row = row0 + warp_m + 8 * j + 2 * t + c;
          if (row < m) y[row * n + col] = Act<T>::from_float(out[i][j][2 * h + c]);
        }
    }
#endif
}

// Grid: row tiles along x (up to 2^31 - 1), column tiles along y; the caller checked n <= 65535 * 64.
template <typename T, class ASource>
cudaError_t launch(const T* x, const ASource& src, const uint8_t* meta, T* y, int64_t m, int k, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((m + kTileM - 1) / kTileM), static_cast<unsigned>((src.n + kTileN - 1) / kTileN));
  const bool x_vec = reinterpret_cast<uintptr_t>(x) % 16 == 0;
  sparse24_mma_kernel<T, ASource><<<grid, kThreads, 0, stream>>>(x, src, meta, y, m, k, x_vec);
  return cudaGetLastError();
}

}  // namespace sparse24_mma
}  // namespace comptrust
