// The small per-token steps of batch-1 decoding around the linear layers (comptrust.lean_decode):
// residual add + RMSNorm, rotary embedding + KV-cache append + single-query attention, the MLP's
// silu(gate) * up, and the product of one row by a dense weight (the vocabulary projection).
//
// Why in C++: at batch 1 each is a few thousand flops, and torch spends its time dispatching them:
// RMSNorm is 7 aten ops, the attention step ~20 (views, rotate_half, cache writes, SDPA), 4-6 us each
// on this machine. Fused, they cost what their arithmetic costs. The math is transformers' Llama
// (LlamaRMSNorm, apply_rotary_pos_emb, SDPA with grouped KV heads); comptrust.reference has the same in
// torch, and the tests hold both to transformers' forward.
#include "cpu/torch_and_intrinsics.h"  // first: before anything reads torch

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/bound_gemv.h"
#include "cpu/decode_step.h"
#include "cpu/isa.h"
#include "cpu/simd_common.h"

#if defined(__GNUC__) && !defined(__clang__)
#define COMPTRUST_ONE_COPY __attribute__((noipa))
#else
#define COMPTRUST_ONE_COPY __attribute__((noinline))
#endif

namespace comptrust::cpu {
namespace {

// One compiled copy (as silu_mul_elements and decode_attention_impl) that the ops and the raw entry points
// (decode_step.h) share: GCC's constant-propagation clone for the raw entry's one row summed the squares in another
// order than the op's copy (a last-bit difference in the norm), and DecodeProgram's steps must match the ops' bit
// for bit. noipa keeps GCC from inlining or cloning it.
template <typename T>
COMPTRUST_ONE_COPY void residual_rms_norm_rows(T* hidden, const T* delta, const T* weight, T* out, int64_t rows, int64_t width,
                            float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    T* h = hidden + r * width;
    if (delta != nullptr) {
      const T* d = delta + r * width;
      for (int64_t i = 0; i < width; ++i) h[i] = static_cast<T>(static_cast<float>(h[i]) + static_cast<float>(d[i]));
    }
    float sum_sq = 0.f;
#pragma omp simd reduction(+ : sum_sq)
    for (int64_t i = 0; i < width; ++i) sum_sq += static_cast<float>(h[i]) * static_cast<float>(h[i]);
    const float inv_rms = 1.f / std::sqrt(sum_sq / static_cast<float>(width) + eps);
    T* o = out + r * width;
    // weight * (x * inv_rms) rounded to T first, as LlamaRMSNorm does for reduced-precision models
    for (int64_t i = 0; i < width; ++i)
      o[i] = static_cast<T>(static_cast<float>(weight[i]) * static_cast<float>(static_cast<T>(static_cast<float>(h[i]) * inv_rms)));
  }
}

// x * cos + rotate_half(x) * sin for one head, rotate_half(x) = (-x2, x1); each product rounded as torch does.
template <typename T>
void rotate(const T* x, const T* cos, const T* sin, int64_t head_dim, T* out) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < head_dim; ++i) {
    const float rotated = i < half ? -static_cast<float>(x[i + half]) : static_cast<float>(x[i - half]);
    const T a = static_cast<T>(static_cast<float>(x[i]) * static_cast<float>(cos[i]));
    const T b = static_cast<T>(rotated * static_cast<float>(sin[i]));
    out[i] = static_cast<T>(static_cast<float>(a) + static_cast<float>(b));
  }
}

// softmax(scale * q.K^T) V for one query head over `length` cached positions, in fp32. `scores` holds
// `length` floats of scratch.
template <typename T>
void attend(const float* query, const T* keys, const T* values, int64_t length, int64_t head_dim, float scale,
            float* scores, float* out) {
  float top = -INFINITY;
  for (int64_t j = 0; j < length; ++j) {
    float dot = 0.f;
    for (int64_t i = 0; i < head_dim; ++i) dot += query[i] * static_cast<float>(keys[j * head_dim + i]);
    scores[j] = dot * scale;
    top = std::max(top, scores[j]);
  }
  float total = 0.f;
  for (int64_t j = 0; j < length; ++j) total += (scores[j] = std::exp(scores[j] - top));
  for (int64_t i = 0; i < head_dim; ++i) out[i] = 0.f;
  for (int64_t j = 0; j < length; ++j)
    for (int64_t i = 0; i < head_dim; ++i) out[i] += scores[j] / total * static_cast<float>(values[j * head_dim + i]);
}

