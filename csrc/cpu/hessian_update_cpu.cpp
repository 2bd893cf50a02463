// The column-by-column error-feedback update of GPTQ and SparseGPT over one block of columns (CPU).
//
// Within a block the update is independent per output row: row r's error e = (w - q) / Hinv[i, i] at column
// i only moves row r's later columns (w[j] -= e * Hinv[i, j]). So each row runs the whole block with its
// values in L1 and the block's Hinv (B x B, 64 KiB at B = 128) in L2, rows spread over threads: no torch
// op per column, which is what dominates a torch implementation on a small model's layers. The trailing
// update of the later blocks (one matmul per block) stays in Python on BLAS (comptrust/compress/hessian.py).
//
// Every float operation is the one the pure-torch oracle performs, in the same order and without fused
// multiply-adds (fp-contract=off), so the quantized codes match it bit for bit; see
// comptrust.reference.hessian_block_update.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>

namespace comptrust::cpu {
namespace {

struct BlockProblem {
  float* w;                // [n, B] in: the block at its start; out: the quantized / pruned values
  const float* hinv;       // [B, B] upper Cholesky factor of H^-1, this block's diagonal block
  bool* mask;              // [n, B] true = pruned; read, and written at each group of M when prune_n > 0
  const float* scales;     // [n, S] (bits > 0)
  const float* zeros;      // [n, S] (bits > 0)
  const int32_t* col_group;  // [B]: column -> index into scales/zeros (bits > 0)
  float* err;              // [n, B] out: (w - q) / Hinv[i, i]
  float* loss;             // [n] out: sum over the block of (w - q)^2 / Hinv[i, i]^2 / 2
  int64_t n, width, groups_per_row;
  int64_t maxq;            // 2^bits - 1; 0 = no quantization
  int64_t prune_n, prune_m;
};

// Marks the prune_n columns of [i, i + prune_m) with the smallest w^2 / Hinv[j, j]^2 (ties: lower column).
inline void select_pruned(const BlockProblem& p, const float* w, bool* mask, int64_t i) {
  const int64_t end = std::min(i + p.prune_m, p.width);
  for (int64_t c = 0; c < p.prune_n && i + c < end; ++c) {
    int64_t best = -1;
    float best_score = 0.0f;
    for (int64_t j = i; j < end; ++j) {
      if (mask[j]) continue;
      const float d = p.hinv[j * p.width + j];
      const float score = (w[j] * w[j]) / (d * d);
      if (best < 0 || score < best_score) {
        best = j;
        best_score = score;
      }
    }
    mask[best] = true;
  }
}

// One row through the block. target_clones compiles it for AVX-512, AVX2 and baseline x86-64 and picks
// at load time; the inner subtraction vectorizes in each.
__attribute__((target_clones("avx512f", "avx2", "default"), optimize("fp-contract=off"))) void update_row(
    const BlockProblem& p, int64_t r) {
  float* w = p.w + r * p.width;
  bool* mask = p.mask + r * p.width;
  float* err = p.err + r * p.width;
  const float* scales = p.scales ? p.scales + r * p.groups_per_row : nullptr;
  const float* zeros = p.zeros ? p.zeros + r * p.groups_per_row : nullptr;
  const float maxq = static_cast<float>(p.maxq);
  float loss = 0.0f;
  for (int64_t i = 0; i < p.width; ++i) {
    if (p.prune_n > 0 && i % p.prune_m == 0) select_pruned(p, w, mask, i);
    const float value = w[i];
    float q = mask[i] ? 0.0f : value;
    if (p.maxq > 0) {
      const float s = scales[p.col_group[i]];
      const float z = zeros[p.col_group[i]];
      const float code = std::min(std::max(std::nearbyint(q / s) + z, 0.0f), maxq);
      q = s * (code - z);
    }
    const float* h = p.hinv + i * p.width;
    const float d = h[i];
    const float diff = value - q;
    loss += (diff * diff) / (d * d);
    const float e = diff / d;
    err[i] = e;
    w[i] = q;
    for (int64_t j = i + 1; j < p.width; ++j) w[j] = w[j] - e * h[j];
  }
  p.loss[r] = loss / 2.0f;
}

// Read-only inputs may have any strides (they are made contiguous); w and mask are updated in place, so
// they must be contiguous already.
void check_float_matrix(const at::Tensor& t, const char* what, int64_t rows, int64_t cols, bool in_place = false) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && (!in_place || t.is_contiguous()),
              "hessian_block_update: ", what, " must be a ", in_place ? "contiguous " : "", "2-D float32 CPU tensor, got ",
              t.scalar_type(),
              " of shape ", t.sizes(), " on ", t.device());
  TORCH_CHECK(t.size(0) == rows && (cols < 0 || t.size(1) == cols), "hessian_block_update: ", what, " has shape ",
              t.sizes(), ", expected [", rows, ", ", cols < 0 ? std::string("S") : std::to_string(cols), "]");
}

