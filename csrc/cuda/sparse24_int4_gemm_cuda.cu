// CUDA 2:4 sparse GEMM/GEMV whose kept values are GPTQ v1 int4 over the compact [n, k/2] matrix
// (layouts: csrc/include/comptrust/sparse24_layout.h, int4_layout.h).
//
// m <= 8 (decode): GEMV path, shaped like int4_gemm_cuda.cu because qweight [k/16, n] is packed along k:
//   a lane owns one output column, so a warp reads one qweight word row across 32 columns per step
//   (128 contiguous bytes). Each word holds 8 kept values = 4 sparsity groups = 16 inputs, whose
//   positions come from 2 meta bytes of the lane's own meta row (per-lane rows, but a 32-byte sector
//   serves 16 consecutive words and stays in L1 while the warp walks k). The warp stages the matching
//   16 inputs per word of x in shared memory as fp32, and every lane reads the 8 inputs its meta picks
//   (within a 16-float window: no bank conflicts). The kWarps warps of a block split k (split-K inside
//   the block, reduced through shared memory: deterministic). Zero points are subtracted from the code
//   (exact in fp32) and the scale applied once per quantization group.
// m > 8: the tiled path of sparse24_tiled.cuh, with the weight tile dequantized from qweight + meta; for
//   fp16/bf16 x on sm_80+ (k % 32 == 0, groups of whole 16-kept-value steps), sparse24_mma.cuh's tile on the
//   sparse tensor cores (mma.sp) instead, q - z in the fragments and the scale applied per group.
#include <climits>

#include "comptrust/int4_layout.h"
#include "sparse24_gemm_cuda.cuh"
#include "sparse24_mma.cuh"
#include "sparse24_tiled.cuh"

