// ScreenedArgmax (screened_argmax.h): the int8 screen of an fp32 output projection and the exact rescoring after it.
#include "cpu/screened_argmax.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "cpu/decode_step.h"
#include "cpu/isa.h"
#include "cpu/simd_common.h"

namespace comptrust::cpu {
namespace {

constexpr double kUnit = 0x1p-24;      // fp32's unit roundoff
constexpr double kRoundUp = 1 + 0x1p-20;  // covers the few fp32 roundings in forming and comparing the bounds
constexpr int64_t kMaxK = 32768;       // sum over k of 255 * 127 stays an exact int32
constexpr int64_t kScreenGrain = 2048;  // rows per piece: 1.2 MB of codes at k = 576, 24 pieces
// Software prefetch into L2, 16 KB ahead. Cold (L3 flushed between calls, alternated in one process, 49152 x 576):
// 1.13 ms against 2.0 with prefetch into L1 at any distance from 2 to 32 KB, or none; the full fp32 projection 4.06.
constexpr int64_t kScreenPrefetchBytes = 16384;

// The largest of chunk(begin, end) over [0, n) cut in pieces of `grain`, the pieces shared between threads (one
// slot per piece, so nothing depends on which thread ran which, or on being called inside a parallel region).
template <class Chunk>
float max_over_pieces(int64_t n, int64_t grain, Chunk&& chunk) {
  std::vector<float> largest((n + grain - 1) / grain, -std::numeric_limits<float>::infinity());
  at::parallel_for(0, static_cast<int64_t>(largest.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t piece = first; piece < last; ++piece)
      largest[piece] = chunk(piece * grain, std::min(n, (piece + 1) * grain));
  });
  return *std::max_element(largest.begin(), largest.end());
}

// The float at or above v (v >= 0).
float round_up(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) < v) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// x as two int8 limbs of one scale over all k inputs: x~ = d0 a + d1 b, d0 = amax / 127, d1 = d0 / 254.
struct Query {
  double d0 = 0, d1 = 0;
  int64_t sum0 = 0, sum1 = 0;  // the limbs' sums: the codes' +128 offset comes off with 128 * these
  float norm = 0, error_norm = 0;  // |x| and |x - x~|, rounded up
};

#ifdef COMPTRUST_X86
// Rows [begin, end): upper[j] = A_j + b_j; returns max_j (A_j - b_j). Four rows share each load of the limbs; the codes
// are one sequential stream (rows are contiguous), two vpdpbusd per 64 codes.
COMPTRUST_AVX512_VNNI float screen_rows(const uint8_t* codes, int64_t padded_k, const int8_t* limbs, const Query& query,
                                        const float* scale, const float* per_x, const float* per_x_error,
                                        int64_t begin, int64_t end, float* upper) {
  const int8_t* limb0 = limbs;
  const int8_t* limb1 = limbs + padded_k;
  float lower_max = -std::numeric_limits<float>::infinity();
  auto finish = [&](int64_t row, int32_t sum0, int32_t sum1) {  // the rows' integer sums, with the +128 offset
    const int64_t t0 = sum0 - 128 * query.sum0, t1 = sum1 - 128 * query.sum1;
    const auto approx = static_cast<float>(static_cast<double>(scale[row]) * (query.d0 * t0 + query.d1 * t1));
    const float bound = query.norm * per_x[row] + query.error_norm * per_x_error[row];
    upper[row] = approx + bound;
    lower_max = std::max(lower_max, approx - bound);
  };
  int64_t j = begin;
  for (; j + 4 <= end; j += 4) {
    const uint8_t* rows = codes + j * padded_k;
    __m512i acc[4][2];
    for (auto& a : acc) a[0] = a[1] = _mm512_setzero_si512();
    for (int64_t c = 0; c < padded_k; c += 64) {
      const __m512i x0 = _mm512_loadu_si512(limb0 + c), x1 = _mm512_loadu_si512(limb1 + c);
      COMPTRUST_UNROLL
      for (int r = 0; r < 4; ++r) {
        const uint8_t* at = rows + r * padded_k + c;
        prefetch_to_l2(at, kScreenPrefetchBytes);
        const __m512i w = _mm512_loadu_si512(at);
        acc[r][0] = dpbusd(acc[r][0], w, x0);
        acc[r][1] = dpbusd(acc[r][1], w, x1);
      }
    }
    for (int r = 0; r < 4; ++r) finish(j + r, _mm512_reduce_add_epi32(acc[r][0]), _mm512_reduce_add_epi32(acc[r][1]));
  }
  for (; j < end; ++j) {
    __m512i sum0 = _mm512_setzero_si512(), sum1 = _mm512_setzero_si512();
    for (int64_t c = 0; c < padded_k; c += 64) {
      const __m512i w = _mm512_loadu_si512(codes + j * padded_k + c);
      sum0 = dpbusd(sum0, w, _mm512_loadu_si512(limb0 + c));
      sum1 = dpbusd(sum1, w, _mm512_loadu_si512(limb1 + c));
    }
    finish(j, _mm512_reduce_add_epi32(sum0), _mm512_reduce_add_epi32(sum1));
  }
  return lower_max;
}

