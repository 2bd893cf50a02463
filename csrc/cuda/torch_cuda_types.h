// What the torch bindings of the CUDA launchers share: raw CUDA pointers of torch tensors, and a dispatch over
// the float dtypes the launchers take. Host code only; includes torch and CUDA runtime headers, no kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

namespace comptrust::gpu {

// torch's 16-bit float types and the CUDA ones share their bit layout.
template <typename Torch>
struct CudaType {
  using type = Torch;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename Torch>
const typename CudaType<Torch>::type* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaType<Torch>::type*>(t.data_ptr<Torch>());
}

template <typename Torch>
typename CudaType<Torch>::type* cuda_ptr_mut(at::Tensor& t) {
  return reinterpret_cast<typename CudaType<Torch>::type*>(t.data_ptr<Torch>());
}

// Calls fn(tag) with a value-initialized scalar of the torch C++ type of dtype t (float, at::Half, at::BFloat16).
template <typename Fn>
void dispatch_float(at::ScalarType t, const char* what, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(at::Half{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", t);
  }
}

}  // namespace comptrust::gpu