#ifdef COMPTRUST_X86
// ------------------------------------------------------------------- fp32 caches on AVX-512 (head_dim % 16 == 0)
// Written for the embedded model's decode step, where the earlier version (one query head per task) took 36 us of
// every layer, 1.1 ms of an int4 token: its tasks were too small to wake the second thread, it read each kv head's
// keys and values once per query head and called std::exp per position. This one: 16 us (torch profiler, same run).
//   * work: (kv head, stretch of positions) tasks, every query head of the kv head's group in the task, so its
//     keys and values are read once (the caches are cold: the vocabulary projection's stream evicts them);
//   * stretches: kPartPositions-position parts, a number that depends on the length alone. Each part keeps its
//     own running max, sum and unnormalised output, merged in part order afterwards (as flash-decoding does),
//     so the result is the same on one thread or two and both threads have work even with few kv heads;
//   * exp: 16 lanes at a time (exp_avx512).
constexpr int64_t kPartPositions = 64;
constexpr int kMaxPartHeads = 4;  // query heads per pass over a part (4 keys x 4 heads: 16 accumulators)

// e^x for x <= 0 (scores minus their max), 16 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by Cephes' expf
// polynomial (within 2 ulp of the true value), times 2^n by vscalefps, which goes to 0 below the fp32 range.
COMPTRUST_AVX512 inline __m512 exp_avx512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 poly = _mm512_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(c));
  const __m512 e = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(poly, r), r, r), _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(e, n);
}

