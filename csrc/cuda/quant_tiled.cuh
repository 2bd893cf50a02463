// What the int4 and int3 CUDA kernels share for larger m (prefill and batches past the GEMVs): two tiled
// GEMMs over a 64 x 64 tile of y that step k by 32 inputs (one int3 block, four int4 word rows) and
// dequantize each step's 32 x 64 weight slice into shared memory. 32 is also the smallest group size these
// paths take (fits below), so a step never straddles two groups. The codes' layout comes in as a
// policy, Int4Codes or Int3Codes: which words hold a column's 32 codes of a step, and its zero point.
//
// FMA tile (fp32 x; fp16/bf16 x on GPUs before sm_80): 256 threads, each 4 x 4 outputs from shared memory.
//   The slice is dequantized to fp32 (q - z) * s, bit for bit the weight comptrust.reference builds, so y
//   differs from the reference only in summation order.
// Tensor-core tile (fp16/bf16 x on sm_80+): 128 threads, four warps of 32 x 32 outputs on WMMA 16x16x16
//   fragments with fp32 accumulators. The slice holds q - z itself (integers of at most 15 in magnitude:
//   exact in fp16 and bf16) and x as given, so every product is exact and the sums are fp32. When a group
//   closes, each warp moves its accumulators through shared memory once and adds s * acc into per-lane
//   fp32 totals (lane c owns column c of the warp's 32 x 32): the GEMV kernels' arithmetic (sum x (q - z) per
//   group, then its scale) in another summation order, at the tensor cores' rate (an FMA tile would run at the
//   FMA units' fraction of it).
// Both: the next step's global loads are issued into registers before this step's multiplies, so their
// latency hides behind the arithmetic. Neither is tuned on a GPU yet.
#pragma once

#include <mma.h>

#include "activations.cuh"
#include "mma_common.cuh"
#include "comptrust/int3_layout.h"
#include "comptrust/int4_layout.h"

