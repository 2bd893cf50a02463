// Argument validation shared by the sparse24_gemm / sparse24_int4_gemm implementations: a bad call raises a
// clear error naming m, n, k (and the group size) instead of reading out of bounds. Mirrors
// comptrust/ops.py (_check_sparse24_gemm_args, _check_sparse24_int4_gemm_args) message for message, except
// that shapes print as torch's [a, b] rather than Python's (a, b).
#pragma once
#include <torch/extension.h>

namespace comptrust {

namespace sparse24_detail {

inline bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// Returns (m, k) of x after the checks both ops share.
inline std::pair<int64_t, int64_t> check_x(const char* name, const at::Tensor& x, int64_t n) {
  TORCH_CHECK(x.dim() == 2, name, ": x must be 2-D [m, k], got shape ", x.sizes());
  TORCH_CHECK(is_float_type(x.scalar_type()), name, ": x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(k > 0 && k % 8 == 0, name, ": k=", k, " (x.size(1)) must be a positive multiple of 8 (m=", m,
              ", n=", n, ")");
  return {m, k};
}

inline void check_meta(const char* name, const at::Tensor& meta, int64_t n, int64_t k) {
  TORCH_CHECK(meta.scalar_type() == at::kByte, name, ": meta must be uint8, got ", meta.scalar_type());
  TORCH_CHECK(meta.dim() == 2 && meta.size(0) == n && meta.size(1) == k / 8, name, ": meta is ", meta.sizes(),
              ", expected [n=", n, ", k/8=", k / 8, "] for k=", k);
}

}  // namespace sparse24_detail

inline void check_sparse24_gemm_args(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta) {
  constexpr const char* kName = "sparse24_gemm";
  TORCH_CHECK(values.dim() == 2, kName, ": values must be 2-D [n, k/2], got shape ", values.sizes());
  const int64_t n = values.size(0);
  const auto [m, k] = sparse24_detail::check_x(kName, x, n);
  TORCH_CHECK(sparse24_detail::is_float_type(values.scalar_type()), kName,
              ": values must be float32, bfloat16 or float16, got ", values.scalar_type());
  TORCH_CHECK(n > 0 && values.size(1) == k / 2, kName, ": values is ", values.sizes(), ", expected [n, k/2=", k / 2,
              "] with n > 0 for x of k=", k, " (m=", m, ")");
  sparse24_detail::check_meta(kName, meta, n, k);
  TORCH_CHECK(x.device() == values.device() && x.device() == meta.device(), kName,
              ": x, values, meta must share a device, got x on ", x.device(), ", values on ", values.device(),
              ", meta on ", meta.device(), " (m=", m, ", n=", n, ", k=", k, ")");
}

// The int4 tensors quantize the compact [n, k/2] values, so their rules are int4_gemm's with k/2 for k.
inline void check_sparse24_int4_gemm_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                                          const at::Tensor& scales, const at::Tensor& meta, int64_t group_size) {
  constexpr const char* kName = "sparse24_int4_gemm";
  TORCH_CHECK(qweight.dim() == 2, kName, ": qweight must be 2-D [k/16, n], got shape ", qweight.sizes());
  const int64_t n = qweight.size(1);
  const auto [m, k] = sparse24_detail::check_x(kName, x, n);
  TORCH_CHECK(k % 16 == 0, kName, ": k=", k, " must be a multiple of 16 (k/2 kept values, 8 per int32 word)");
  const int64_t kc = k / 2;  // compact (kept) values per row
#define COMPTRUST_COMPACT_CHECK(cond, ...) \
  TORCH_CHECK(cond, kName, " (over the compact [n, k/2=", kc, "] values): ", __VA_ARGS__)
  COMPTRUST_COMPACT_CHECK(qweight.scalar_type() == at::kInt && qzeros.scalar_type() == at::kInt &&
                              scales.scalar_type() == at::kHalf,
                          "need qweight/qzeros int32 and scales float16; got ", qweight.scalar_type(), ", ",
                          qzeros.scalar_type(), ", ", scales.scalar_type());
  COMPTRUST_COMPACT_CHECK(qweight.size(0) * 8 == kc, "x has k=", kc, " but qweight is ", qweight.sizes(),
                          " (expected [", kc / 8, ", n])");
  COMPTRUST_COMPACT_CHECK(n > 0 && n % 8 == 0, "n=", n, " must be a positive multiple of 8");
  COMPTRUST_COMPACT_CHECK(group_size > 0 && group_size % 8 == 0, "group_size=", group_size,
                          " must be a positive multiple of 8 (m=", m, ", n=", n, ", k=", kc, ")");
  const int64_t groups = (kc + group_size - 1) / group_size;
  COMPTRUST_COMPACT_CHECK(scales.dim() == 2 && scales.size(0) == groups && scales.size(1) == n &&
                              qzeros.dim() == 2 && qzeros.size(0) == groups && qzeros.size(1) == n / 8,
                          "scales ", scales.sizes(), " / qzeros ", qzeros.sizes(), " must be [", groups, ", ", n,
                          "] / [", groups, ", ", n / 8, "] for k=", kc, ", group_size=", group_size);
#undef COMPTRUST_COMPACT_CHECK
  sparse24_detail::check_meta(kName, meta, n, k);
  TORCH_CHECK(x.device() == qweight.device() && x.device() == qzeros.device() && x.device() == scales.device() &&
                  x.device() == meta.device(),
              kName, ": x, qweight, qzeros, scales, meta must share a device, got x on ", x.device(),
              ", qweight on ", qweight.device(), ", qzeros on ", qzeros.device(), ", scales on ", scales.device(),
              ", meta on ", meta.device(), " (m=", m, ", n=", n, ", k=", k, ", group_size=", group_size, ")");
}

}  // namespace comptrust
