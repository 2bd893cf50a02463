// Batch-1 fp32 products bound once to their weights, for DecodeProgram's decode steps.
//
// Why: timed inside the embedded model's int4 decode step with the kernels' bodies skipped, a linear called
// through the dispatcher still cost 4.5-11 us before reading a weight byte (schema boxing, argument checks,
// contiguous() and data_ptr lookups on tensors gone cold since the last token, a tensor list per output):
// ~27 us per layer, ~8% of an int4 token. A BoundGemv does the checks and lookups once, when the program is
// built, and runs all the layers of one input (q/k/v, gate/up) in one parallel region, dense ones included.
// It runs the ops' own kernels over the same tiles and rows, so its outputs are bit-identical to theirs.
#pragma once

#include <torch/extension.h>

#include <memory>
#include <vector>

namespace comptrust::cpu {

class BoundGemv {
 public:
  virtual ~BoundGemv() = default;
  int64_t k() const { return k_; }
  // Output widths, one per layer, in the order the layers were bound.
  const std::vector<int64_t>& widths() const { return widths_; }
  // x: k floats; y[i]: widths()[i] floats.
  virtual void run(const float* x, float* const* y) const = 0;

 protected:
  int64_t k_ = 0;
  std::vector<int64_t> widths_;
};

// gemm_tiled_many's (and gemm_tiled's) product of one fp32 row, for tiled layers of one input width, format and
// act_bits; nullptr where that product is not the AVX-512 direct or one-stream kernels (another ISA, int8 codes, a
// layer big enough for the int8-limb kernel, or int8 activations that do not fit the one-stream kernels), so the
// caller keeps calling the op.
std::shared_ptr<const BoundGemv> bind_tiled_gemv(const std::vector<at::Tensor>& weights,
                                                 const std::vector<at::Tensor>& zeros,
                                                 const std::vector<at::Tensor>& scales, int64_t bits,
                                                 int64_t group_size, int64_t act_bits);

// sparse24_gemm_tiled's product of one fp32 row, for 2:4 layers of one input width and one kind of float kept
// values; sparse24_int4_gemm_tiled's for int4 kept values of one group size and act_bits. nullptr without AVX-512
// (act_bits 8: without VNNI and VBMI), for non-contiguous tensors, mixed value dtypes, or (act_bits 0) an int4
// layer big enough for the int8-limb kernel.
std::shared_ptr<const BoundGemv> bind_sparse24_gemv(const std::vector<at::Tensor>& values,
                                                    const std::vector<at::Tensor>& meta);
std::shared_ptr<const BoundGemv> bind_sparse24_int4_gemv(const std::vector<at::Tensor>& weights,
                                                         const std::vector<at::Tensor>& meta,
                                                         const std::vector<at::Tensor>& zeros,
                                                         const std::vector<at::Tensor>& scales, int64_t group_size,
                                                         int64_t act_bits);

// bitmap_sparse_gemm's product of one fp32 row, for bitmap layers of `k` inputs (every layer's bitmap is checked
// whole here, so a corrupt one raises at binding).
std::shared_ptr<const BoundGemv> bind_bitmap_sparse_gemv(const std::vector<at::Tensor>& values,
                                                         const std::vector<at::Tensor>& mask,
                                                         const std::vector<at::Tensor>& row_start, int64_t k);

// dense_gemv's product of one fp32 row with fp32 weights [n_i, k] of one k; nullptr for other dtypes.
std::shared_ptr<const BoundGemv> bind_dense_gemv(const std::vector<at::Tensor>& weights);

}  // namespace comptrust::cpu
