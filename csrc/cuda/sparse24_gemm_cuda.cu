// CUDA 2:4 sparse GEMM/GEMV with float kept values (layout: csrc/include/comptrust/sparse24_layout.h).
//
// m <= 8 (decode): GEMV path. A warp owns one output column, i.e. one row of W, and its lanes walk that
//   row along k one meta byte at a time: lane l reads meta byte b (32 consecutive bytes per warp), the
//   byte's 4 kept values (contiguous across lanes, a vector load each) and the 8 inputs x[r, 8b .. 8b+8)
//   of each of the R rows, then multiplies each kept value with the input its meta points at. Only the
//   kept half of W is read and multiplied. A warp-shuffle reduction ends each column.
// m > 8: the tiled path of sparse24_tiled.cuh, with the weight tile expanded from values + meta; where the
//   values are fp16/bf16 in x's own type, k % 32 == 0 and the GPU is sm_80+, sparse24_mma.cuh's tile on the
//   sparse tensor cores (mma.sp) instead.
#include <climits>
#include <type_traits>

#include "sparse24_gemm_cuda.cuh"
#include "sparse24_mma.cuh"
#include "sparse24_tiled.cuh"

namespace comptrust {
namespace {

constexpr int kWarpSize = 32;
constexpr int kGemvWarps = 8;  // output columns per block
constexpr int kGemvMaxRows = 8;
constexpr int kMaxColTiles = 65535;  // gridDim.y of the tiled path

template <typename T, typename V, int R>
__global__ void __launch_bounds__(kGemvWarps * kWarpSize)
    sparse24_gemv_kernel(const T* __restrict__ x, const V* __restrict__ values, const uint8_t* __restrict__ meta,
                         T* __restrict__ y, int m, int n, int k, bool x_vec, bool v_vec) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int col = static_cast<int>(blockIdx.x) * kGemvWarps + static_cast<int>(threadIdx.x) / kWarpSize;
  if (col >= n) return;  // warp-uniform, and the kernel has no block-wide barrier

  const int meta_bytes = k / kSparse24InputsPerMeta;
  const V* value_row = values + static_cast<int64_t>(col) * (k / kSparse24Kept);
  const uint8_t* meta_row = meta + static_cast<int64_t>(col) * meta_bytes;

  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.f;

  for (int b = lane; b < meta_bytes; b += kWarpSize) {
    const uint32_t byte = __ldg(meta_row + b);
    float v[4];
    load4(value_row + kSparse24KeptPerMeta * b, v_vec, v);
    int idx[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) idx[j] = sparse24_position(byte, j / 2, j % 2);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= m) break;  // uniform: R is m rounded up to a power of two
      float xv[8];
      load8(x + static_cast<int64_t>(r) * k + kSparse24InputsPerMeta * b, x_vec, xv);
      float a = acc[r];
      a = fmaf(v[0], pick4(xv[0], xv[1], xv[2], xv[3], idx[0]), a);
      a = fmaf(v[1], pick4(xv[0], xv[1], xv[2], xv[3], idx[1]), a);
      a = fmaf(v[2], pick4(xv[4], xv[5], xv[6], xv[7], idx[2]), a);
      a = fmaf(v[3], pick4(xv[4], xv[5], xv[6], xv[7], idx[3]), a);
      acc[r] = a;
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    float sum = acc[r];
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, offset);
    if (lane == 0 && r < m) y[static_cast<int64_t>(r) * n + col] = Act<T>::from_float(sum);
  }
}

// The tiled path's weight source: expands float kept values into the dense slice.
template <typename V>
struct FloatValuesTile {
  const V* values;
  const uint8_t* meta;
  int n, k;
  bool vec;

  __device__ __forceinline__ void fill(float (*ws)[kTilePad], int k0, int col0, int c, int b) const {
    const int col = col0 + c;
    const int byte_index = k0 / kSparse24InputsPerMeta + b;
    const int meta_bytes = k / kSparse24InputsPerMeta;
    float kept[4] = {0.f, 0.f, 0.f, 0.f};
    uint32_t byte = 0;  // positions (0, 0) with zero values: an all-zero slice past n or k
    if (col < n && byte_index < meta_bytes) {
      byte = __ldg(meta + static_cast<int64_t>(col) * meta_bytes + byte_index);
      load4(values + static_cast<int64_t>(col) * (k / kSparse24Kept) + kSparse24KeptPerMeta * byte_index, vec, kept);
    }
#pragma unroll
    for (int p = 0; p < kSparse24InputsPerMeta; ++p)
      ws[kSparse24InputsPerMeta * b + p][c] = expand_kept(byte, p, kept, 0.f);
  }
};

