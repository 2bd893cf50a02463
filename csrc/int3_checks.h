// Argument validation shared by every int3_gemm implementation: a bad call raises a clear error naming
// m, n, k, the group size and the expected shape instead of reading out of bounds.
#pragma once
#include <torch/extension.h>

#include "comptrust/int3_layout.h"

namespace comptrust {

inline void check_int3_gemm_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                                 const at::Tensor& scales, int64_t group_size) {
  constexpr int64_t kBlock = kInt3PerBlock, kWords = kInt3WordsPerBlock;
  TORCH_CHECK(x.dim() == 2, "int3_gemm: x must be 2-D [m, k], got ", x.dim(), "-D ", x.sizes());
  TORCH_CHECK(qweight.dim() == 2, "int3_gemm: qweight must be 2-D [k/32*3, n], got ", qweight.sizes());
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "int3_gemm: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(qweight.scalar_type() == at::kInt, "int3_gemm: qweight must be int32, got ", qweight.scalar_type());
  TORCH_CHECK(qzeros.scalar_type() == at::kInt, "int3_gemm: qzeros must be int32, got ", qzeros.scalar_type());
  TORCH_CHECK(scales.scalar_type() == at::kHalf, "int3_gemm: scales must be float16 (GPTQ v1), got ",
              scales.scalar_type());
  // 32 inputs share 3 words, so k must fill whole blocks.
  TORCH_CHECK(k > 0 && k % kBlock == 0, "int3_gemm: k=", k, " (x.size(1)) must be a positive multiple of 32 (m=", m,
              ", n=", n, ")");
  TORCH_CHECK(qweight.size(0) == k / kBlock * kWords, "int3_gemm: qweight is ", qweight.sizes(),
              " but x has k=", k, " (expected [", k / kBlock * kWords, ", n])");
  TORCH_CHECK(n > 0 && n % kBlock == 0, "int3_gemm: n=", n, " (qweight.size(1)) must be a positive multiple of 32 (m=",
              m, ", k=", k, ")");
  TORCH_CHECK(group_size > 0 && group_size % kBlock == 0, "int3_gemm: group_size=", group_size,
              " must be a positive multiple of 32 (m=", m, ", n=", n, ", k=", k, ")");
  const int64_t groups = (k + group_size - 1) / group_size;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == groups && scales.size(1) == n, "int3_gemm: scales is ",
              scales.sizes(), ", expected [", groups, ", ", n, "] for k=", k, ", n=", n, ", group_size=", group_size);
  TORCH_CHECK(qzeros.dim() == 2 && qzeros.size(0) == groups && qzeros.size(1) == n / kBlock * kWords,
              "int3_gemm: qzeros is ", qzeros.sizes(), ", expected [", groups, ", ", n / kBlock * kWords,
              "] for k=", k, ", n=", n, ", group_size=", group_size);
  TORCH_CHECK(x.device() == qweight.device() && x.device() == qzeros.device() && x.device() == scales.device(),
              "int3_gemm: all tensors must be on one device; x on ", x.device(), ", qweight on ", qweight.device(),
              ", qzeros on ", qzeros.device(), ", scales on ", scales.device());
}

}  // namespace comptrust
