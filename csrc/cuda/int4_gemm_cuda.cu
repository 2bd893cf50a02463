// CUDA int4 x float GEMM/GEMV over the GPTQ v1 layout (csrc/include/comptrust/int4_layout.h).
//
// GEMV-style kernel for m <= kGemvMaxRows, and for any m where the tiled GEMMs do not fit (k or the group
// size not a multiple of 32); the tiled GEMMs for larger m are quant_tiled.cuh's (fp32 FMA tile, fp16/bf16
// on the tensor cores), shared with the int3 kernels.
//
// Work split
//   * A block owns kColsPerBlock = 32 output columns (one per lane) and R rows of x (R in 1, 2, 4, 8,
//     picked from m). Row blocks run along grid.x (up to 2^31 - 1 of them, so m can be very large),
//     column tiles along grid.y. Neighbouring blocks share a column tile, so its weights stay in L2.
//   * The kWarps warps of a block split k into contiguous slices (split-K inside the block, reduced
//     through shared memory at the end: deterministic, no atomics, no workspace). This keeps enough
//     loads in flight for the memory-bound GEMV case (m = 1) even when n is small.
//   * A warp reads one qweight word row across its 32 columns per step: 128 contiguous bytes, coalesced.
//     It loads kChunkWords word rows at once (independent loads in flight), stages the matching
//     R x (8 * kChunkWords) slice of x in shared memory as fp32, then every lane reads the staged x
//     by broadcast.
//
// Arithmetic: the CPU kernel computes s * (sum x*q - z * sum x). Here the zero point is folded into
// the nibble's conversion instead, which is exact and costs nothing extra: with the float 2^23 built
// by bits (0x4B000000 | q) == 2^23 + q, adding -(2^23 + z) gives exactly q - z. So per group we
// accumulate acc = sum x * (q - z) and apply the scale once at the end of the group: out += s * acc.
// Same result as s * (sum x*q - z * sum x) in exact arithmetic, with no per-row sum of x and no
// cancellation between the two terms; no int->float conversion instruction in the inner loop.
#include <climits>

#include "activations.cuh"
#include "comptrust/int4_layout.h"
#include "int4_gemm_cuda.cuh"
#include "quant_tiled.cuh"