template <typename T, typename V, int R>
void launch_gemv(const T* x, const V* values, const uint8_t* meta, T* y, int64_t m, int64_t n, int64_t k,
                 bool v_vec, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((n + kGemvWarps - 1) / kGemvWarps));
  sparse24_gemv_kernel<T, V, R><<<grid, kGemvWarps * kWarpSize, 0, stream>>>(
      x, values, meta, y, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), aligned16(x), v_vec);
}

template <typename T, typename V>
cudaError_t launch(const T* x, const V* values, const uint8_t* meta, T* y, int64_t m, int64_t n, int64_t k,
                   cudaStream_t stream) {
  if (m < 0 || n <= 0 || k <= 0 || k % kSparse24InputsPerMeta != 0) return cudaErrorInvalidValue;
  if (n > static_cast<int64_t>(kMaxColTiles) * kTileN || k > (int64_t{1} << 30)) return cudaErrorInvalidValue;
  if ((m + kTileM - 1) / kTileM > INT_MAX) return cudaErrorInvalidValue;  // gridDim.x of the tiled path
  if (m == 0) return cudaSuccess;
  if (x == nullptr || values == nullptr || meta == nullptr || y == nullptr) return cudaErrorInvalidValue;

  // Every kept-value offset the kernels use is a multiple of 4 elements, so an aligned base suffices.
  const bool v_vec = aligned16(values);
  if (m <= 1) {
    launch_gemv<T, V, 1>(x, values, meta, y, m, n, k, v_vec, stream);
  } else if (m <= 2) {
    launch_gemv<T, V, 2>(x, values, meta, y, m, n, k, v_vec, stream);
  } else if (m <= 4) {
    launch_gemv<T, V, 4>(x, values, meta, y, m, n, k, v_vec, stream);
  } else if (m <= kGemvMaxRows) {
    launch_gemv<T, V, kGemvMaxRows>(x, values, meta, y, m, n, k, v_vec, stream);
  } else {
    if constexpr (std::is_same_v<T, V> && sizeof(T) == 2) {  // fp16/bf16 values in x's type: the sparse tensor cores
      if (sparse24_mma::fits(k) && tensor_cores_usable() && aligned_to(values, 4) && aligned_to(meta, 2)) {
        const sparse24_mma::ValuesA<T> src{values, static_cast<int>(n), static_cast<int>(k / kSparse24Kept),
                                           static_cast<int>(k / sparse24_mma::kTileK)};
        return sparse24_mma::launch(x, src, meta, y, m, static_cast<int>(k), stream);
      }
    }
    const FloatValuesTile<V> tile{values, meta, static_cast<int>(n), static_cast<int>(k), v_vec};
    sparse24_tiled_kernel<T, FloatValuesTile<V>><<<sparse24_tiled_grid(m, n), kTileThreads, 0, stream>>>(
        x, tile, y, m, static_cast<int>(n), static_cast<int>(k), aligned16(x));
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace comptrust

template <typename T, typename V>
cudaError_t comptrust_sparse24_gemm_cuda(const T* x, const V* values, const uint8_t* meta, T* y, int64_t m,
                                         int64_t n, int64_t k, cudaStream_t stream) {
  return comptrust::launch(x, values, meta, y, m, n, k, stream);
}

#define COMPTRUST_SPARSE24_INSTANTIATE(T, V)                                                        \
  template cudaError_t comptrust_sparse24_gemm_cuda<T, V>(const T*, const V*, const uint8_t*, T*, \
                                                          int64_t, int64_t, int64_t, cudaStream_t);
COMPTRUST_SPARSE24_GEMM_TYPES(COMPTRUST_SPARSE24_INSTANTIATE)
#undef COMPTRUST_SPARSE24_INSTANTIATE
