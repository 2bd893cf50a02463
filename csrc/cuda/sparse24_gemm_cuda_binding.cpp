// torch binding of the CUDA 2:4 sparse GEMM launchers (csrc/cuda/sparse24_gemm_cuda.cu,
// sparse24_int4_gemm_cuda.cu). Built only when torch has CUDA (setup.py); the kernels include no torch headers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "../sparse24_checks.h"
#include "sparse24_gemm_cuda.cuh"
#include "torch_cuda_types.h"

namespace comptrust::gpu {
namespace {

at::Tensor sparse24_gemm_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta) {
  check_sparse24_gemm_args(x, values, meta);
  TORCH_CHECK(x.is_cuda(), "sparse24_gemm (CUDA): x is on ", x.device());
  const int64_t m = x.size(0), k = x.size(1), n = values.size(0);
  const c10::cuda::CUDAGuard device_guard(x.device());

  // The kernels read x and the values in their own dtypes and accumulate in fp32, so y matches the
  // reference x.float() @ W.float()^T rounded once to x's dtype, without converted copies.
  const at::Tensor xc = x.contiguous(), vc = values.contiguous(), mc = meta.contiguous();
  at::Tensor y = at::empty({m, n}, xc.options());
  if (m == 0) return y;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto* meta_ptr = mc.data_ptr<uint8_t>();
  cudaError_t err = cudaSuccess;
  dispatch_float(xc.scalar_type(), "sparse24_gemm (CUDA) x", [&](auto x_tag) {
    using TX = decltype(x_tag);
    dispatch_float(vc.scalar_type(), "sparse24_gemm (CUDA) values", [&](auto v_tag) {
      using TV = decltype(v_tag);
      err = comptrust_sparse24_gemm_cuda(cuda_ptr<TX>(xc), cuda_ptr<TV>(vc), meta_ptr, cuda_ptr_mut<TX>(y), m, n, k,
                                         stream);
    });
  });
  TORCH_CHECK(err == cudaSuccess, "sparse24_gemm (CUDA): launch failed for m=", m, ", n=", n, ", k=", k, ": ",
              cudaGetErrorString(err));
  return y;
}

at::Tensor sparse24_int4_gemm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                                   const at::Tensor& scales, const at::Tensor& meta, int64_t group_size) {
  check_sparse24_int4_gemm_args(x, qweight, qzeros, scales, meta, group_size);
  TORCH_CHECK(x.is_cuda(), "sparse24_int4_gemm (CUDA): x is on ", x.device());
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(1);
  const c10::cuda::CUDAGuard device_guard(x.device());

  const at::Tensor xc = x.contiguous();
  const at::Tensor qw = qweight.contiguous(), qz = qzeros.contiguous(), sc = scales.contiguous();
  const at::Tensor mc = meta.contiguous();
  at::Tensor y = at::empty({m, n}, xc.options());
  if (m == 0) return y;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  dispatch_float(xc.scalar_type(), "sparse24_int4_gemm (CUDA) x", [&](auto x_tag) {
    using TX = decltype(x_tag);
    err = comptrust_sparse24_int4_gemm_cuda(cuda_ptr<TX>(xc), qw.data_ptr<int32_t>(), qz.data_ptr<int32_t>(),
                                            cuda_ptr<at::Half>(sc), mc.data_ptr<uint8_t>(), cuda_ptr_mut<TX>(y), m, n,
                                            k, group_size, stream);
  });
  TORCH_CHECK(err == cudaSuccess, "sparse24_int4_gemm (CUDA): launch failed for m=", m, ", n=", n, ", k=", k,
              ", group_size=", group_size, ": ", cudaGetErrorString(err));
  return y;
}

}  // namespace
}  // namespace comptrust::gpu

TORCH_LIBRARY_IMPL(comptrust, CUDA, m) {
  m.impl("sparse24_gemm", &comptrust::gpu::sparse24_gemm_cuda);
  m.impl("sparse24_int4_gemm", &comptrust::gpu::sparse24_int4_gemm_cuda);
}