namespace comptrust {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 8;                     // split-K ways inside a block
constexpr int kThreads = kWarps * kWarpSize;  // 256
constexpr int kColsPerBlock = kWarpSize;      // one output column per lane
constexpr int kChunkWords = 8;                // word rows (8 inputs each) loaded per step
constexpr int kChunkInputs = kChunkWords * kInt4PerWord;
constexpr int kMaxRows = 8;                   // rows of x per block
constexpr int kMaxColTiles = 65535;           // gridDim.y limit
// Rows up to which this kernel runs; above, where quant_tiled::fits, the tiled GEMMs of quant_tiled.cuh
// (this kernel would re-read the weights from L2 once per 8 rows, a 64-row tile reuses each 64 times).
// The int3 kernels' threshold; not yet measured on a GPU.
constexpr int64_t kGemvMaxRows = 32;
constexpr uint32_t kFloatTwo23Bits = 0x4B000000u;  // bits of 2^23: (bits | q) as float == 2^23 + q
constexpr float kFloatTwo23 = 8388608.0f;

// Occupancy hint to ptxas per row count: caps registers at 64 (R <= 2: GEMV, latency bound, wants many
// warps in flight), 85 (R = 4) and 128 (R = 8), spill-free on sm_80 and sm_90.
template <int R>
constexpr int min_blocks_per_sm() { return R <= 2 ? 4 : (R <= 4 ? 3 : 2); }

// y[row0 .. row0+R, tile cols] for one (row block, column tile).
//   k_words = k / 8 word rows; words_per_group = min(group_size, k) / 8 (>= 1).
template <typename T, int R>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<R>())
    int4_gemm_kernel(const T* __restrict__ x, const int32_t* __restrict__ qweight,
                     const int32_t* __restrict__ qzeros, const __half* __restrict__ scales, T* __restrict__ y,
                     int64_t m, int n, int k_words, int words_per_group, bool x_vec) {
  static_assert(R >= 1 && R <= kMaxRows, "rows per block");
  __shared__ __align__(16) float xs[kWarps][R][kChunkInputs];          // per-warp staged x
  __shared__ float partial[kWarps][R][kColsPerBlock];                   // split-K partial sums

  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * R;
  const int col = static_cast<int>(blockIdx.y) * kColsPerBlock + lane;
  const bool col_ok = col < n;
  const int64_t k = static_cast<int64_t>(k_words) * kInt4PerWord;
  const int zero_words_per_row = n / kInt4PerWord;

  // This warp's contiguous slice of word rows.
  const int slice = (k_words + kWarps - 1) / kWarps;
  const int w_begin = min(k_words, warp * slice);
  const int w_end = min(k_words, w_begin + slice);

  float out[R];  // sum over finished groups of s * acc
  float acc[R];  // sum over the current group of x * (q - z)
#pragma unroll
  for (int r = 0; r < R; ++r) out[r] = acc[r] = 0.f;
  float scale_cur = 0.f;  // scale of the group in progress
  float bias_cur = 0.f;   // -(2^23 + zero) of the group in progress
  int next_group_start = w_begin;  // the slice's first word row always opens a group (fragment)

  float(*xw)[kChunkInputs] = xs[warp];

  for (int c0 = w_begin; c0 < w_end; c0 += kChunkWords) {
    // 1. Issue this chunk's global loads: weights, and scale/zero of each group that opens in it.
    uint32_t wq[kChunkWords];
    bool opens[kChunkWords];
    // Per opening group: fp16 scale bits << 16 | zero (1..16), one register each (decoded at use).
    uint32_t params[kChunkWords];
#pragma unroll
    for (int c = 0; c < kChunkWords; ++c) {
      const int wr = c0 + c;
      const bool valid = wr < w_end;
      wq[c] = (valid && col_ok)
                  ? static_cast<uint32_t>(__ldg(qweight + static_cast<int64_t>(wr) * n + col))
                  : 0u;
      opens[c] = valid && wr == next_group_start;  // warp-uniform
      params[c] = 0u;
      if (opens[c]) {
        const int g = wr / words_per_group;
        next_group_start = (g + 1) * words_per_group;
        if (col_ok) {
          const uint32_t scale_bits = __half_as_ushort(scales[static_cast<int64_t>(g) * n + col]);
          const int zero = int4_zero_at(qzeros + static_cast<int64_t>(g) * zero_words_per_row, col);
          params[c] = scale_bits << 16 | static_cast<uint32_t>(zero);
        }
      }
    }

    // 2. Stage x[row0 .. row0+R, 8*c0 .. 8*(c0+kChunkWords)) as fp32 (rows past m read as 0).
    __syncwarp();  // the previous chunk's reads of xw are done
    const int cw = min(kChunkWords, w_end - c0);
    for (int item = lane; item < R * kChunkWords; item += kWarpSize) {
      const int r = item / kChunkWords, c = item % kChunkWords;
      if (c >= cw) continue;
      const int64_t row = row0 + r;
      float v[8];
      if (row < m) {
        load8(x + row * k + static_cast<int64_t>(c0 + c) * kInt4PerWord, x_vec, v);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.f;
      }
      float4* dst = reinterpret_cast<float4*>(&xw[r][c * kInt4PerWord]);
      dst[0] = make_float4(v[0], v[1], v[2], v[3]);
      dst[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
    __syncwarp();

    // 3. Multiply-accumulate; close a group (apply its scale) where the next one opens.
#pragma unroll
    for (int c = 0; c < kChunkWords; ++c) {
      if (c0 + c >= w_end) continue;  // warp-uniform (no break: keeps the loop fully unrolled)
      if (opens[c]) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          out[r] = fmaf(scale_cur, acc[r], out[r]);
          acc[r] = 0.f;
        }
        scale_cur = __half2float(__ushort_as_half(static_cast<unsigned short>(params[c] >> 16)));
        bias_cur = -(kFloatTwo23 + static_cast<float>(params[c] & 0xFFFFu));
      }
      float w[kInt4PerWord];  // q - z, exact
#pragma unroll
      for (int b = 0; b < kInt4PerWord; ++b)
        w[b] = __uint_as_float(kFloatTwo23Bits | static_cast<uint32_t>(int4_at(wq[c], b))) + bias_cur;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float4 xa = *reinterpret_cast<const float4*>(&xw[r][c * kInt4PerWord]);
        const float4 xb = *reinterpret_cast<const float4*>(&xw[r][c * kInt4PerWord + 4]);
        float a = acc[r];
        a = fmaf(xa.x, w[0], a);
        a = fmaf(xa.y, w[1], a);
        a = fmaf(xa.z, w[2], a);
        a = fmaf(xa.w, w[3], a);
        a = fmaf(xb.x, w[4], a);
        a = fmaf(xb.y, w[5], a);
        a = fmaf(xb.z, w[6], a);
        a = fmaf(xb.w, w[7], a);
        acc[r] = a;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) out[r] = fmaf(scale_cur, acc[r], out[r]);

  // 4. Reduce the kWarps split-K partials and write y.
#pragma unroll
  for (int r = 0; r < R; ++r) partial[warp][r][lane] = out[r];
  __syncthreads();
  for (int idx = static_cast<int>(threadIdx.x); idx < R * kColsPerBlock; idx += kThreads) {
    const int r = idx / kColsPerBlock, l = idx % kColsPerBlock;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partial[w][r][l];
    const int64_t row = row0 + r;
    const int out_col = static_cast<int>(blockIdx.y) * kColsPerBlock + l;
    if (row < m && out_col < n) y[row * n + out_col] = Act<T>::from_float(sum);
  }
}

template <typename T, int R>
void launch_rows(const T* x, const int32_t* qweight, const int32_t* qzeros, const __half* scales, T* y, int64_t m,
                 int n, int k_words, int words_per_group, bool x_vec, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((m + R - 1) / R), static_cast<unsigned>((n + kColsPerBlock - 1) / kColsPerBlock));
  int4_gemm_kernel<T, R><<<grid, kThreads, 0, stream>>>(x, qweight, qzeros, scales, y, m, n, k_words,
                                                          words_per_group, x_vec);
}

