// torch binding of the CUDA int4_gemm and int3_gemm launchers (csrc/cuda/int4_gemm_cuda.cu, int3_gemm_cuda.cu).
// Built only when torch has CUDA (setup.py); the kernels themselves include no torch headers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "../int3_checks.h"
#include "../int4_checks.h"
#include "int3_gemm_cuda.cuh"
#include "int4_gemm_cuda.cuh"
#include "torch_cuda_types.h"

namespace comptrust::gpu {
namespace {

// The int4 and int3 launchers take the same arguments (GPTQ v1 tensors, fp16 scales, x and y in x's dtype) and
// differ only in how qweight packs the codes, so one wrapper serves both; `launch` forwards to one overload set.
// The caller has run the op's own argument checks (shapes, dtypes, group size) first.
template <typename Launch>
at::Tensor quant_gemm_cuda(const char* op, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                           const at::Tensor& scales, int64_t group_size, Launch&& launch) {
  TORCH_CHECK(x.is_cuda(), op, " (CUDA): x is on ", x.device());
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(1);
  const c10::cuda::CUDAGuard device_guard(x.device());

  // The kernels read x in its own dtype (fp32, fp16 or bf16) and accumulate in fp32, so y matches
  // the reference x.float() @ W^T rounded once to x's dtype, without a converted copy of x.
  const at::Tensor xc = x.contiguous();
  const at::Tensor qw = qweight.contiguous(), qz = qzeros.contiguous(), sc = scales.contiguous();
  at::Tensor y = at::empty({m, n}, xc.options());
  if (m == 0) return y;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  dispatch_float(xc.scalar_type(), op, [&](auto x_tag) {
    using TX = decltype(x_tag);
    err = launch(cuda_ptr<TX>(xc), qw.data_ptr<int32_t>(), qz.data_ptr<int32_t>(), cuda_ptr<at::Half>(sc),
                 cuda_ptr_mut<TX>(y), m, n, k, group_size, stream);
  });
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA): launch failed for m=", m, ", n=", n, ", k=", k,
              ", group_size=", group_size, ": ", cudaGetErrorString(err));
  return y;
}

at::Tensor int4_gemm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                          const at::Tensor& scales, int64_t group_size) {
  check_int4_gemm_args(x, qweight, qzeros, scales, group_size);
  return quant_gemm_cuda("int4_gemm", x, qweight, qzeros, scales, group_size,
                         [](auto... args) { return comptrust_int4_gemm_cuda(args...); });
}

at::Tensor int3_gemm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                          const at::Tensor& scales, int64_t group_size) {
  check_int3_gemm_args(x, qweight, qzeros, scales, group_size);
  return quant_gemm_cuda("int3_gemm", x, qweight, qzeros, scales, group_size,
                         [](auto... args) { return comptrust_int3_gemm_cuda(args...); });
}

}  // namespace
}  // namespace comptrust::gpu

TORCH_LIBRARY_IMPL(comptrust, CUDA, m) {
  m.impl("int4_gemm", &comptrust::gpu::int4_gemm_cuda);
  m.impl("int3_gemm", &comptrust::gpu::int3_gemm_cuda);
}
