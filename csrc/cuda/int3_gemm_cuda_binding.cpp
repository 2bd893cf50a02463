// torch binding of the CUDA int3_gemm launchers (csrc/cuda/int3_gemm_cuda.cu).
// Built only when torch has CUDA (setup.py); the kernels themselves include no torch headers.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "../int3_checks.h"
#include "int3_gemm_cuda.cuh"

namespace comptrust::gpu {
namespace {

at::Tensor int3_gemm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                          const at::Tensor& scales, int64_t group_size) {
  check_int3_gemm_args(x, qweight, qzeros, scales, group_size);
  TORCH_CHECK(x.is_cuda(), "int3_gemm (CUDA): x is on ", x.device());
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(1);
  const c10::cuda::CUDAGuard device_guard(x.device());

  // The kernels read x in its own dtype and accumulate in fp32, so y is the reference's fp32 product
  // rounded once to x's dtype, with no converted copy of x.
  const at::Tensor xc = x.contiguous();
  const at::Tensor qw = qweight.contiguous(), qz = qzeros.contiguous(), sc = scales.contiguous();
  at::Tensor y = at::empty({m, n}, xc.options());
  if (m == 0) return y;

  const auto* qw_ptr = qw.data_ptr<int32_t>();
  const auto* qz_ptr = qz.data_ptr<int32_t>();
  const auto* sc_ptr = reinterpret_cast<const __half*>(sc.data_ptr<at::Half>());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  switch (xc.scalar_type()) {
    case at::kFloat:
      err = comptrust_int3_gemm_cuda(xc.data_ptr<float>(), qw_ptr, qz_ptr, sc_ptr, y.data_ptr<float>(), m, n, k,
                                     group_size, stream);
      break;
    case at::kHalf:
      err = comptrust_int3_gemm_cuda(reinterpret_cast<const __half*>(xc.data_ptr<at::Half>()), qw_ptr, qz_ptr,
                                     sc_ptr, reinterpret_cast<__half*>(y.data_ptr<at::Half>()), m, n, k,
                                     group_size, stream);
      break;
    case at::kBFloat16:
      err = comptrust_int3_gemm_cuda(reinterpret_cast<const __nv_bfloat16*>(xc.data_ptr<at::BFloat16>()), qw_ptr,
                                     qz_ptr, sc_ptr, reinterpret_cast<__nv_bfloat16*>(y.data_ptr<at::BFloat16>()),
                                     m, n, k, group_size, stream);
      break;
    default:
      TORCH_CHECK(false, "int3_gemm (CUDA): unsupported x dtype ", xc.scalar_type());
  }
  TORCH_CHECK(err == cudaSuccess, "int3_gemm (CUDA): launch failed for m=", m, ", n=", n, ", k=", k,
              ", group_size=", group_size, ": ", cudaGetErrorString(err));
  return y;
}

}  // namespace
}  // namespace comptrust::gpu

TORCH_LIBRARY_IMPL(comptrust, CUDA, m) { m.impl("int3_gemm", &comptrust::gpu::int3_gemm_cuda); }