// out[g][i .. i + 16W) = sum_j p[g * n + j] * values[j, i .. i + 16W)
template <int G, int W>
COMPTRUST_AVX512 inline void weighted_values(const float* p, const float* values, int64_t n, int64_t head_dim,
                                             int64_t i, float* const* out) {
  __m512 acc[G][W];
  for (int g = 0; g < G; ++g)
    for (int w = 0; w < W; ++w) acc[g][w] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    __m512 value[W];
    for (int w = 0; w < W; ++w) value[w] = _mm512_loadu_ps(values + j * head_dim + i + 16 * w);
    for (int g = 0; g < G; ++g) {
      const __m512 weight = _mm512_set1_ps(p[g * n + j]);
      for (int w = 0; w < W; ++w) acc[g][w] = _mm512_fmadd_ps(weight, value[w], acc[g][w]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int w = 0; w < W; ++w) _mm512_storeu_ps(out[g] + i + 16 * w, acc[g][w]);
}

// One part's softmax numerators for G query heads q[g] (rotated, fp32) over keys/values [length, head_dim] rows
// [begin, end): max[g], sum[g] = sum_j e^(s_j - max) and out[g] = sum_j e^(s_j - max) v_j (not yet divided).
// scores: G * (end - begin) floats of scratch.
template <int G>
COMPTRUST_AVX512 void attend_part_f32(const float* const* q, const float* keys, const float* values, int64_t begin,
                                      int64_t end, int64_t head_dim, float scale, float* scores, float* max,
                                      float* sum, float* const* out) {
  const int64_t n = end - begin;
  keys += begin * head_dim;
  values += begin * head_dim;
  constexpr int kKeys = 4;  // keys per step: G * 4 independent dot-product chains
  int64_t j = 0;
  for (; j + kKeys <= n; j += kKeys) {
    // The caches come from DRAM (the vocabulary projection's stream evicts them): keys a few rows ahead, and
    // the value rows the second pass will read, into L2 while the scores are computed.
    for (int64_t line = 0; line < kKeys * head_dim; line += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(keys + (j + 2 * kKeys) * head_dim + line), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(values + j * head_dim + line), _MM_HINT_T1);
    }
    __m512 dot[G][kKeys];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < kKeys; ++c) dot[g][c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < head_dim; i += 16) {
      __m512 key[kKeys];
      for (int c = 0; c < kKeys; ++c) key[c] = _mm512_loadu_ps(keys + (j + c) * head_dim + i);
      for (int g = 0; g < G; ++g) {
        const __m512 qv = _mm512_loadu_ps(q[g] + i);
        for (int c = 0; c < kKeys; ++c) dot[g][c] = _mm512_fmadd_ps(qv, key[c], dot[g][c]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < kKeys; ++c) scores[g * n + j + c] = _mm512_reduce_add_ps(dot[g][c]) * scale;
  }
  for (; j < n; ++j)
    for (int g = 0; g < G; ++g) {
      __m512 dot = _mm512_setzero_ps();
      for (int64_t i = 0; i < head_dim; i += 16)
        dot = _mm512_fmadd_ps(_mm512_loadu_ps(q[g] + i), _mm512_loadu_ps(keys + j * head_dim + i), dot);
      scores[g * n + j] = _mm512_reduce_add_ps(dot) * scale;
    }
  for (int g = 0; g < G; ++g) {
    float* s = scores + g * n;
    float top = -INFINITY;
    for (j = 0; j < n; ++j) top = std::max(top, s[j]);
    const __m512 top_v = _mm512_set1_ps(top);
    __m512 total = _mm512_setzero_ps();
    for (j = 0; j + 16 <= n; j += 16) {
      const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(s + j), top_v));
      _mm512_storeu_ps(s + j, e);
      total = _mm512_add_ps(total, e);
    }
    if (j < n) {
      const __mmask16 tail = static_cast<__mmask16>((1u << (n - j)) - 1);
      const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + j), top_v));
      _mm512_mask_storeu_ps(s + j, tail, e);
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(tail, e));
    }
    max[g] = top;
    sum[g] = _mm512_reduce_add_ps(total);
  }
  // sum_j p_gj v_j, 64 columns of head_dim at a time (G * 4 accumulators), each value row read once for all G
  int64_t i = 0;
  for (; i + 64 <= head_dim; i += 64) weighted_values<G, 4>(scores, values, n, head_dim, i, out);
  for (; i < head_dim; i += 16) weighted_values<G, 1>(scores, values, n, head_dim, i, out);
}

