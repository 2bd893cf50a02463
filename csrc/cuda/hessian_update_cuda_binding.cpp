// torch binding of the CUDA GPTQ / SparseGPT block update (csrc/cuda/hessian_update_cuda.cu). Built only when
// torch has CUDA (setup.py); the kernel includes no torch headers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "hessian_update_cuda.cuh"

namespace comptrust::gpu {
namespace {

void check_matrix(const at::Tensor& t, const char* what, at::ScalarType dtype, int64_t rows, int64_t cols,
                  const at::Device& device) {
  TORCH_CHECK(t.device() == device && t.scalar_type() == dtype && t.dim() == 2 && t.is_contiguous() &&
                  t.size(0) == rows && (cols < 0 || t.size(1) == cols),
              "hessian_block_update (CUDA): ", what, " must be a contiguous ", dtype, " tensor [", rows, ", ",
              cols < 0 ? std::string("S") : std::to_string(cols), "] on ", device, ", got ", t.scalar_type(), " ",
              t.sizes(), " on ", t.device());
}

std::tuple<at::Tensor, at::Tensor> hessian_block_update_cuda(at::Tensor w, const at::Tensor& hinv_in,
                                                             const at::Tensor& scales_in, const at::Tensor& zeros_in,
                                                             const at::Tensor& col_group_in, int64_t bits,
                                                             at::Tensor mask, int64_t prune_n, int64_t prune_m) {
  TORCH_CHECK(w.dim() == 2, "hessian_block_update (CUDA): w must be [n, B], got ", w.sizes());
  const int64_t n = w.size(0), width = w.size(1);
  const at::Device device = w.device();
  check_matrix(w, "w", at::kFloat, n, width, device);
  check_matrix(mask, "mask", at::kBool, n, width, device);
  const at::Tensor hinv = hinv_in.contiguous();
  check_matrix(hinv, "hinv", at::kFloat, width, width, device);
  TORCH_CHECK(bits == 0 || (bits >= 2 && bits <= 8), "hessian_block_update (CUDA): bits=", bits, " must be 0 or 2..8");
  at::Tensor scales = scales_in.contiguous(), zeros = zeros_in.contiguous(), col_group = col_group_in.contiguous();
  if (bits > 0) {
    check_matrix(scales, "scales", at::kFloat, n, -1, device);
    check_matrix(zeros, "zeros", at::kFloat, n, scales.size(1), device);
    TORCH_CHECK(col_group.device() == device && col_group.scalar_type() == at::kInt && col_group.numel() == width,
                "hessian_block_update (CUDA): col_group must be int32 [", width, "] on ", device);
  }
  const c10::cuda::CUDAGuard device_guard(device);
  at::Tensor err = at::empty_like(w);
  at::Tensor loss = at::zeros({n}, w.options());
  if (n == 0 || width == 0) return {err, loss};
  const cudaError_t status = comptrust_hessian_block_update_cuda(
      w.data_ptr<float>(), hinv.data_ptr<float>(), reinterpret_cast<uint8_t*>(mask.data_ptr<bool>()),
      bits > 0 ? scales.data_ptr<float>() : nullptr, bits > 0 ? zeros.data_ptr<float>() : nullptr,
      bits > 0 ? col_group.data_ptr<int32_t>() : nullptr, err.data_ptr<float>(), loss.data_ptr<float>(), n, width,
      bits > 0 ? scales.size(1) : 0, bits > 0 ? (int64_t{1} << bits) - 1 : 0, prune_n, prune_m,
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "hessian_block_update (CUDA): launch failed for n=", n, ", B=", width,
              " (B <= 4096, N < M, B % M == 0 required): ", cudaGetErrorString(status));
  return {err, loss};
}

}  // namespace
}  // namespace comptrust::gpu

TORCH_LIBRARY_IMPL(comptrust, CUDA, m) { m.impl("hessian_block_update", &comptrust::gpu::hessian_block_update_cuda); }