// The rows j with upper[j] >= floor, in order, into rows; false where there are more than limit.
COMPTRUST_AVX512 bool rows_reaching(const float* upper, int64_t n, float floor, int64_t limit,
                                    std::vector<int64_t>& rows) {
  const __m512 level = _mm512_set1_ps(floor);
  int64_t j = 0;
  auto take = [&](int64_t row) {
    rows.push_back(row);
    return static_cast<int64_t>(rows.size()) <= limit;
  };
  for (; j + 16 <= n; j += 16)
    for (__mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(upper + j), level, _CMP_GE_OQ); hit; hit &= hit - 1)
      if (!take(j + __builtin_ctz(hit))) return false;
  for (; j < n; ++j)
    if (upper[j] >= floor && !take(j)) return false;
  return true;
}
#endif

// The two limbs of x into limbs (padded_k each, zero past k) and the query's scalars; false where x is not finite.
bool limbs_of(const float* x, int64_t k, int64_t padded_k, int8_t* limbs, Query& query) {
  float amax = 0.f;
  double squares = 0;
  for (int64_t i = 0; i < k; ++i) {
    if (!std::isfinite(x[i])) return false;
    amax = std::max(amax, std::fabs(x[i]));
    squares += static_cast<double>(x[i]) * x[i];
  }
  std::fill(limbs, limbs + 2 * padded_k, int8_t{0});
  query = Query{};
  if (amax == 0.f) return true;
  const float d0 = amax / 127.f, d1 = d0 / 254.f;  // the steps as floats: d_l * limb is exact in double
  query.d0 = d0;
  query.d1 = d1;
  double error_squares = 0;
  for (int64_t i = 0; i < k; ++i) {
    const double a = std::clamp(std::nearbyint(x[i] / query.d0), -127.0, 127.0);
    const double b = std::clamp(std::nearbyint((x[i] - a * query.d0) / query.d1), -127.0, 127.0);
    const double error = x[i] - (a * query.d0 + b * query.d1);  // exact: every term is a float times a small integer
    error_squares += error * error;
    limbs[i] = static_cast<int8_t>(a);
    limbs[padded_k + i] = static_cast<int8_t>(b);
    query.sum0 += static_cast<int64_t>(a);
    query.sum1 += static_cast<int64_t>(b);
  }
  query.norm = round_up(std::sqrt(squares) * kRoundUp);
  query.error_norm = round_up(std::sqrt(error_squares) * kRoundUp);
  return true;
}

// Unmaps the whole pages inside [begin, begin + bytes) from this process (MADV_DONTNEED). Only for a view of a
// clean file mapping (see build): a later read maps the same contents again, so a page another thread still reads
// comes back for it.
void release_file_pages(const void* begin, int64_t bytes) {
#ifdef __linux__
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t first = (reinterpret_cast<uintptr_t>(begin) + page - 1) / page * page;
  const uintptr_t last = (reinterpret_cast<uintptr_t>(begin) + static_cast<uintptr_t>(bytes)) / page * page;
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
#else
  (void)begin;
  (void)bytes;
#endif
}

bool screen_isa() {
#ifdef COMPTRUST_X86
  return avx512_vnni_usable();
#else
  return false;
#endif
}

}  // namespace