namespace comptrust {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kColsPerBlock = kWarpSize;
constexpr int kInputsPerWord = kInt4PerWord * kSparse24Group / kSparse24Kept;  // 16
constexpr int kChunkWords = 4;                                                 // word rows per step
constexpr int kChunkInputs = kChunkWords * kInputsPerWord;
constexpr int kGemvMaxRows = 8;
constexpr int kMaxColTiles = 65535;

template <typename T, int R>
__global__ void __launch_bounds__(kThreads)
    sparse24_int4_gemv_kernel(const T* __restrict__ x, const int32_t* __restrict__ qweight,
                              const int32_t* __restrict__ qzeros, const __half* __restrict__ scales,
                              const uint8_t* __restrict__ meta, T* __restrict__ y, int m, int n, int k_words,
                              int words_per_group, bool x_vec) {
  __shared__ __align__(16) float xs[kWarps][R][kChunkInputs];  // per-warp staged x
  __shared__ float partial[kWarps][R][kColsPerBlock];           // split-K partial sums

  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int col = static_cast<int>(blockIdx.x) * kColsPerBlock + lane;
  const bool col_ok = col < n;
  const int64_t k = static_cast<int64_t>(k_words) * kInputsPerWord;
  const int meta_bytes = k_words * 2;
  const uint8_t* meta_row = meta + static_cast<int64_t>(col_ok ? col : 0) * meta_bytes;

  // This warp's contiguous slice of word rows.
  const int slice = (k_words + kWarps - 1) / kWarps;
  const int w_begin = min(k_words, warp * slice);
  const int w_end = min(k_words, w_begin + slice);

  float out[R];  // sum over finished groups of scale * acc
  float acc[R];  // sum over the current group of x * (q - z)
#pragma unroll
  for (int r = 0; r < R; ++r) out[r] = acc[r] = 0.f;
  float scale = 0.f;
  int zero = 0;
  int next_group_start = w_begin;  // the slice's first word row always opens a group (or a fragment)

  float(*xw)[kChunkInputs] = xs[warp];

  for (int c0 = w_begin; c0 < w_end; c0 += kChunkWords) {
    // 1. This chunk's weight words and the 2 meta bytes of each (independent loads in flight).
    uint32_t words[kChunkWords];
    uint32_t metas[kChunkWords];
#pragma unroll
    for (int c = 0; c < kChunkWords; ++c) {
      const int wr = c0 + c;
      const bool load = wr < w_end && col_ok;
      words[c] = load ? static_cast<uint32_t>(__ldg(qweight + static_cast<int64_t>(wr) * n + col)) : 0u;
      metas[c] = load ? (static_cast<uint32_t>(__ldg(meta_row + 2 * wr)) |
                         static_cast<uint32_t>(__ldg(meta_row + 2 * wr + 1)) << 8)
                      : 0u;
    }

    // 2. Stage x[0 .. R, 16*c0 .. 16*(c0 + kChunkWords)) as fp32, 8 inputs per item (rows past m read 0).
    __syncwarp();  // the previous chunk's reads of xw are done
    const int pieces = 2 * min(kChunkWords, w_end - c0);
    for (int item = lane; item < R * 2 * kChunkWords; item += kWarpSize) {
      const int r = item / (2 * kChunkWords), h = item % (2 * kChunkWords);
      if (h >= pieces) continue;
      float v[8];
      if (r < m) {
        load8(x + r * k + static_cast<int64_t>(c0) * kInputsPerWord + 8 * h, x_vec, v);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.f;
      }
      float4* dst = reinterpret_cast<float4*>(&xw[r][8 * h]);
      dst[0] = make_float4(v[0], v[1], v[2], v[3]);
      dst[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
    __syncwarp();

    // 3. Multiply-accumulate the 8 kept values of each word; close a group where the next one opens.
#pragma unroll
    for (int c = 0; c < kChunkWords; ++c) {
      const int wr = c0 + c;
      if (wr >= w_end) continue;  // warp-uniform
      if (wr == next_group_start) {  // warp-uniform
#pragma unroll
        for (int r = 0; r < R; ++r) {
          out[r] = fmaf(scale, acc[r], out[r]);
          acc[r] = 0.f;
        }
        const int g = wr / words_per_group;
        next_group_start = (g + 1) * words_per_group;
        if (col_ok) {
          scale = __half2float(scales[static_cast<int64_t>(g) * n + col]);
          zero = int4_zero_at(qzeros + static_cast<int64_t>(g) * (n / kInt4PerWord), col);
        }
      }
#pragma unroll
      for (int i = 0; i < kInt4PerWord; ++i) {
        const int half = i / kSparse24KeptPerMeta;  // which of the word's 2 meta bytes
        const uint32_t byte = (metas[c] >> (8 * half)) & 0xFFu;
        const int input = kInputsPerWord * c + kSparse24InputsPerMeta * half +
                          sparse24_input_offset(byte, i % kSparse24KeptPerMeta);
        const float w = static_cast<float>(int4_at(words[c], i) - zero);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] = fmaf(xw[r][input], w, acc[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) out[r] = fmaf(scale, acc[r], out[r]);

  // 4. Reduce the kWarps split-K partials and write y.
#pragma unroll
  for (int r = 0; r < R; ++r) partial[warp][r][lane] = out[r];
  __syncthreads();
  for (int idx = static_cast<int>(threadIdx.x); idx < R * kColsPerBlock; idx += kThreads) {
    const int r = idx / kColsPerBlock, l = idx % kColsPerBlock;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partial[w][r][l];
    const int out_col = static_cast<int>(blockIdx.x) * kColsPerBlock + l;
    if (r < m && out_col < n) y[static_cast<int64_t>(r) * n + out_col] = Act<T>::from_float(sum);
  }
}

// The tiled path's weight source: dequantizes a meta byte's 4 int4 kept values into the dense slice.
struct Int4ValuesTile {
  const int32_t* qweight;
  const int32_t* qzeros;
  const __half* scales;
  const uint8_t* meta;
  int n, k, group_size;

  __device__ __forceinline__ void fill(float (*ws)[kTilePad], int k0, int col0, int c, int b) const {
    const int col = col0 + c;
    const int byte_index = k0 / kSparse24InputsPerMeta + b;
    const int meta_bytes = k / kSparse24InputsPerMeta;
    int kept[4] = {0, 0, 0, 0};
    int zero = 0;
    float scale = 0.f;  // zero weights past n or k
    uint32_t byte = 0;
    if (col < n && byte_index < meta_bytes) {
      byte = __ldg(meta + static_cast<int64_t>(col) * meta_bytes + byte_index);
      // The byte's kept values are compact 4*byte_index .. +4: half of word row byte_index / 2, all in
      // one quantization group (group_size % 8 == 0).
      const uint32_t word = static_cast<uint32_t>(__ldg(qweight + static_cast<int64_t>(byte_index / 2) * n + col));
#pragma unroll
      for (int j = 0; j < 4; ++j) kept[j] = int4_at(word, kSparse24KeptPerMeta * (byte_index & 1) + j);
      const int64_t g = static_cast<int64_t>(kSparse24KeptPerMeta) * byte_index / group_size;
      scale = __half2float(scales[g * n + col]);
      zero = int4_zero_at(qzeros + g * (n / kInt4PerWord), col);
    }
#pragma unroll
    for (int p = 0; p < kSparse24InputsPerMeta; ++p)  // an unkept position takes code `zero`: weight 0
      ws[kSparse24InputsPerMeta * b + p][c] = static_cast<float>(expand_kept(byte, p, kept, zero) - zero) * scale;
  }
};

template <typename T, int R>
void launch_gemv(const T* x, const int32_t* qweight, const int32_t* qzeros, const __half* scales,
                 const uint8_t* meta, T* y, int64_t m, int64_t n, int64_t k, int words_per_group,
                 cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((n + kColsPerBlock - 1) / kColsPerBlock));
  sparse24_int4_gemv_kernel<T, R><<<grid, kThreads, 0, stream>>>(
      x, qweight, qzeros, scales, meta, y, static_cast<int>(m), static_cast<int>(n),
      static_cast<int>(k / kInputsPerWord), words_per_group, aligned16(x));
}

template <typename T>
cudaError_t launch(const T* x, const int32_t* qweight, const int32_t* qzeros, const __half* scales,
                   const uint8_t* meta, T* y, int64_t m, int64_t n, int64_t k, int64_t group_size,
                   cudaStream_t stream) {
  if (m < 0 || n <= 0 || n % kInt4PerWord != 0 || k <= 0 || k % kInputsPerWord != 0 || group_size <= 0 ||
      group_size % kInt4PerWord != 0)
    return cudaErrorInvalidValue;
  if (n > static_cast<int64_t>(kMaxColTiles) * kTileN || k > (int64_t{1} << 30)) return cudaErrorInvalidValue;
  if ((m + kTileM - 1) / kTileM > INT_MAX) return cudaErrorInvalidValue;
  if (m == 0) return cudaSuccess;
  if (x == nullptr || qweight == nullptr || qzeros == nullptr || scales == nullptr || meta == nullptr ||
      y == nullptr)
    return cudaErrorInvalidValue;

  const int64_t kept_per_row = k / kSparse24Kept;
  // group_size >= k/2 is one group per row; clamping keeps the group arithmetic in int range.
  const int64_t gs = group_size < kept_per_row ? group_size : kept_per_row;
  const int words_per_group = static_cast<int>(gs / kInt4PerWord);
  if (m <= 1) {
    launch_gemv<T, 1>(x, qweight, qzeros, scales, meta, y, m, n, k, words_per_group, stream);
  } else if (m <= 2) {
    launch_gemv<T, 2>(x, qweight, qzeros, scales, meta, y, m, n, k, words_per_group, stream);
  } else if (m <= 4) {
    launch_gemv<T, 4>(x, qweight, qzeros, scales, meta, y, m, n, k, words_per_group, stream);
  } else if (m <= kGemvMaxRows) {
    launch_gemv<T, kGemvMaxRows>(x, qweight, qzeros, scales, meta, y, m, n, k, words_per_group, stream);
  } else {
    if constexpr (sizeof(T) == 2) {  // fp16/bf16 x: the sparse tensor cores, q - z exact in the fragments
      if (sparse24_mma::fits(k, gs) && tensor_cores_usable() && aligned_to(meta, 2)) {
        const sparse24_mma::Int4A<T> src{qweight, qzeros, scales, static_cast<int>(n),
                                         static_cast<int>(gs / sparse24_mma::kStepKept)};
        return sparse24_mma::launch(x, src, meta, y, m, static_cast<int>(k), stream);
      }
    }
    const Int4ValuesTile tile{qweight, qzeros, scales, meta, static_cast<int>(n), static_cast<int>(k),
                              static_cast<int>(gs)};
    sparse24_tiled_kernel<T, Int4ValuesTile><<<sparse24_tiled_grid(m, n), kTileThreads, 0, stream>>>(
        x, tile, y, m, static_cast<int>(n), static_cast<int>(k), aligned16(x));
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace comptrust

template <typename T>
cudaError_t comptrust_sparse24_int4_gemm_cuda(const T* x, const int32_t* qweight, const int32_t* qzeros,
                                              const __half* scales, const uint8_t* meta, T* y, int64_t m, int64_t n,
                                              int64_t k, int64_t group_size, cudaStream_t stream) {
  return comptrust::launch(x, qweight, qzeros, scales, meta, y, m, n, k, group_size, stream);
}

template cudaError_t comptrust_sparse24_int4_gemm_cuda<float>(const float*, const int32_t*, const int32_t*,
                                                              const __half*, const uint8_t*, float*, int64_t,
                                                              int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t comptrust_sparse24_int4_gemm_cuda<__half>(const __half*, const int32_t*, const int32_t*,
                                                               const __half*, const uint8_t*, __half*, int64_t,
                                                               int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t comptrust_sparse24_int4_gemm_cuda<__nv_bfloat16>(const __nv_bfloat16*, const int32_t*,
                                                                      const int32_t*, const __half*,
                                                                      const uint8_t*, __nv_bfloat16*, int64_t,
                                                                      int64_t, int64_t, int64_t, cudaStream_t);
