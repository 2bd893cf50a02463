// CUDA int3 x float GEMM/GEMV over the GPTQ v1 int3 layout (csrc/include/comptrust/int3_layout.h).
//
// Two kernels, chosen by the number of rows of x:
//
// GEMV (m <= kGemvMaxRows: decode and small batches; memory bound, the weights are read ~once)
//   * A block owns 32 output columns (one per lane) and R rows of x (R in 1, 2, 4, 8, picked from m);
//     row blocks along grid.x, column tiles along grid.y, so neighbouring blocks share a column tile and
//     its weights stay in L2.
//   * The kWarps warps split k into contiguous slices of 3-word blocks (split-K inside the block, reduced
//     through shared memory in a fixed order: deterministic, no atomics, no workspace). That keeps enough
//     loads in flight at m = 1 even when n is small.
//   * Per step a warp loads kGemvChunk blocks: 3 word rows each, 128 contiguous bytes per word row
//     (coalesced), stages the matching R x 32*kGemvChunk slice of x in shared memory as fp32, and every
//     lane reads the staged x by broadcast.
//   * The zero point is folded into the code's conversion, as in the int4 kernel: the float with bits
//     0x4B000000 | q is exactly 2^23 + q, so adding -(2^23 + z) gives q - z exactly with no int->float
//     instruction. Per group acc = sum x * (q - z); the scale is applied once when the group closes.
//
// Tiled GEMMs (m > kGemvMaxRows: prefill; compute bound once a weight tile is reused by 64 rows):
// quant_tiled.cuh, shared with the int4 kernels. fp32 x on a 64 x 64 FMA tile whose weights are
// dequantized bit for bit as comptrust.reference.int3_gemm builds them; fp16/bf16 x on the tensor cores
// (sm_80+), with q - z exact in the fragments and each group's scale applied once to its fp32 sums.
#include <climits>

#include "activations.cuh"
#include "comptrust/int3_layout.h"
#include "int3_gemm_cuda.cuh"
#include "quant_tiled.cuh"