std::tuple<at::Tensor, at::Tensor> hessian_block_update_cpu(at::Tensor w, const at::Tensor& hinv_in,
                                                            const at::Tensor& scales_in, const at::Tensor& zeros_in,
                                                            const at::Tensor& col_group_in, int64_t bits,
                                                            at::Tensor mask, int64_t prune_n, int64_t prune_m) {
  TORCH_CHECK(w.dim() == 2, "hessian_block_update: w must be [n, B], got shape ", w.sizes());
  const int64_t n = w.size(0), width = w.size(1);
  check_float_matrix(w, "w", n, width, /*in_place=*/true);
  check_float_matrix(hinv_in, "hinv", width, width);
  const at::Tensor hinv = hinv_in.contiguous();
  const at::Tensor scales = scales_in.contiguous(), zeros = zeros_in.contiguous(), col_group = col_group_in.contiguous();
  TORCH_CHECK(mask.device().is_cpu() && mask.scalar_type() == at::kBool && mask.is_contiguous() &&
                  mask.sizes() == w.sizes(),
              "hessian_block_update: mask must be a contiguous bool CPU tensor shaped like w ", w.sizes(), ", got ",
              mask.scalar_type(), " ", mask.sizes());
  TORCH_CHECK(bits == 0 || (bits >= 2 && bits <= 8), "hessian_block_update: bits=", bits,
              " must be 0 (no quantization) or 2..8");
  TORCH_CHECK(prune_n >= 0 && (prune_n == 0 || (prune_m > prune_n && width % prune_m == 0)),
              "hessian_block_update: prune_n=", prune_n, ", prune_m=", prune_m, " need 0 <= N < M with the block width ",
              width, " a multiple of M");
  int64_t groups_per_row = 0;
  if (bits > 0) {
    check_float_matrix(scales_in, "scales", n, -1);
    groups_per_row = scales.size(1);
    check_float_matrix(zeros_in, "zeros", n, groups_per_row);
    TORCH_CHECK(col_group.device().is_cpu() && col_group.scalar_type() == at::kInt && col_group.dim() == 1 &&
                    col_group.numel() == width,
                "hessian_block_update: col_group must be an int32 CPU vector of ", width, " entries, got ",
                col_group.scalar_type(), " ", col_group.sizes());
    const auto [lo, hi] = at::aminmax(col_group);
    TORCH_CHECK(width == 0 || (lo.item<int32_t>() >= 0 && hi.item<int32_t>() < groups_per_row),
                "hessian_block_update: col_group entries must lie in [0, ", groups_per_row, ")");
  }
  at::Tensor err = at::empty_like(w);
  at::Tensor loss = at::zeros({n}, w.options());
  BlockProblem p{w.data_ptr<float>(),
                 hinv.data_ptr<float>(),
                 mask.data_ptr<bool>(),
                 bits > 0 ? scales.data_ptr<float>() : nullptr,
                 bits > 0 ? zeros.data_ptr<float>() : nullptr,
                 bits > 0 ? col_group.data_ptr<int32_t>() : nullptr,
                 err.data_ptr<float>(),
                 loss.data_ptr<float>(),
                 n,
                 width,
                 groups_per_row,
                 bits > 0 ? (int64_t{1} << bits) - 1 : 0,
                 prune_n,
                 prune_m};
  if (n > 0 && width > 0) {
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) update_row(p, r);
    });
  }
  return {err, loss};
}

}  // namespace
}  // namespace comptrust::cpu

TORCH_LIBRARY_IMPL(comptrust, CPU, m) { m.impl("hessian_block_update", &comptrust::cpu::hessian_block_update_cpu); }