// Every query head of queries [heads, head_dim] (rotated, fp32) against caches [kv_heads, max_len, head_dim]
// over positions 0..length-1, into out [heads, head_dim].
void attend_all_f32_avx512(const float* queries, const float* key_cache, const float* value_cache, int64_t heads,
                           int64_t kv_heads, int64_t max_len, int64_t head_dim, int64_t length, float scale,
                           float* out) {
  const int64_t group = heads / kv_heads;
  const int64_t parts = (length + kPartPositions - 1) / kPartPositions;
  const int64_t part_len = (length + parts - 1) / parts;
  // per (part, query head): max, sum, then head_dim unnormalised outputs
  const int64_t stride = head_dim + 2;
  std::vector<float> partial(parts * heads * stride);
  // ~2^15 multiply-adds per task before a second thread pays (a wake-up costs ~1 us here)
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / (2 * group * part_len * head_dim));
  at::parallel_for(0, kv_heads * parts, grain, [&](int64_t task_begin, int64_t task_end) {
    std::vector<float> scores(kMaxPartHeads * part_len);
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t kv = task / parts, part = task % parts;
      const int64_t begin = part * part_len, end = std::min(length, begin + part_len);
      const float* keys = key_cache + kv * max_len * head_dim;
      const float* values = value_cache + kv * max_len * head_dim;
      for (int64_t h0 = kv * group; h0 < (kv + 1) * group; h0 += kMaxPartHeads) {
        const int count = static_cast<int>(std::min<int64_t>(kMaxPartHeads, (kv + 1) * group - h0));
        float* slot[kMaxPartHeads];
        const float* q[kMaxPartHeads];
        float* o[kMaxPartHeads];
        float maxes[kMaxPartHeads], sums[kMaxPartHeads];
        for (int g = 0; g < count; ++g) {
          slot[g] = partial.data() + (part * heads + h0 + g) * stride;
          q[g] = queries + (h0 + g) * head_dim;
          o[g] = slot[g] + 2;
        }
        switch (count) {
          case 1: attend_part_f32<1>(q, keys, values, begin, end, head_dim, scale, scores.data(), maxes, sums, o); break;
          case 2: attend_part_f32<2>(q, keys, values, begin, end, head_dim, scale, scores.data(), maxes, sums, o); break;
          case 3: attend_part_f32<3>(q, keys, values, begin, end, head_dim, scale, scores.data(), maxes, sums, o); break;
          default: attend_part_f32<4>(q, keys, values, begin, end, head_dim, scale, scores.data(), maxes, sums, o);
        }
        for (int g = 0; g < count; ++g) {
          slot[g][0] = maxes[g];
          slot[g][1] = sums[g];
        }
      }
    }
  });
  // merge the parts in order: out = sum_p e^(max_p - top) out_p / sum_p e^(max_p - top) sum_p
  for (int64_t h = 0; h < heads; ++h) {
    float top = -INFINITY;
    for (int64_t part = 0; part < parts; ++part) top = std::max(top, partial[(part * heads + h) * stride]);
    float total = 0.f;
    float* result = out + h * head_dim;
    std::fill(result, result + head_dim, 0.f);
    for (int64_t part = 0; part < parts; ++part) {
      const float* slot = partial.data() + (part * heads + h) * stride;
      const float factor = std::exp(slot[0] - top);
      total += factor * slot[1];
      for (int64_t i = 0; i < head_dim; ++i) result[i] += factor * slot[2 + i];
    }
    const float inverse = 1.f / total;
    for (int64_t i = 0; i < head_dim; ++i) result[i] *= inverse;
  }
}
#endif

template <typename T>
COMPTRUST_ONE_COPY void decode_attention_impl(const T* q, const T* k, const T* v, T* key_cache, T* value_cache, const T* cos,
                           const T* sin, int64_t heads, int64_t kv_heads, int64_t max_len, int64_t head_dim,
                           int64_t position, float scale, T* out) {
  for (int64_t g = 0; g < kv_heads; ++g) {
    const int64_t row = (g * max_len + position) * head_dim;
    rotate(k + g * head_dim, cos, sin, head_dim, key_cache + row);
    for (int64_t i = 0; i < head_dim; ++i) value_cache[row + i] = v[g * head_dim + i];
  }
  const int64_t length = position + 1, group = heads / kv_heads;
#ifdef COMPTRUST_X86
  if constexpr (std::is_same_v<T, float>) {
    if (head_dim % 16 == 0 && select_isa() == Isa::kAvx512) {
      std::vector<float> queries(heads * head_dim);
      for (int64_t h = 0; h < heads; ++h) rotate(q + h * head_dim, cos, sin, head_dim, queries.data() + h * head_dim);
      attend_all_f32_avx512(queries.data(), key_cache, value_cache, heads, kv_heads, max_len, head_dim, length, scale,
                            out);
      return;
    }
  }
#endif
  // Otherwise one query head per task, in fp32; one thread below ~2^18 multiply-adds per task: waking the
  // second costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / (2 * length * head_dim));
  at::parallel_for(0, heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> query(head_dim), result(head_dim), scores(length);
    std::vector<T> rotated(head_dim);
    for (int64_t h = begin; h < end; ++h) {
      rotate(q + h * head_dim, cos, sin, head_dim, rotated.data());
      for (int64_t i = 0; i < head_dim; ++i) query[i] = static_cast<float>(rotated[i]);
      const T* keys = key_cache + (h / group) * max_len * head_dim;
      const T* values = value_cache + (h / group) * max_len * head_dim;
      attend(query.data(), keys, values, length, head_dim, scale, scores.data(), result.data());
      for (int64_t i = 0; i < head_dim; ++i) out[h * head_dim + i] = static_cast<T>(result[i]);
    }
  });
}