namespace comptrust {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxColTiles = 65535;  // gridDim.y limit
constexpr int kBlockInputs = kInt3PerBlock;  // inputs per 3-word block (32)

// Rows up to which the GEMV wins. Above it the GEMV would re-read the weights from L2 once per 8 rows
// while the 64-row GEMM tile reuses each dequantized weight 64 times. Not yet measured on a GPU.
constexpr int64_t kGemvMaxRows = 32;

// ------------------------------------------------------------------------------------------------ GEMV
constexpr int kGemvWarps = 8;                          // split-K ways inside a block
constexpr int kGemvThreads = kGemvWarps * kWarpSize;  // 256
constexpr int kGemvCols = kWarpSize;                   // one output column per lane
constexpr int kGemvChunk = 2;                          // 3-word blocks loaded per step (6 words per lane)
constexpr int kGemvChunkInputs = kGemvChunk * kBlockInputs;
constexpr int kGemvSegments = kGemvChunkInputs / 8;    // staged 8 activations at a time
constexpr int kGemvMaxR = 8;                           // rows of x per block
constexpr uint32_t kFloatTwo23Bits = 0x4B000000u;      // bits of 2^23: (bits | q) as float == 2^23 + q
constexpr float kFloatTwo23 = 8388608.0f;

// Occupancy hint to ptxas per row count, as for the int4 GEMV: fewer registers and more resident warps
// for the latency-bound R <= 2 case.
template <int R>
constexpr int gemv_min_blocks_per_sm() { return R <= 2 ? 4 : (R <= 4 ? 3 : 2); }

// y[row0 .. row0+R, tile cols] for one (row block, column tile). k_blocks = k / 32;
// blocks_per_group = min(group_size, k) / 32 (>= 1). Every column exists: n % 32 == 0.
template <typename T, int R>
__global__ void __launch_bounds__(kGemvThreads, gemv_min_blocks_per_sm<R>())
    int3_gemv_kernel(const T* __restrict__ x, const int32_t* __restrict__ qweight,
                     const int32_t* __restrict__ qzeros, const __half* __restrict__ scales, T* __restrict__ y,
                     int64_t m, int n, int k_blocks, int blocks_per_group, bool x_vec) {
  static_assert(R >= 1 && R <= kGemvMaxR, "rows per block");
  __shared__ __align__(16) float xs[kGemvWarps][R][kGemvChunkInputs];  // per-warp staged x
  __shared__ float partial[kGemvWarps][R][kGemvCols];                   // split-K partial sums

  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * R;
  const int col = static_cast<int>(blockIdx.y) * kGemvCols + lane;
  const int64_t k = static_cast<int64_t>(k_blocks) * kBlockInputs;
  const int zero_words_per_row = n / kInt3PerBlock * kInt3WordsPerBlock;

  // This warp's contiguous slice of blocks.
  const int slice = (k_blocks + kGemvWarps - 1) / kGemvWarps;
  const int b_begin = min(k_blocks, warp * slice);
  const int b_end = min(k_blocks, b_begin + slice);

  float out[R];  // sum over finished groups of s * acc
  float acc[R];  // sum over the current group of x * (q - z)
#pragma unroll
  for (int r = 0; r < R; ++r) out[r] = acc[r] = 0.f;
  float scale_cur = 0.f;  // scale of the group in progress
  float bias_cur = 0.f;   // -(2^23 + zero) of the group in progress
  int next_group_start = b_begin;  // the slice's first block opens a group (or a fragment of one)

  float(*xw)[kGemvChunkInputs] = xs[warp];

  for (int c0 = b_begin; c0 < b_end; c0 += kGemvChunk) {
    // 1. Issue this chunk's global loads: weights, and scale/zero of each group that opens in it.
    uint32_t wq[kGemvChunk][kInt3WordsPerBlock];
    bool opens[kGemvChunk];
    uint32_t params[kGemvChunk];  // per opening group: fp16 scale bits << 16 | zero (1..8)
#pragma unroll
    for (int c = 0; c < kGemvChunk; ++c) {
      const int b = c0 + c;
      const bool valid = b < b_end;
#pragma unroll
      for (int w = 0; w < kInt3WordsPerBlock; ++w)
        wq[c][w] = valid ? static_cast<uint32_t>(
                               __ldg(qweight + (static_cast<int64_t>(b) * kInt3WordsPerBlock + w) * n + col))
                         : 0u;
      opens[c] = valid && b == next_group_start;  // warp-uniform
      params[c] = 0u;
      if (opens[c]) {
        const int g = b / blocks_per_group;
        next_group_start = (g + 1) * blocks_per_group;
        const uint32_t scale_bits = __half_as_ushort(scales[static_cast<int64_t>(g) * n + col]);
        const int zero = int3_zero_at(qzeros + static_cast<int64_t>(g) * zero_words_per_row, col);
        params[c] = scale_bits << 16 | static_cast<uint32_t>(zero);
      }
    }

    // 2. Stage x[row0 .. row0+R, 32*c0 .. 32*(c0+kGemvChunk)) as fp32 (rows past m read as 0).
    __syncwarp();  // the previous chunk's reads of xw are done
    const int segments = min(kGemvChunk, b_end - c0) * (kBlockInputs / 8);
    for (int item = lane; item < R * kGemvSegments; item += kWarpSize) {
      const int r = item / kGemvSegments, s = item % kGemvSegments;
      if (s >= segments) continue;
      const int64_t row = row0 + r;
      float v[8];
      if (row < m) {
        // k % 32 == 0 keeps every segment 16-byte aligned when x is.
        load8(x + row * k + static_cast<int64_t>(c0) * kBlockInputs + s * 8, x_vec, v);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.f;
      }
      float4* dst = reinterpret_cast<float4*>(&xw[r][s * 8]);
      dst[0] = make_float4(v[0], v[1], v[2], v[3]);
      dst[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
    __syncwarp();

    // 3. Multiply-accumulate; close a group (apply its scale) where the next one opens.
#pragma unroll
    for (int c = 0; c < kGemvChunk; ++c) {
      if (c0 + c >= b_end) continue;  // warp-uniform (no break: keeps the loop fully unrolled)
      if (opens[c]) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          out[r] = fmaf(scale_cur, acc[r], out[r]);
          acc[r] = 0.f;
        }
        scale_cur = __half2float(__ushort_as_half(static_cast<unsigned short>(params[c] >> 16)));
        bias_cur = -(kFloatTwo23 + static_cast<float>(params[c] & 0xFFFFu));
      }
#pragma unroll
      for (int v0 = 0; v0 < kBlockInputs; v0 += 4) {
        float w[4];  // q - z, exact; v0 + i is a compile-time constant, so int3_at is one funnel shift
#pragma unroll
        for (int i = 0; i < 4; ++i)
          w[i] = __uint_as_float(kFloatTwo23Bits |
                                 static_cast<uint32_t>(int3_at(wq[c][0], wq[c][1], wq[c][2], v0 + i))) +
                 bias_cur;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float4 xa = *reinterpret_cast<const float4*>(&xw[r][c * kBlockInputs + v0]);
          float a = acc[r];
          a = fmaf(xa.x, w[0], a);
          a = fmaf(xa.y, w[1], a);
          a = fmaf(xa.z, w[2], a);
          a = fmaf(xa.w, w[3], a);
          acc[r] = a;
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) out[r] = fmaf(scale_cur, acc[r], out[r]);

  // 4. Reduce the split-K partials in warp order and write y.
#pragma unroll
  for (int r = 0; r < R; ++r) partial[warp][r][lane] = out[r];
  __syncthreads();
  for (int idx = static_cast<int>(threadIdx.x); idx < R * kGemvCols; idx += kGemvThreads) {
    const int r = idx / kGemvCols, l = idx % kGemvCols;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kGemvWarps; ++w) sum += partial[w][r][l];
    const int64_t row = row0 + r;
    if (row < m) y[row * n + static_cast<int64_t>(blockIdx.y) * kGemvCols + l] = Act<T>::from_float(sum);
  }
}

// ------------------------------------------------------------------------------------------- launchers
template <typename T, int R>
void launch_gemv(const T* x, const int32_t* qweight, const int32_t* qzeros, const __half* scales, T* y, int64_t m,
                 int n, int k_blocks, int blocks_per_group, bool x_vec, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((m + R - 1) / R), static_cast<unsigned>(n / kGemvCols));
  int3_gemv_kernel<T, R><<<grid, kGemvThreads, 0, stream>>>(x, qweight, qzeros, scales, y, m, n, k_blocks,
                                                             blocks_per_group, x_vec);
}

template <typename T>
cudaError_t launch(const T* x, const int32_t* qweight, const int32_t* qzeros, const __half* scales, T* y, int64_t m,
                   int64_t n, int64_t k, int64_t group_size, cudaStream_t stream) {
  if (m < 0 || n <= 0 || n % kInt3PerBlock != 0 || k <= 0 || k % kInt3PerBlock != 0 || group_size <= 0 ||
      group_size % kInt3PerBlock != 0)
    return cudaErrorInvalidValue;
  if (n > static_cast<int64_t>(kMaxColTiles) * kGemvCols || k > (int64_t{1} << 30)) return cudaErrorInvalidValue;
  if ((m + quant_tiled::kTileM - 1) / quant_tiled::kTileM > INT_MAX) return cudaErrorInvalidValue;  // gridDim.x
  if (m == 0) return cudaSuccess;
  if (x == nullptr || qweight == nullptr || qzeros == nullptr || scales == nullptr || y == nullptr)
    return cudaErrorInvalidValue;

  const int k_blocks = static_cast<int>(k / kInt3PerBlock);
  // group_size >= k is one group (per-channel); clamping keeps (g + 1) * blocks_per_group in int range.
  const int blocks_per_group = static_cast<int>((group_size < k ? group_size : k) / kInt3PerBlock);
  const int ni = static_cast<int>(n);
  if (m > kGemvMaxRows)
    return quant_tiled::launch<T, quant_tiled::Int3Codes>(x, {qweight, qzeros, scales, ni, k_blocks, blocks_per_group},
                                                          y, m, stream);
  const bool x_vec = reinterpret_cast<uintptr_t>(x) % 16 == 0;
  if (m <= 1) {
    launch_gemv<T, 1>(x, qweight, qzeros, scales, y, m, ni, k_blocks, blocks_per_group, x_vec, stream);
  } else if (m <= 2) {
    launch_gemv<T, 2>(x, qweight, qzeros, scales, y, m, ni, k_blocks, blocks_per_group, x_vec, stream);
  } else if (m <= 4) {
    launch_gemv<T, 4>(x, qweight, qzeros, scales, y, m, ni, k_blocks, blocks_per_group, x_vec, stream);
  } else {
    launch_gemv<T, kGemvMaxR>(x, qweight, qzeros, scales, y, m, ni, k_blocks, blocks_per_group, x_vec, stream);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace comptrust

cudaError_t comptrust_int3_gemm_cuda(const float* x, const int32_t* qweight, const int32_t* qzeros,
                                     const __half* scales, float* y, int64_t m, int64_t n, int64_t k,
                                     int64_t group_size, cudaStream_t stream) {
  return comptrust::launch(x, qweight, qzeros, scales, y, m, n, k, group_size, stream);
}

cudaError_t comptrust_int3_gemm_cuda(const __half* x, const int32_t* qweight, const int32_t* qzeros,
                                     const __half* scales, __half* y, int64_t m, int64_t n, int64_t k,
                                     int64_t group_size, cudaStream_t stream) {
  return comptrust::launch(x, qweight, qzeros, scales, y, m, n, k, group_size, stream);
}

cudaError_t comptrust_int3_gemm_cuda(const __nv_bfloat16* x, const int32_t* qweight, const int32_t* qzeros,
                                     const __half* scales, __nv_bfloat16* y, int64_t m, int64_t n, int64_t k,
                                     int64_t group_size, cudaStream_t stream) {
  return comptrust::launch(x, qweight, qzeros, scales, y, m, n, k, group_size, stream);
}
