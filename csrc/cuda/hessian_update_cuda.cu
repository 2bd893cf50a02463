// CUDA GPTQ / SparseGPT block update (see hessian_update_cuda.cuh for the contract).
//
// Rows are independent inside a block: one warp owns one row, kept in shared memory with its mask. Per
// column i every lane reads w[i] (a shared-memory broadcast) and computes the same q and error, then the
// lanes subtract e * hinv[i, j] from the later columns j, 32 at a time (hinv rows are read coalesced and
// shared by the block's warps through L1). The arithmetic is the reference's, operation for operation:
// __fmul_rn / __fsub_rn / __fdiv_rn keep nvcc from fusing or approximating, rintf rounds half to even as
// torch.round does, so the codes match the CPU op and the reference bit for bit.
#include "hessian_update_cuda.cuh"

namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kWarp = 32;
constexpr int64_t kMaxWidth = 4096;

struct BlockArgs {
  float* w;
  const float* hinv;
  uint8_t* mask;
  const float* scales;
  const float* zeros;
  const int32_t* col_group;
  float* err;
  float* loss;
  int n, width, groups_per_row, maxq, prune_n, prune_m;
};

__device__ float quantize(float q, float s, float z, float maxq) {
  const float code = fminf(fmaxf(__fadd_rn(rintf(__fdiv_rn(q, s)), z), 0.0f), maxq);
  return __fmul_rn(s, __fsub_rn(code, z));
}

// Lane 0 marks the prune_n columns of [i, i + prune_m) with the smallest w^2 / d^2 (ties: lower column).
__device__ void select_pruned(const BlockArgs& a, const float* w, uint8_t* mask, int i) {
  for (int c = 0; c < a.prune_n; ++c) {
    int best = -1;
    float best_score = 0.0f;
    for (int j = i; j < i + a.prune_m; ++j) {
      if (mask[j]) continue;
      const float d = a.hinv[static_cast<int64_t>(j) * a.width + j];
      const float score = __fdiv_rn(__fmul_rn(w[j], w[j]), __fmul_rn(d, d));
      if (best < 0 || score < best_score) {
        best = j;
        best_score = score;
      }
    }
    mask[best] = 1;
  }
}

__global__ void hessian_block_update_kernel(BlockArgs a) {
  extern __shared__ unsigned char shared[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int row = blockIdx.x * kWarpsPerBlock + warp;
  float* w = reinterpret_cast<float*>(shared) + warp * a.width;
  uint8_t* mask = reinterpret_cast<uint8_t*>(reinterpret_cast<float*>(shared) + kWarpsPerBlock * a.width) +
                  warp * a.width;
  if (row >= a.n) return;  // whole warps leave together: no block-wide barrier below
  const int64_t base = static_cast<int64_t>(row) * a.width;
  for (int j = lane; j < a.width; j += kWarp) {
    w[j] = a.w[base + j];
    mask[j] = a.mask[base + j];
  }
  __syncwarp();
  float loss = 0.0f;
  for (int i = 0; i < a.width; ++i) {
    if (a.prune_n > 0 && i % a.prune_m == 0) {
      if (lane == 0) select_pruned(a, w, mask, i);
      __syncwarp();
    }
    const float value = w[i];
    float q = mask[i] ? 0.0f : value;
    if (a.maxq > 0) {
      const int64_t g = static_cast<int64_t>(row) * a.groups_per_row + a.col_group[i];
      q = quantize(q, a.scales[g], a.zeros[g], static_cast<float>(a.maxq));
    }
    const float* h = a.hinv + static_cast<int64_t>(i) * a.width;
    const float d = h[i];
    const float diff = __fsub_rn(value, q);
    loss = __fadd_rn(loss, __fdiv_rn(__fmul_rn(diff, diff), __fmul_rn(d, d)));
    const float e = __fdiv_rn(diff, d);
    __syncwarp();  // every lane has read w[i] before it is overwritten
    for (int j = i + 1 + lane; j < a.width; j += kWarp) w[j] = __fsub_rn(w[j], __fmul_rn(e, h[j]));
    if (lane == 0) {
      w[i] = q;
      a.err[base + i] = e;
    }
    __syncwarp();
  }
  for (int j = lane; j < a.width; j += kWarp) {
    a.w[base + j] = w[j];
    a.mask[base + j] = mask[j];
  }
  if (lane == 0) a.loss[row] = __fdiv_rn(loss, 2.0f);
}

}  // namespace

cudaError_t comptrust_hessian_block_update_cuda(float* w, const float* hinv, uint8_t* mask, const float* scales,
                                                const float* zeros, const int32_t* col_group, float* err, float* loss,
                                                int64_t n, int64_t width, int64_t groups_per_row, int64_t maxq,
                                                int64_t prune_n, int64_t prune_m, cudaStream_t stream) {
  if (n < 0 || width <= 0 || width > kMaxWidth || n > (int64_t{1} << 30) || prune_n < 0 ||
      (prune_n > 0 && (prune_m <= prune_n || width % prune_m != 0)) || maxq < 0 || maxq > 255 ||
      (maxq > 0 && (scales == nullptr || zeros == nullptr || col_group == nullptr || groups_per_row <= 0))) {
    return cudaErrorInvalidValue;
  }
  if (n == 0) return cudaSuccess;
  if (w == nullptr || hinv == nullptr || mask == nullptr || err == nullptr || loss == nullptr) {
    return cudaErrorInvalidValue;
  }
  const BlockArgs args{w, hinv, mask, scales, zeros, col_group, err, loss, static_cast<int>(n), static_cast<int>(width),
                       static_cast<int>(groups_per_row), static_cast<int>(maxq), static_cast<int>(prune_n),
                       static_cast<int>(prune_m)};
  const size_t shared_bytes = kWarpsPerBlock * width * (sizeof(float) + sizeof(uint8_t));
  if (shared_bytes > 48 * 1024) {
    const cudaError_t attr = cudaFuncSetAttribute(hessian_block_update_kernel,
                                                  cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                  static_cast<int>(shared_bytes));
    if (attr != cudaSuccess) return attr;
  }
  const int64_t blocks = (n + kWarpsPerBlock - 1) / kWarpsPerBlock;
  hessian_block_update_kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarp, shared_bytes, stream>>>(args);
  return cudaGetLastError();
}