// ------------------------------------------------------------------------------------------ silu(gate) * up
// silu(g) = g / (1 + e^-g), rounded to T, times up, rounded to T: F.silu(gate) * up's roundings. e^-g is
// exp_avx512's with its argument capped at 100, past which 1 + e^-g is inf in fp32 and silu -0 (torch: at most
// a denormal); the lanes agree with torch's to a few ulp (a different exp polynomial), not bit for bit.
template <typename T>
float silu_scalar(T g) {
  const float x = static_cast<float>(g);
  return x / (1.f + std::exp(-x));
}

#ifdef COMPTRUST_X86
COMPTRUST_AVX512 inline __m512 silu_mul16(__m512 g, __m512 u) {
  const __m512 e = exp_avx512(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), g), _mm512_set1_ps(100.f)));
  return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)), u);
}

COMPTRUST_AVX512 void silu_mul_avx512(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, silu_mul16(_mm512_loadu_ps(gate + i), _mm512_loadu_ps(up + i)));
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(out + i, tail,
                          silu_mul16(_mm512_maskz_loadu_ps(tail, gate + i), _mm512_maskz_loadu_ps(tail, up + i)));
  }
}
#endif

template <typename T>
COMPTRUST_ONE_COPY void silu_mul_elements(const T* gate, const T* up, T* out, int64_t n) {
#ifdef COMPTRUST_X86
  if constexpr (std::is_same_v<T, float>) {
    if (select_isa() == Isa::kAvx512) return silu_mul_avx512(gate, up, out, n);
  }
#endif
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<T>(static_cast<float>(static_cast<T>(silu_scalar(gate[i]))) * static_cast<float>(up[i]));
}

// ------------------------------------------------------------------------------- one row by a dense weight
// y[j] = weight[j, :] . x for rows j of a row-major weight [n, k], x in fp32, sums in fp32. MKL's sgemv takes
// the embedded model's vocabulary projection (49152 x 576, 113 MB in fp32) on one thread: 11.3 GB/s here, 9.7 ms
// of an int4 token's 15.4. Each thread here takes a stretch of rows, one row at a time, so each output's order of
// summation is fixed whatever the thread count.
#ifdef COMPTRUST_X86
template <typename T>
COMPTRUST_AVX512 inline __m512 load16_as_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

// One row: the thread's rows are read as one sequential stream, four independent sums per row, software prefetch
// 8 KB ahead. Four rows at a time (four streams 2.3 KB apart, each prefetching the next four rows) read the
// 49152 x 576 projection at 22-28 GB/s alone and this at 26-31 (AMD EPYC, 2 threads, side by side); inside the
// embedded model's int4 decode step, alternated in one process, the projection went from 4.5 to 2.1-2.3 ms.
// Into L2, not L1: cold and alternated in one process, 1.06-1.19x over prefetch into L1 4 KB ahead on SmolLM2's and
// Llama-7B's shapes (the dense embedded model's decode 1.13x at 16 KB): the L1's few miss buffers held the stream back.
constexpr int kDenseRowPrefetchBytes = 8192;

template <typename T>
COMPTRUST_AVX512 void dot_row_avx512(const float* x, const T* w, int64_t k, T* y) {
  const int64_t full = k / 64 * 64, full16 = k / 16 * 16;
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t i = 0;
  for (; i < full; i += 64) {
    for (int a = 0; a < 4; ++a) {
      prefetch_to_l2(w + i + 16 * a, kDenseRowPrefetchBytes);
      acc[a] = _mm512_fmadd_ps(load16_as_float(w + i + 16 * a), _mm512_loadu_ps(x + i + 16 * a), acc[a]);
    }
  }
  for (; i < full16; i += 16) acc[0] = _mm512_fmadd_ps(load16_as_float(w + i), _mm512_loadu_ps(x + i), acc[0]);
  float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
  for (; i < k; ++i) sum += static_cast<float>(w[i]) * x[i];
  *y = static_cast<T>(sum);
}
#endif

#ifdef COMPTRUST_X86
template <typename T>
COMPTRUST_AVX2 inline __m256 load8_as_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

