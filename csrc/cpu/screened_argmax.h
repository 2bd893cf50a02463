// The greedy token of an fp32 output projection, read mostly from an int8 copy of it: the same answer as the first
// argmax of dense_gemv's logits, bit for bit, for about a quarter of the bytes.
//
// Why: the embedded model's projection (49152 x 576 fp32, 113 MB, tied to the embeddings) is read whole for every
// greedy token and was ~55% of an int4 model's token (2.3-3.1 of ~5.6 ms), the same for every configuration.
// Only the winner is wanted. Each row j keeps int8 codes q_j with one scale s_j; a screen pass reads them (28 MB)
// and gives A_j = s_j q_j . x~ (x~: x as two int8 limbs, integer sums exact) with a proven bound
//   |fp32 logit_j - A_j| <= b_j = |x| |w_j - s_j q_j| + |x - x~| |s_j q_j| + rounding terms   (|.|: 2-norms)
// (Cauchy-Schwarz on the two differences, gamma_k |x| |w_j| for any fp32 summation order of the logit). The row
// norms are worked out once, in double, rounded up. Only rows whose A_j + b_j reaches max_i (A_i - b_i) can hold
// the largest logit; those few (SmolLM2 on WikiText-2: median 3, at worst 162 of 49152 over 512 positions) are
// computed again by the fp32 kernel dense_gemv runs (dense_rows_f32, the same code) and the first largest wins, as
// torch.argmax has it.
// Where too many rows survive, or x is not finite or could overflow, the caller computes every logit instead; so too
// once the weight has been written in place (its version counter moved: torch's in-place ops, copy_,
// load_state_dict; writes through .data or numpy do not move it and are not seen).
#pragma once

#include "torch_and_intrinsics.h"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace comptrust::cpu {

class ScreenedArgmax {
 public:
  struct Choice {
    int64_t index;     // the first largest logit's row
    int64_t rescored;  // how many rows the fp32 kernel computed
  };

  // The screen of weight [vocab, k] (fp32, contiguous, finite, k <= 32768), or nullptr with the reason in *why_not
  // (also where the CPU path is not AVX-512 with VNNI, whose dense kernel the rescoring must be).
  // release_read_pages: the weight is a view of a file mapping no page of which was ever written (the caller checks:
  // comptrust.memory), and each piece's whole pages are unmapped once its codes are made, so that the table is never
  // resident at once: a serving process builds the screen of the embedded model's 113 MB tied head while its layers
  // are already built, and loading peaked ~100 MiB above decoding for it. Reads map the pages again from the file.
  static std::shared_ptr<const ScreenedArgmax> build(const at::Tensor& weight, std::string* why_not = nullptr,
                                                     bool release_read_pages = false);

  // dense_gemv(x, weight)'s first argmax for k floats x, or nullopt where the caller must compute every logit:
  // x not finite, large enough to overflow a logit, more than max_rescored() rows left by the screen, or the weight
  // written in place since build.
  // Not for concurrent calls (one scratch row).
  std::optional<Choice> first_argmax(const float* x) const;

  int64_t vocab() const { return vocab_; }
  int64_t k() const { return k_; }
  int64_t max_rescored() const { return std::max<int64_t>(64, vocab_ / 16); }
  // The bytes it keeps besides the fp32 weight: codes and per-row scale and bounds.
  int64_t bytes() const;

  ScreenedArgmax(const at::Tensor& weight, int64_t padded_k, bool release_read_pages);  // use build()

 private:
  at::Tensor weight_;              // the fp32 projection: rescoring, and alive as long as this
  int64_t weight_version_ = 0;     // its version counter when the codes were made
  at::Tensor codes_;               // uint8 [vocab, padded_k_]: q + 128, padding 128 (q = 0)
  std::vector<float> scale_;       // s_j
  std::vector<float> per_x_;       // b_j's factor of |x|: |w_j - s_j q_j| and the rounding terms, rounded up
  std::vector<float> per_x_error_; // b_j's factor of |x - x~|: |s_j q_j| with its rounding term, rounded up
  float largest_row_norm_ = 0.f;   // max_j |w_j| and |s_j q_j|: x is refused where |x| times this could overflow
  int64_t vocab_ = 0, k_ = 0, padded_k_ = 0;
  mutable std::vector<float> upper_;   // A_j + b_j
  mutable std::vector<int8_t> limbs_;  // x~'s two limbs, padded_k_ each
};

}  // namespace comptrust::cpu