namespace comptrust {
namespace quant_tiled {

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 32;  // inputs per k-step

// Whether the tiled GEMMs take this k and group size: whole steps, and groups of whole steps (a group
// size >= k is one group, per channel).
inline bool fits(int64_t k, int64_t group_size) {
  return k % kTileK == 0 && (group_size >= k || group_size % kTileK == 0);
}

// --------------------------------------------------------------------------------------- code layouts
// Each thread decodes kCount consecutive codes (part * kCount ..) of one column's 32 in a step.
struct Int4Codes {
  static constexpr int kWordsPerStep = kTileK / kInt4PerWord;  // 4 word rows
  template <int kCount>
  struct Regs {
    uint32_t w[kCount / kInt4PerWord];
  };
  template <int kCount>
  static __device__ __forceinline__ void load(Regs<kCount>& r, const int32_t* __restrict__ qweight, int kb,
                                              int part, int col, int n, bool ok) {
#pragma unroll
    for (int i = 0; i < kCount / kInt4PerWord; ++i) {
      const int64_t word_row = static_cast<int64_t>(kb) * kWordsPerStep + part * (kCount / kInt4PerWord) + i;
      r.w[i] = ok ? static_cast<uint32_t>(__ldg(qweight + word_row * n + col)) : 0u;
    }
  }
  template <int kCount>  // v: 0 .. kCount-1 of this thread's codes
  static __device__ __forceinline__ int at(const Regs<kCount>& r, int /*part*/, int v) {
    return int4_at(r.w[v / kInt4PerWord], v % kInt4PerWord);
  }
  static __device__ __forceinline__ int zero(const int32_t* __restrict__ qzeros, int64_t g, int n, int col) {
    return int4_zero_at(qzeros + g * (n / kInt4PerWord), col);
  }
};

struct Int3Codes {
  template <int kCount>
  struct Regs {
    uint32_t w[kInt3WordsPerBlock];  // the step's whole block: its codes straddle words
  };
  template <int kCount>
  static __device__ __forceinline__ void load(Regs<kCount>& r, const int32_t* __restrict__ qweight, int kb,
                                              int /*part*/, int col, int n, bool ok) {
#pragma unroll
    for (int w = 0; w < kInt3WordsPerBlock; ++w) {
      const int64_t word_row = static_cast<int64_t>(kb) * kInt3WordsPerBlock + w;
      r.w[w] = ok ? static_cast<uint32_t>(__ldg(qweight + word_row * n + col)) : 0u;
    }
  }
  template <int kCount>
  static __device__ __forceinline__ int at(const Regs<kCount>& r, int part, int v) {
    return int3_at(r.w[0], r.w[1], r.w[2], part * kCount + v);
  }
  static __device__ __forceinline__ int zero(const int32_t* __restrict__ qzeros, int64_t g, int n, int col) {
    return int3_zero_at(qzeros + g * (n / kInt3PerBlock * kInt3WordsPerBlock), col);
  }
};

// What every tiled kernel takes: k_steps = k / 32; steps_per_group = min(group_size, k) / 32 (>= 1).
struct QuantWeights {
  const int32_t* qweight;
  const int32_t* qzeros;
  const __half* scales;
  int n;
  int k_steps;
  int steps_per_group;
};

// ------------------------------------------------------------------------------------------- FMA tile
constexpr int kFmaThreads = 256;
constexpr int kThreadEdge = 16;                               // threads arranged 16 x 16 over the tile ...
constexpr int kMicro = kTileM / kThreadEdge;                  // ... each computing rows ty + 16i, cols tx + 16j
constexpr int kFmaXPerThread = kTileM * kTileK / kFmaThreads;  // 8 activations staged per thread per step
constexpr int kFmaWPerThread = kTileK * kTileN / kFmaThreads;  // 8 codes dequantized per thread per step
static_assert(kTileM == kTileN && kMicro * kThreadEdge == kTileM, "square tile, 16 x 16 threads");
static_assert(kFmaThreads % kTileK == 0 && kFmaThreads % kTileN == 0, "staging roles");
static_assert(kFmaWPerThread % kInt4PerWord == 0, "an int4 thread's codes are whole words");

// y[row0 .. row0+64, col0 .. col0+64) for one (row tile, column tile).
template <typename T, typename Codes>
__global__ void __launch_bounds__(kFmaThreads, 2)
    fma_tiled_kernel(const T* __restrict__ x, QuantWeights wt, T* __restrict__ y, int64_t m) {
  // x is stored k-major so the inner loop reads a row of 4 activations per k; the +1 pad spreads the
  // transposing stores (a warp writes 32 k values of one row) over all 32 banks instead of one.
  __shared__ float xs[kTileK][kTileM + 1];
  __shared__ float ws[kTileK][kTileN];  // dequantized weights, k-major

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % kThreadEdge, ty = tid / kThreadEdge;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int col0 = static_cast<int>(blockIdx.y) * kTileN;
  const int n = wt.n;
  const int64_t k = static_cast<int64_t>(wt.k_steps) * kTileK;

  // Staging roles. x: input x_kk of rows x_r0 + 8i, so a warp reads 32 consecutive activations of a row.
  const int x_kk = tid % kTileK;
  const int x_r0 = tid / kTileK;
  // Weights: codes 8*w_part .. 8*w_part+7 of column w_col (w_part is warp-uniform). A 64-wide tile can
  // overhang n (a multiple of 8 or 32 only); those columns read as zero weights and are not stored.
  const int w_col = tid % kTileN;
  const int w_part = tid / kTileN;
  const int w_gcol = col0 + w_col;
  const bool w_col_ok = w_gcol < n;

  // One k-step's global data, fetched a step ahead.
  float x_reg[kFmaXPerThread];
  typename Codes::template Regs<kFmaWPerThread> w_reg;
  float s_reg = 0.f;
  int z_reg = 0;

  auto fetch = [&](int kb) {
#pragma unroll
    for (int i = 0; i < kFmaXPerThread; ++i) {
      const int64_t row = row0 + x_r0 + i * (kFmaThreads / kTileK);
      x_reg[i] = row < m ? Act<T>::to_float(x[row * k + static_cast<int64_t>(kb) * kTileK + x_kk]) : 0.f;
    }
    Codes::load(w_reg, wt.qweight, kb, w_part, w_gcol, n, w_col_ok);
    if (w_col_ok) {
      const int64_t g = kb / wt.steps_per_group;
      s_reg = __half2float(wt.scales[g * n + w_gcol]);
      z_reg = Codes::zero(wt.qzeros, g, n, w_gcol);
    }
  };
  auto store = [&]() {
#pragma unroll
    for (int i = 0; i < kFmaXPerThread; ++i) xs[x_kk][x_r0 + i * (kFmaThreads / kTileK)] = x_reg[i];
#pragma unroll
    for (int i = 0; i < kFmaWPerThread; ++i)  // (q - z) exactly, then one rounding: the reference's fp32 weight
      ws[w_part * kFmaWPerThread + i][w_col] = static_cast<float>(Codes::at(w_reg, w_part, i) - z_reg) * s_reg;
  };

  float acc[kMicro][kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = 0.f;

  fetch(0);
  store();
  __syncthreads();
  for (int kb = 0; kb < wt.k_steps; ++kb) {
    const bool more = kb + 1 < wt.k_steps;  // block-uniform, so the barriers below are safe
    if (more) fetch(kb + 1);
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      // Two rows of threads per warp: xs reads broadcast two addresses, ws reads 16 consecutive floats.
      float a[kMicro], b[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) a[i] = xs[kk][ty + i * kThreadEdge];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) b[j] = ws[kk][tx + j * kThreadEdge];
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();  // everyone is done reading this step's tiles
    if (more) {
      store();
      __syncthreads();
    }
  }

#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t row = row0 + ty + i * kThreadEdge;
    if (row >= m) continue;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int c = col0 + tx + j * kThreadEdge;
      if (c < n) y[row * n + c] = Act<T>::from_float(acc[i][j]);
    }
  }
}