// dot_row_avx512's AVX2 twin (CPUs without AVX-512, e.g. AMD Zen 2/3): four sums of 8 over 32-input blocks, leftover
// 8-blocks into the first, then reduce_add8 and the inputs past the last 8 one by one. Before it such CPUs ran
// dense_gemv on the scalar loop (no vectorized float reduction without -ffast-math), which made every dense decode
// baseline there look ~3x slower than it is: forced to each path on the Zen 4 here, cold, alternated in one process,
// the scalar loop ran at 0.30-0.37x of this one on SmolLM2's and Llama-7B's shapes (the AVX-512 rows 0.87-1.14x).
template <typename T>
COMPTRUST_AVX2 void dot_row_avx2(const float* x, const T* w, int64_t k, T* y) {
  const int64_t full = k / 32 * 32, full8 = k / 8 * 8;
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i < full; i += 32) {
    prefetch_to_l2(w + i, kDenseRowPrefetchBytes);
    for (int a = 0; a < 4; ++a)
      acc[a] = _mm256_fmadd_ps(load8_as_float(w + i + 8 * a), _mm256_loadu_ps(x + i + 8 * a), acc[a]);
  }
  for (; i < full8; i += 8) acc[0] = _mm256_fmadd_ps(load8_as_float(w + i), _mm256_loadu_ps(x + i), acc[0]);
  float sum = reduce_add8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; i < k; ++i) sum += static_cast<float>(w[i]) * x[i];
  *y = static_cast<T>(sum);
}
#endif

template <typename T>
void dot_rows_scalar(const float* x, const T* w, int64_t k, T* y) {
  float sum = 0.f;
  for (int64_t i = 0; i < k; ++i) sum += static_cast<float>(w[i]) * x[i];
  *y = static_cast<T>(sum);
}

void check_cpu_float(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " is ", t.scalar_type(), ", expected ", dtype,
              " (every tensor of the call shares one dtype)");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

template <typename F>
void dispatch_float(at::ScalarType dtype, const char* op, F&& body) {
  switch (dtype) {
    case at::kFloat: body(float{}); break;
    case at::kBFloat16: body(c10::BFloat16{}); break;
    case at::kHalf: body(c10::Half{}); break;
    default: TORCH_CHECK(false, op, ": dtype ", dtype, " is not float32, bfloat16 or float16");
  }
}

}  // namespace

at::Tensor residual_rms_norm_cpu(at::Tensor hidden, const c10::optional<at::Tensor>& delta, const at::Tensor& weight,
                                 double eps) {
  constexpr const char* op = "residual_rms_norm";
  const auto dtype = hidden.scalar_type();
  check_cpu_float(op, "hidden", hidden, dtype);
  check_cpu_float(op, "weight", weight, dtype);
  TORCH_CHECK(hidden.dim() >= 1 && hidden.size(-1) > 0, op, ": hidden must be [..., width], got ", hidden.sizes());
  const int64_t width = hidden.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == width, op, ": weight is ", weight.sizes(), ", expected [",
              width, "]");
  if (delta.has_value()) {
    check_cpu_float(op, "delta", *delta, dtype);
    TORCH_CHECK(delta->sizes() == hidden.sizes(), op, ": delta is ", delta->sizes(), ", hidden ", hidden.sizes());
  }
  at::Tensor out = at::empty_like(hidden);
  dispatch_float(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    residual_rms_norm_rows(hidden.data_ptr<T>(), delta.has_value() ? delta->data_ptr<T>() : nullptr,
                           weight.data_ptr<T>(), out.data_ptr<T>(), hidden.numel() / width, width,
                           static_cast<float>(eps));
  });
  return out;
}

void residual_rms_norm_f32(float* hidden, const float* delta, const float* weight, float* out, int64_t width,
                           float eps) {
  residual_rms_norm_rows(hidden, delta, weight, out, 1, width, eps);
}

