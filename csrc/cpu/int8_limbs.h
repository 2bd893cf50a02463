// fp32 activations as three int8 limbs per block of inputs, for the int8 (VNNI) kernels at batch 1
// (gemm_tiled_*.cpp, sparse24_*.cpp): x = d0 a + d1 b + d2 c with d0 = amax / 127, d1 = d0 / 254,
// d2 = d1 / 254, each limb the rounding of what the ones before leave (at most half a step, so |b|, |c| <= 127).
// What is left is at most d2 / 2 = amax / 8.2e6, under 2^-23 of the block's largest input: below the fp32
// rounding of any product sum that includes that input. The kernels' integer products are exact, so the
// result has the fp32 kernels' accuracy (a third limb dropped: 4e-5 relative error on wide-range inputs).
#pragma once
#include "isa.h"  // defines COMPTRUST_X86 on x86-64

namespace comptrust::cpu {
constexpr int kLimbs = 3;

// The one-stream kernels' limb blocks (gemm_tiled_stream.cpp, sparse24_vnni.cpp's stream_int4_avx512): a
// quantization group's inputs, at most this many, share one set of steps. Each block's integer sums are scaled by
// its steps and added, 9 instructions per block on 8 columns: per 32 inputs that was a sixth of the int3 kernel's
// work and bounded it (int3's one-stream kernel: blocks of 128 run it 1.09-1.13x as fast cold). The int32 sums hold:
// |sum| <= 128 * 127 * 15 per block. Accuracy: limbs of a block leave at most its largest |x| / 8.2e6 per input.
constexpr int64_t kLimbBlock = 128;
}

#ifdef COMPTRUST_X86
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>

#include "comptrust/cpu_tiles.h"
#include "simd_common.h"

namespace comptrust::cpu {

// Whether the limbs of k inputs (kLimbs * k bytes), which the one-row kernels read again for every tile, fill at
// most 70% of a core's L1 data cache (gemm_tiled.h's one-stream kernels: where that bound was measured).
inline bool limbs_fit_l1(int64_t k) { return kLimbs * k <= l1d_bytes() * 7 / 10; }

// Where a block's inputs go in a kernel's lane order: input j to byte to[j], byte j from input from[j].
struct LimbOrder {
  alignas(64) std::array<int32_t, kActBlock> from;
  std::array<int32_t, kActBlock> to;
};

template <class Position>
LimbOrder limb_order(Position&& position) {
  LimbOrder order{};
  for (int j = 0; j < kActBlock; ++j) {
    order.to[j] = static_cast<int32_t>(position(j));
    order.from[order.to[j]] = j;
  }
  return order;
}

// The largest |x[j]| of count inputs.
COMPTRUST_AVX512 inline float block_amax(const float* x, int64_t count) {
  __m512 top = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= count; j += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(x + j)));
  float amax = _mm512_reduce_max_ps(top);
  for (; j < count; ++j) amax = std::max(amax, std::fabs(x[j]));
  return amax;
}

// The limb steps d0, d1, d2 of a block whose largest |x| is amax.
inline void limb_steps(float amax, float (&steps)[kLimbs]) {
  steps[0] = amax / 127.f;
  steps[1] = steps[0] / 254.f;
  steps[2] = steps[1] / 254.f;
}

// out[l][order.to[j]] = limb l of x[j] for count inputs (count <= kActBlock; with count < kActBlock, order must
// keep the first count positions among themselves), with the steps of a block holding them (limb_steps of an
// amax at least their largest |x|).
COMPTRUST_AVX512 inline void limbs_with_steps(const float* x, int64_t count, const LimbOrder& order,
                                              int8_t* const (&out)[kLimbs], const float (&steps)[kLimbs]) {
  float inverse[kLimbs];
  for (int l = 0; l < kLimbs; ++l) inverse[l] = steps[0] > 0.f ? 1.f / steps[l] : 0.f;
  if (count == kActBlock) {
    const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
    __m512 rest[2] = {_mm512_permutex2var_ps(x0, _mm512_load_si512(order.from.data()), x1),
                      _mm512_permutex2var_ps(x0, _mm512_load_si512(order.from.data() + 16), x1)};
    const __m512 bound = _mm512_set1_ps(127.f), minus_bound = _mm512_set1_ps(-127.f);
    for (int l = 0; l < kLimbs; ++l)
      for (int h = 0; h < 2; ++h) {
        const __m512 scaled = _mm512_roundscale_ps(_mm512_mul_ps(rest[h], _mm512_set1_ps(inverse[l])), 0);  // nearest even
        const __m512 q = _mm512_max_ps(minus_bound, _mm512_min_ps(bound, scaled));
        rest[h] = _mm512_fnmadd_ps(q, _mm512_set1_ps(steps[l]), rest[h]);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out[l] + 16 * h), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q)));
      }
    return;
  }
  for (int64_t j = 0; j < count; ++j) {
    float rest = x[j];
    for (int l = 0; l < kLimbs; ++l) {
      const float q = std::clamp(std::nearbyint(rest * inverse[l]), -127.f, 127.f);
      rest = std::fma(-q, steps[l], rest);
      out[l][order.to[j]] = static_cast<int8_t>(q);
    }
  }
}

// limbs_with_steps for a block of its own (count <= kActBlock inputs), its steps written to `steps`.
COMPTRUST_AVX512 inline void limbs_of_block(const float* x, int64_t count, const LimbOrder& order,
                                            int8_t* const (&out)[kLimbs], float (&steps)[kLimbs]) {
  limb_steps(block_amax(x, count), steps);
  limbs_with_steps(x, count, order, out, steps);
}

}  // namespace comptrust::cpu
#endif  // COMPTRUST_X86