// ----------------------------------------------------------------------------------- tensor-core tile
constexpr int kMmaWarps = 4;                      // 2 x 2 warps ...
constexpr int kMmaThreads = kMmaWarps * 32;
constexpr int kWarpTile = 32;                     // ... of 32 x 32 outputs each
constexpr int kFrag = 16;                         // WMMA m16n16k16
constexpr int kFragsPerWarp = kWarpTile / kFrag;  // 2 x 2 accumulator fragments
constexpr int kMmaXPerThread = kTileM * kTileK / kMmaThreads;  // 16 activations: half a row's step
constexpr int kMmaWPerThread = kTileK * kTileN / kMmaThreads;  // 16 codes of one column
// Row pads keep WMMA's rules (ldm a multiple of 8 halves / 4 floats, fragment pointers 32-byte aligned)
// and move consecutive rows to other banks.
constexpr int kXsLd = kTileK + 8;
constexpr int kWsLd = kTileN + 8;
constexpr int kFlushLd = kWarpTile + 4;
static_assert(kTileM == 2 * kWarpTile && kTileN == 2 * kWarpTile, "2 x 2 warps cover the tile");
static_assert(kMmaXPerThread == kTileK / 2 && kMmaWPerThread * 2 == kTileK, "staging roles");
static_assert(kMmaWPerThread % kInt4PerWord == 0, "an int4 thread's codes are whole words");

template <typename T, typename Codes>
__global__ void __launch_bounds__(kMmaThreads)
    mma_tiled_kernel(const T* __restrict__ x, QuantWeights wt, T* __restrict__ y, int64_t m, bool x_vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // never launched there: the launcher sends GPUs before sm_80 to the FMA tile
#else
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) T xs[kTileM][kXsLd];              // A: rows of x, row-major
  __shared__ __align__(32) T ws[kTileK][kWsLd];              // B: q - z, k-major (row-major k x n)
  __shared__ __align__(32) float flush[kMmaWarps][kWarpTile][kFlushLd];  // a closing group's sums

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32, warp = tid / 32;
  const int warp_row = (warp / 2) * kWarpTile, warp_col = (warp % 2) * kWarpTile;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int col0 = static_cast<int>(blockIdx.y) * kTileN;
  const int n = wt.n;
  const int64_t k = static_cast<int64_t>(wt.k_steps) * kTileK;

  // Staging roles. x: half a row's step (16 activations) per thread. Weights: codes 16*w_part ..
  // 16*w_part+15 of column w_col; columns past n (the tile can overhang n) read as zero weights.
  const int x_row = tid / 2, x_half = tid % 2;
  const int64_t x_grow = row0 + x_row;
  const int w_col = tid % kTileN, w_part = tid / kTileN;
  const int w_gcol = col0 + w_col;
  const bool w_col_ok = w_gcol < n;
  // Output: lane owns column out_col of its warp's 32 x 32, rows warp_row + r.
  const int out_col = col0 + warp_col + lane;
  const bool out_col_ok = out_col < n;

  uint4 x_reg[2];
  typename Codes::template Regs<kMmaWPerThread> w_reg;
  int z_reg = 0;
  auto fetch = [&](int kb) {
    if (x_grow < m) {
      load16(x + x_grow * k + static_cast<int64_t>(kb) * kTileK + x_half * kMmaXPerThread, x_vec, x_reg);
    } else {
      x_reg[0] = x_reg[1] = make_uint4(0u, 0u, 0u, 0u);
    }
    Codes::load(w_reg, wt.qweight, kb, w_part, w_gcol, n, w_col_ok);
    if (w_col_ok) z_reg = Codes::zero(wt.qzeros, kb / wt.steps_per_group, n, w_gcol);
  };
  auto store = [&]() {
    uint4* dst = reinterpret_cast<uint4*>(&xs[x_row][x_half * kMmaXPerThread]);  // 16-byte aligned: kXsLd * 2 = 80
    dst[0] = x_reg[0];
    dst[1] = x_reg[1];
#pragma unroll
    for (int i = 0; i < kMmaWPerThread; ++i)
      ws[w_part * kMmaWPerThread + i][w_col] = small_int_as<T>(w_col_ok ? Codes::at(w_reg, w_part, i) - z_reg : 0);
  };

  wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[kFragsPerWarp][kFragsPerWarp];