template <typename T>
cudaError_t launch(const T* x, const int32_t* qweight, const int32_t* qzeros, const __half* scales, T* y, int64_t m,
                   int64_t n, int64_t k, int64_t group_size, cudaStream_t stream) {
  if (m < 0 || n <= 0 || n % kInt4PerWord != 0 || k <= 0 || k % kInt4PerWord != 0 || group_size <= 0 ||
      group_size % kInt4PerWord != 0)
    return cudaErrorInvalidValue;
  if (n > static_cast<int64_t>(kMaxColTiles) * kColsPerBlock || k > (int64_t{1} << 30)) return cudaErrorInvalidValue;
  if ((m + kMaxRows - 1) / kMaxRows > INT_MAX) return cudaErrorInvalidValue;  // gridDim.x limit
  if (m == 0) return cudaSuccess;
  if (x == nullptr || qweight == nullptr || qzeros == nullptr || scales == nullptr || y == nullptr)
    return cudaErrorInvalidValue;

  if (m > kGemvMaxRows && quant_tiled::fits(k, group_size)) {
    const int steps_per_group = static_cast<int>((group_size < k ? group_size : k) / quant_tiled::kTileK);
    return quant_tiled::launch<T, quant_tiled::Int4Codes>(
        x, {qweight, qzeros, scales, static_cast<int>(n), static_cast<int>(k / quant_tiled::kTileK), steps_per_group},
        y, m, stream);
  }

  const int k_words = static_cast<int>(k / kInt4PerWord);
  // group_size >= k is one group (per-channel); clamping keeps (g + 1) * words_per_group in int range.
  const int words_per_group = static_cast<int>((group_size < k ? group_size : k) / kInt4PerWord);
  const bool x_vec = reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const int ni = static_cast<int>(n);
  if (m <= 1) {
    launch_rows<T, 1>(x, qweight, qzeros, scales, y, m, ni, k_words, words_per_group, x_vec, stream);
  } else if (m <= 2) {
    launch_rows<T, 2>(x, qweight, qzeros, scales, y, m, ni, k_words, words_per_group, x_vec, stream);
  } else if (m <= 4) {
    launch_rows<T, 4>(x, qweight, qzeros, scales, y, m, ni, k_words, words_per_group, x_vec, stream);
  } else {
    launch_rows<T, kMaxRows>(x, qweight, qzeros, scales, y, m, ni, k_words, words_per_group, x_vec, stream);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace comptrust

cudaError_t comptrust_int4_gemm_cuda(const float* x, const int32_t* qweight, const int32_t* qzeros,
                                     const __half* scales, float* y, int64_t m, int64_t n, int64_t k,
                                     int64_t group_size, cudaStream_t stream) {
  return comptrust::launch(x, qweight, qzeros, scales, y, m, n, k, group_size, stream);
}

cudaError_t comptrust_int4_gemm_cuda(const __half* x, const int32_t* qweight, const int32_t* qzeros,
                                     const __half* scales, __half* y, int64_t m, int64_t n, int64_t k,
                                     int64_t group_size, cudaStream_t stream) {
  return comptrust::launch(x, qweight, qzeros, scales, y, m, n, k, group_size, stream);
}

cudaError_t comptrust_int4_gemm_cuda(const __nv_bfloat16* x, const int32_t* qweight, const int32_t* qzeros,
                                     const __half* scales, __nv_bfloat16* y, int64_t m, int64_t n, int64_t k,
                                     int64_t group_size, cudaStream_t stream) {
  return comptrust::launch(x, qweight, qzeros, scales, y, m, n, k, group_size, stream);
}