void decode_attention_f32(const float* q, const float* k, const float* v, float* key_cache, float* value_cache,
                          const float* cos, const float* sin, int64_t heads, int64_t kv_heads, int64_t max_len,
                          int64_t head_dim, int64_t position, float scale, float* out) {
  decode_attention_impl(q, k, v, key_cache, value_cache, cos, sin, heads, kv_heads, max_len, head_dim, position, scale,
                        out);
}

void silu_mul_f32(const float* gate, const float* up, float* out, int64_t n) { silu_mul_elements(gate, up, out, n); }

at::Tensor silu_mul_cpu(const at::Tensor& gate, const at::Tensor& up) {
  constexpr const char* op = "silu_mul";
  const auto dtype = gate.scalar_type();
  check_cpu_float(op, "gate", gate, dtype);
  check_cpu_float(op, "up", up, dtype);
  TORCH_CHECK(gate.sizes() == up.sizes(), op, ": gate is ", gate.sizes(), ", up ", up.sizes(), " (must match)");
  at::Tensor out = at::empty_like(gate);
  dispatch_float(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    silu_mul_elements(gate.data_ptr<T>(), up.data_ptr<T>(), out.data_ptr<T>(), gate.numel());
  });
  return out;
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor key_cache,
                                at::Tensor value_cache, const at::Tensor& cos, const at::Tensor& sin,
                                int64_t position, double scale) {
  constexpr const char* op = "decode_attention";
  const auto dtype = q.scalar_type();
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}, {"v", v},
                                {"key_cache", key_cache}, {"value_cache", value_cache}, {"cos", cos}, {"sin", sin}})
    check_cpu_float(op, name, t, dtype);
  const bool cache_ok = key_cache.dim() == 3 || (key_cache.dim() == 4 && key_cache.size(0) == 1);
  TORCH_CHECK(cache_ok, op, ": key_cache must be [kv_heads, max_len, head_dim] (or with a leading 1), got ",
              key_cache.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), op, ": value_cache is ", value_cache.sizes(),
              ", key_cache ", key_cache.sizes());
  const int64_t kv_heads = key_cache.size(-3), max_len = key_cache.size(-2), head_dim = key_cache.size(-1);
  TORCH_CHECK(head_dim > 0 && head_dim % 2 == 0, op, ": head_dim must be even, got ", head_dim);
  TORCH_CHECK(kv_heads > 0 && k.numel() == kv_heads * head_dim && v.numel() == kv_heads * head_dim, op,
              ": k and v must hold one token's ", kv_heads, " x ", head_dim, " values, got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(q.numel() > 0 && q.numel() % (kv_heads * head_dim) == 0, op, ": q ", q.sizes(),
              " must hold one token's heads (a multiple of ", kv_heads, " x ", head_dim, " values)");
  TORCH_CHECK(cos.numel() == head_dim && sin.numel() == head_dim, op, ": cos and sin must hold ", head_dim,
              " values (one position), got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(position >= 0 && position < max_len, op, ": position ", position, " is outside the cache's ",
              max_len, " positions");
  at::Tensor out = at::empty_like(q);
  dispatch_float(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    decode_attention_impl(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), key_cache.data_ptr<T>(),
                          value_cache.data_ptr<T>(), cos.data_ptr<T>(), sin.data_ptr<T>(), q.numel() / head_dim,
                          kv_heads, max_len, head_dim, position, static_cast<float>(scale), out.data_ptr<T>());
  });
  return out;
}