std::shared_ptr<const ScreenedArgmax> ScreenedArgmax::build(const at::Tensor& weight, std::string* why_not,
                                                            bool release_read_pages) {
  auto refuse = [&](std::string why) -> std::shared_ptr<const ScreenedArgmax> {
    if (why_not) *why_not = std::move(why);
    return nullptr;
  };
  if (!screen_isa()) return refuse("the CPU path is not AVX-512 with VNNI (" + selected_isa_name() + ")");
  if (!weight.defined() || !weight.device().is_cpu() || weight.scalar_type() != at::kFloat ||
      !weight.is_contiguous() || weight.dim() != 2)
    return refuse("the weight must be a contiguous fp32 CPU matrix [vocab, k]");
  if (weight.size(0) == 0 || weight.size(1) == 0 || weight.size(1) > kMaxK)
    return refuse("the weight must be [vocab, k] with vocab > 0 and 0 < k <= " + std::to_string(kMaxK) + ", got [" +
                  std::to_string(weight.size(0)) + ", " + std::to_string(weight.size(1)) + "]");
  // One pass over the weight makes the codes and finds a non-finite value (its row's norm is not finite).
  auto screen = std::make_shared<ScreenedArgmax>(weight, (weight.size(1) + 63) / 64 * 64, release_read_pages);
  if (!std::isfinite(screen->largest_row_norm_))
    return refuse("the weight has non-finite values (or a row whose norm overflows fp32)");
  return screen;
}

ScreenedArgmax::ScreenedArgmax(const at::Tensor& weight, int64_t padded_k, bool release_read_pages)
    : weight_(weight), weight_version_(weight._version()), vocab_(weight.size(0)), k_(weight.size(1)),
      padded_k_(padded_k) {
  codes_ = at::full({vocab_, padded_k_}, 128, at::TensorOptions().dtype(at::kByte));
  scale_.resize(vocab_);
  per_x_.resize(vocab_);
  per_x_error_.resize(vocab_);
  upper_.resize(vocab_);
  limbs_.resize(2 * padded_k_);
  // Each rounding of an fp32 logit's k products and sums (any order): gamma_k |x| |w_j|; A_j's own rounding and the
  // comparisons' take a few units more, charged on |x| (|w_j| + |s_j q_j|) and |x - x~| |s_j q_j|.
  const double gamma = k_ * kUnit / (1 - k_ * kUnit) + 8 * kUnit;
  const float* w = weight_.data_ptr<float>();
  uint8_t* codes = codes_.data_ptr<uint8_t>();
  largest_row_norm_ = max_over_pieces(vocab_, 256, [&](int64_t begin, int64_t end) {
    float norm_max = 0.f;
    for (int64_t j = begin; j < end; ++j) {
      const float* row = w + j * k_;
      float amax = 0.f;
      for (int64_t i = 0; i < k_; ++i) amax = std::max(amax, std::fabs(row[i]));
      const float scale = amax / 127.f;
      double row_squares = 0, kept_squares = 0, error_squares = 0;
      for (int64_t i = 0; i < k_; ++i) {
        const double q =
            scale > 0.f ? std::clamp(std::nearbyint(row[i] / static_cast<double>(scale)), -127.0, 127.0) : 0.0;
        const double kept = q * scale;  // exact in double
        codes[j * padded_k_ + i] = static_cast<uint8_t>(q + 128);
        row_squares += static_cast<double>(row[i]) * row[i];
        kept_squares += kept * kept;
        error_squares += (row[i] - kept) * (row[i] - kept);
      }
      // The double sums' own relative error (k units of 2^-53) is far inside kRoundUp.
      const double row_norm = std::sqrt(row_squares), kept_norm = std::sqrt(kept_squares);
      scale_[j] = scale;
      per_x_[j] = round_up((std::sqrt(error_squares) + gamma * (row_norm + kept_norm)) * kRoundUp);
      per_x_error_[j] = round_up(kept_norm * (1 + 8 * kUnit) * kRoundUp);
      // A non-finite value makes row_squares NaN or infinite (std::max would skip a NaN): build refuses the weight.
      if (!std::isfinite(row_squares)) return std::numeric_limits<float>::infinity();
      norm_max = std::max({norm_max, round_up(row_norm), round_up(kept_norm)});
    }
    if (release_read_pages) release_file_pages(w + begin * k_, (end - begin) * k_ * static_cast<int64_t>(sizeof(float)));
    return norm_max;
  });
}