#pragma unroll
  for (int i = 0; i < kFragsPerWarp; ++i)
#pragma unroll
    for (int j = 0; j < kFragsPerWarp; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  float out[kWarpTile];  // sum over closed groups of s * acc, rows warp_row + r of column out_col
#pragma unroll
  for (int r = 0; r < kWarpTile; ++r) out[r] = 0.f;

  fetch(0);
  store();
  __syncthreads();
  for (int kb = 0; kb < wt.k_steps; ++kb) {
    const bool more = kb + 1 < wt.k_steps;  // block-uniform, so the barriers below are safe
    const bool closes = !more || (kb + 1) % wt.steps_per_group == 0;
    float scale = 0.f;  // the closing group's, loaded before the multiplies so its latency hides behind them
    if (closes && out_col_ok) scale = __half2float(wt.scales[static_cast<int64_t>(kb / wt.steps_per_group) * n + out_col]);
    if (more) fetch(kb + 1);
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += kFrag) {
      wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major> a[kFragsPerWarp];
      wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::row_major> b[kFragsPerWarp];
#pragma unroll
      for (int i = 0; i < kFragsPerWarp; ++i) wmma::load_matrix_sync(a[i], &xs[warp_row + i * kFrag][kk], kXsLd);
#pragma unroll
      for (int j = 0; j < kFragsPerWarp; ++j) wmma::load_matrix_sync(b[j], &ws[kk][warp_col + j * kFrag], kWsLd);
#pragma unroll
      for (int i = 0; i < kFragsPerWarp; ++i)
#pragma unroll
        for (int j = 0; j < kFragsPerWarp; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    if (closes) {  // block-uniform
#pragma unroll
      for (int i = 0; i < kFragsPerWarp; ++i)
#pragma unroll
        for (int j = 0; j < kFragsPerWarp; ++j) {
          wmma::store_matrix_sync(&flush[warp][i * kFrag][j * kFrag], acc[i][j], kFlushLd, wmma::mem_row_major);
          wmma::fill_fragment(acc[i][j], 0.f);
        }
      __syncwarp();
#pragma unroll
      for (int r = 0; r < kWarpTile; ++r) out[r] = fmaf(scale, flush[warp][r][lane], out[r]);
      __syncwarp();  // read before the next group's store
    }
    __syncthreads();  // everyone is done reading this step's tiles
    if (more) {
      store();
      __syncthreads();
    }
  }

  if (out_col_ok) {
#pragma unroll
    for (int r = 0; r < kWarpTile; ++r) {
      const int64_t row = row0 + warp_row + r;
      if (row < m) y[row * n + out_col] = Act<T>::from_float(out[r]);
    }
  }
#endif
}

// --------------------------------------------------------------------------------------------- launch
// The tiled GEMM for m rows (the caller checked fits(k, group_size), n, m and the pointers).
template <typename T, typename Codes>
cudaError_t launch(const T* x, const QuantWeights& wt, T* y, int64_t m, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((m + kTileM - 1) / kTileM), static_cast<unsigned>((wt.n + kTileN - 1) / kTileN));
  if constexpr (sizeof(T) == 2) {
    if (tensor_cores_usable()) {
      const bool x_vec = reinterpret_cast<uintptr_t>(x) % 16 == 0;
      mma_tiled_kernel<T, Codes><<<grid, kMmaThreads, 0, stream>>>(x, wt, y, m, x_vec);
      return cudaGetLastError();
    }
  }
  fma_tiled_kernel<T, Codes><<<grid, kFmaThreads, 0, stream>>>(x, wt, y, m);
  return cudaGetLastError();
}

}  // namespace quant_tiled
}  // namespace comptrust