namespace {

// Rows [begin, end) of w [n, k] times x into out[begin, end). Each row's sum is computed alone, so the result does
// not depend on how the rows are split between threads (or between layers bound together). One compiled copy: the
// greedy screen's rescoring (dense_rows_f32) must sum as the full projection does.
template <typename T>
COMPTRUST_ONE_COPY void dense_rows(const float* x, const T* w, int64_t k, T* out, int64_t begin, int64_t end, Isa isa) {
  int64_t j = begin;
#ifdef COMPTRUST_X86
  if (isa == Isa::kAvx512)
    for (; j < end; ++j) dot_row_avx512(x, w + j * k, k, out + j);
  if (isa == Isa::kAvx2)
    for (; j < end; ++j) dot_row_avx2(x, w + j * k, k, out + j);
#endif
  for (; j < end; ++j) dot_rows_scalar(x, w + j * k, k, out + j);
}

// Tasks of at least 2^17 multiply-adds: fewer cost more to hand to a second thread than they save.
int64_t dense_grain(int64_t k) { return std::max<int64_t>(16, (int64_t{1} << 17) / k); }

// Several fp32 dense layers of one input (BoundGemv): their rows shared out in one parallel region.
class DenseGemv final : public BoundGemv {
 public:
  explicit DenseGemv(const std::vector<at::Tensor>& weights) : weights_(weights), isa_(select_isa()) {
    k_ = weights[0].size(1);
    first_row_.push_back(0);
    for (const at::Tensor& w : weights_) {
      widths_.push_back(w.size(0));
      rows_.push_back(w.data_ptr<float>());
      first_row_.push_back(first_row_.back() + w.size(0));
    }
  }

  void run(const float* x, float* const* y) const override {
    at::parallel_for(0, first_row_.back(), dense_grain(k_), [&](int64_t begin, int64_t end) {
      for (size_t i = 0; i < rows_.size(); ++i) {
        const int64_t first = std::max(begin, first_row_[i]), last = std::min(end, first_row_[i + 1]);
        if (first < last)
          dense_rows(x, rows_[i], k_, y[i], first - first_row_[i], last - first_row_[i], isa_);
      }
    });
  }

 private:
  std::vector<at::Tensor> weights_;
  std::vector<const float*> rows_;
  std::vector<int64_t> first_row_;  // the layers' rows numbered one after another
  Isa isa_;
};

}  // namespace

void dense_rows_f32(const float* x, const float* w, int64_t k, float* out, int64_t begin, int64_t end, bool avx512) {
  dense_rows(x, w, k, out, begin, end, avx512 ? Isa::kAvx512 : Isa::kScalar);
}

at::Tensor dense_gemv_cpu(const at::Tensor& x, const at::Tensor& weight) {
  constexpr const char* op = "dense_gemv";
  const auto dtype = x.scalar_type();
  check_cpu_float(op, "x", x, dtype);
  check_cpu_float(op, "weight", weight, dtype);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) > 0 && weight.size(1) > 0, op, ": weight must be [n, k], got ",
              weight.sizes());
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k && x.numel() == k, op, ": x must be one row of k=", k,
              " inputs ([..., ", k, "] with one row), got ", x.sizes());
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = n;
  at::Tensor y = at::empty(sizes, x.options());
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const float* xf = x32.data_ptr<float>();
  const Isa isa = select_isa();
  dispatch_float(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    const T* w = weight.data_ptr<T>();
    T* out = y.data_ptr<T>();
    at::parallel_for(0, n, dense_grain(k), [&](int64_t begin, int64_t end) { dense_rows(xf, w, k, out, begin, end, isa); });
  });
  return y;
}

std::shared_ptr<const BoundGemv> bind_dense_gemv(const std::vector<at::Tensor>& weights) {
  TORCH_CHECK(!weights.empty(), "bind_dense_gemv: no weights");
  for (const at::Tensor& w : weights) {
    if (!w.device().is_cpu() || w.scalar_type() != at::kFloat) return nullptr;
    check_cpu_float("dense_gemv", "weight", w, at::kFloat);
    TORCH_CHECK(w.dim() == 2 && w.size(0) > 0 && w.size(1) == weights[0].size(1) && w.size(1) > 0,
                "bind_dense_gemv: weights must be [n, k] of one k, got ", w.sizes(), " after ", weights[0].sizes());
  }
  return std::make_shared<DenseGemv>(weights);
}

}  // namespace comptrust::cpu

TORCH_LIBRARY_IMPL(comptrust, CPU, m) {
  m.impl("residual_rms_norm", &comptrust::cpu::residual_rms_norm_cpu);
  m.impl("decode_attention", &comptrust::cpu::decode_attention_cpu);
  m.impl("silu_mul", &comptrust::cpu::silu_mul_cpu);
  m.impl("dense_gemv", &comptrust::cpu::dense_gemv_cpu);
}