int64_t ScreenedArgmax::bytes() const {
  return codes_.numel() + static_cast<int64_t>(sizeof(float)) * 4 * vocab_;  // codes; scale, bounds, scratch
}

std::optional<ScreenedArgmax::Choice> ScreenedArgmax::first_argmax(const float* x) const {
#ifdef COMPTRUST_X86
  if (weight_._version() != weight_version_) return std::nullopt;  // written in place since: the codes are stale
  Query query;
  if (!limbs_of(x, k_, padded_k_, limbs_.data(), query)) return std::nullopt;
  // Every |logit_j| <= |x| |w_j| (1 + gamma_k): far from fp32's overflow below 2^100, so no logit is infinite.
  if (static_cast<double>(query.norm) * largest_row_norm_ > 0x1p100) return std::nullopt;
  const float floor = max_over_pieces(vocab_, kScreenGrain, [&](int64_t begin, int64_t end) {
    return screen_rows(codes_.data_ptr<uint8_t>(), padded_k_, limbs_.data(), query, scale_.data(), per_x_.data(),
                       per_x_error_.data(), begin, end, upper_.data());
  });
  // The rows that may hold the largest logit: A_j + b_j >= max_i (A_i - b_i), in row order.
  std::vector<int64_t> rows;
  if (!rows_reaching(upper_.data(), vocab_, floor, max_rescored(), rows) || rows.empty()) return std::nullopt;
  // The fp32 logits of those rows as the full projection computes them; the first largest wins (rows are in order).
  Choice choice{rows.front(), static_cast<int64_t>(rows.size())};
  const float* w = weight_.data_ptr<float>();
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t j : rows) {
    float logit;
    dense_rows_f32(x, w + j * k_, k_, &logit, 0, 1, true);
    if (logit > best) {
      best = logit;
      choice.index = j;
    }
  }
  return choice;
#else
  (void)x;
  return std::nullopt;
#endif
}

}  // namespace comptrust::cpu

namespace comptrust::cpu {
namespace {

// torch.classes.comptrust.ScreenedArgmax: the screen on its own, for the tests (DecodeProgram.greedy holds one for a
// dense fp32 head).
class ScreenedArgmaxClass : public torch::CustomClassHolder {
 public:
  ScreenedArgmaxClass(const at::Tensor& weight, bool release_read_pages) {
    std::string why_not;
    screen_ = ScreenedArgmax::build(weight, &why_not, release_read_pages);
    TORCH_CHECK(screen_, "ScreenedArgmax: ", why_not);
  }
  // (index, rows rescored), or (-1, 0) where the caller would compute every logit.
  std::tuple<int64_t, int64_t> first_argmax(const at::Tensor& x) const {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() == screen_->k(),
                "ScreenedArgmax.first_argmax: x must be ", screen_->k(), " contiguous fp32 CPU values, got ",
                x.scalar_type(), " ", x.sizes());
    const std::optional<ScreenedArgmax::Choice> choice = screen_->first_argmax(x.data_ptr<float>());
    return choice ? std::make_tuple(choice->index, choice->rescored) : std::make_tuple(int64_t{-1}, int64_t{0});
  }
  int64_t max_rescored() const { return screen_->max_rescored(); }
  int64_t bytes() const { return screen_->bytes(); }

 private:
  std::shared_ptr<const ScreenedArgmax> screen_;
};

}  // namespace
}  // namespace comptrust::cpu

TORCH_LIBRARY_FRAGMENT(comptrust, m) {
  using comptrust::cpu::ScreenedArgmaxClass;
  m.class_<ScreenedArgmaxClass>("ScreenedArgmax")
      .def(torch::init<at::Tensor, bool>())
      .def("first_argmax", &ScreenedArgmaxClass::first_argmax)
      .def("max_rescored", &ScreenedArgmaxClass::max_rescored)
      .def("bytes", &ScreenedArgmaxClass::bytes);
}
