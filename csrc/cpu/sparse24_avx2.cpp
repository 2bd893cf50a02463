// The AVX2 kernels of the 2:4 GEMM (sparse24.h): float or int4 kept values against float x, up to kRowBlock rows
// at once, and the expansion of tiles to dense rows for the expanded (BLAS) path.
#include "sparse24.h"

#ifdef COMPTRUST_X86
#include <algorithm>
#include <type_traits>

namespace comptrust::cpu::sparse24 {
namespace {

// x[4g..4g+3] in both 128-bit halves, so an index's third bit does not matter to vpermps.
COMPTRUST_AVX2 inline __m256 group_inputs(const float* x4) {
  return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x4));
}

// ------------------------------------------------------------------- AVX2 direct, float values

template <class V, int R>
COMPTRUST_AVX2 void direct_float_avx2(const Sparse24Problem& p, int64_t t, int64_t i0) {
  constexpr int A = kFloatChains<R>;
  const uint32_t* tm = p.tile_meta(t);
  const V* tv = p.tile_values<V>(t);
  const float* x = p.x + i0 * p.k;
  const __m256i shift0 = idx0_shifts(), shift1 = idx1_shifts();
  __m256 acc[R][2 * A];
  COMPTRUST_UNROLL for (int r = 0; r < R; ++r)
    COMPTRUST_UNROLL for (int a = 0; a < 2 * A; ++a) acc[r][a] = _mm256_setzero_ps();
  // k % 8 == 0, so the number of groups is even and A <= 2 steps never run past the end.
  for (int64_t g = 0; g < p.sparse_groups(); g += A) {
    prefetch_ahead(tm + g);
    COMPTRUST_UNROLL for (int a = 0; a < A; ++a) {
      const int64_t gg = g + a;
      const V* v = tv + gg * kSparse24Kept * kTileCols;
      prefetch_to_l2(v, kValuePrefetchBytes);
      const __m256i word = _mm256_set1_epi32(static_cast<int>(tm[gg]));
      const __m256i idx0 = _mm256_srlv_epi32(word, shift0), idx1 = _mm256_srlv_epi32(word, shift1);
      const __m256 v0 = load_values(v), v1 = load_values(v + kTileCols);
      COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
        const __m256 xg = group_inputs(x + r * p.k + kSparse24Group * gg);
        acc[r][2 * a] = _mm256_fmadd_ps(v0, _mm256_permutevar8x32_ps(xg, idx0), acc[r][2 * a]);
        acc[r][2 * a + 1] = _mm256_fmadd_ps(v1, _mm256_permutevar8x32_ps(xg, idx1), acc[r][2 * a + 1]);
      }
    }
  }
  COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
    __m256 sum = acc[r][0];
    COMPTRUST_UNROLL for (int a = 1; a < 2 * A; ++a) sum = _mm256_add_ps(sum, acc[r][a]);
    _mm256_storeu_ps(p.y + (i0 + r) * p.n + t * kTileCols, sum);
  }
}

// -------------------------------------------------------------------- AVX2 direct, int4 values
// Per quantization group: sum_k x * (q - z) with q - z formed in integers before the conversion, then one
// scale multiply. (The dense int4 kernel instead subtracts z * sum_k x once per group, but here that sum is
// per column, over each column's own kept inputs, and would cost two more adds per group.)

// Kept value `slot` (0..7 within the word) of the 8 columns, minus their zero points, as floats.
COMPTRUST_AVX2 inline __m256 int4_centered(__m256i words, int slot, __m256i zeros) {
  const __m256i codes = _mm256_and_si256(_mm256_srli_epi32(words, 4 * slot), _mm256_set1_epi32(0xF));
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(codes, zeros));
}

template <int R>
COMPTRUST_AVX2 void direct_int4_avx2(const Sparse24Problem& p, int64_t t, int64_t i0) {
  constexpr int A = kProductChains<R>;
  const uint32_t* tm = p.tile_meta(t);
  const int32_t* tw = p.tile_words(t);
  const float* x = p.x + i0 * p.k;
  const __m256i shift0 = idx0_shifts(), shift1 = idx1_shifts();
  __m256 out[R];
  COMPTRUST_UNROLL for (int r = 0; r < R; ++r) out[r] = _mm256_setzero_ps();
  for (int64_t qg = 0; qg < p.groups; ++qg) {
    const __m256i zeros = _mm256_cvtepu8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.tile_zeros(t) + qg * kTileCols)));
    __m256 acc[R][A];
    COMPTRUST_UNROLL for (int r = 0; r < R; ++r)
      COMPTRUST_UNROLL for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
    // group_size is a multiple of 8 kept values: quantization groups hold whole words.
    for (int64_t w = qg * p.group_size / 8; w < p.kept_end(qg) / 8; ++w) {
      prefetch_ahead(tw + w * kTileCols);
      prefetch_ahead(tm + w * kSparseInt4WordGroups);
      const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tw + w * kTileCols));
      COMPTRUST_UNROLL for (int u = 0; u < kSparseInt4WordGroups; ++u) {
        const int64_t g = w * kSparseInt4WordGroups + u;
        const __m256i word = _mm256_set1_epi32(static_cast<int>(tm[g]));
        const __m256i idx0 = _mm256_srlv_epi32(word, shift0), idx1 = _mm256_srlv_epi32(word, shift1);
        const __m256 c0 = int4_centered(words, 2 * u, zeros), c1 = int4_centered(words, 2 * u + 1, zeros);
        COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
          const __m256 xg = group_inputs(x + r * p.k + kSparse24Group * g);
          acc[r][u % A] = _mm256_fmadd_ps(c1, _mm256_permutevar8x32_ps(xg, idx1),
                                          _mm256_fmadd_ps(c0, _mm256_permutevar8x32_ps(xg, idx0), acc[r][u % A]));
        }
      }
    }
    const __m256 scale = load_scales(p.tile_scales(t) + qg * kTileCols);
    COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
      __m256 sum = acc[r][0];
      COMPTRUST_UNROLL for (int a = 1; a < A; ++a) sum = _mm256_add_ps(sum, acc[r][a]);
      out[r] = _mm256_fmadd_ps(scale, sum, out[r]);
    }
  }
  COMPTRUST_UNROLL for (int r = 0; r < R; ++r) _mm256_storeu_ps(p.y + (i0 + r) * p.n + t * kTileCols, out[r]);
}

template <typename Out>
COMPTRUST_AVX2 inline void expand_group(uint32_t meta_word, __m256 v0, __m256 v1, Out* out, int64_t ld) {
  __m256 rows[kSparse24Group];
  group_rows(meta_word, v0, v1, rows);
  COMPTRUST_UNROLL for (int i = 0; i < kSparse24Group; ++i) store8(out + i * ld, rows[i]);
}

template <class V, typename Out>
COMPTRUST_AVX2 void expand_tile(const Sparse24Problem& p, int64_t t, Out* out, int64_t ld) {
  const uint32_t* tm = p.tile_meta(t);
  if constexpr (std::is_same_v<V, Int4Values>) {
    const int32_t* tw = p.tile_words(t);
    for (int64_t qg = 0; qg < p.groups; ++qg) {
      const __m256 zeros = load_zeros(p.tile_zeros(t) + qg * kTileCols);
      const __m256 scale = load_scales(p.tile_scales(t) + qg * kTileCols);
      for (int64_t w = qg * p.group_size / 8; w < p.kept_end(qg) / 8; ++w) {
        const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tw + w * kTileCols));
        COMPTRUST_UNROLL for (int u = 0; u < kSparseInt4WordGroups; ++u) {
          const int64_t g = w * kSparseInt4WordGroups + u;
          const __m256 v0 = _mm256_mul_ps(_mm256_sub_ps(int4_codes(words, 2 * u), zeros), scale);
          const __m256 v1 = _mm256_mul_ps(_mm256_sub_ps(int4_codes(words, 2 * u + 1), zeros), scale);
          expand_group(tm[g], v0, v1, out + kSparse24Group * g * ld, ld);
        }
      }
    }
  } else {
    const V* tv = p.tile_values<V>(t);
    for (int64_t g = 0; g < p.sparse_groups(); ++g) {
      const V* v = tv + g * kSparse24Kept * kTileCols;
      expand_group(tm[g], load_values(v), load_values(v + kTileCols), out + kSparse24Group * g * ld, ld);
    }
  }
}

}  // namespace

// The entry points carry no target attribute, as their declarations in sparse24.h: they call the AVX2 kernels.
template <class V>
void rows_avx2(const Sparse24Problem& p, int64_t t) {
  for_each_row_block(p.m, [&](auto rows, int64_t i0) {
    constexpr int R = decltype(rows)::value;
    if constexpr (std::is_same_v<V, Int4Values>) direct_int4_avx2<R>(p, t, i0);
    else direct_float_avx2<V, R>(p, t, i0);
  });
}

template <class V, typename Out>
void expand_tile_avx2(const Sparse24Problem& p, int64_t t, Out* out, int64_t ld) {
  expand_tile<V>(p, t, out, ld);
}

template void rows_avx2<float>(const Sparse24Problem&, int64_t);
template void rows_avx2<at::Half>(const Sparse24Problem&, int64_t);
template void rows_avx2<at::BFloat16>(const Sparse24Problem&, int64_t);
template void rows_avx2<Int4Values>(const Sparse24Problem&, int64_t);
template void expand_tile_avx2<float, float>(const Sparse24Problem&, int64_t, float*, int64_t);
template void expand_tile_avx2<at::Half, float>(const Sparse24Problem&, int64_t, float*, int64_t);
template void expand_tile_avx2<at::BFloat16, float>(const Sparse24Problem&, int64_t, float*, int64_t);
template void expand_tile_avx2<Int4Values, float>(const Sparse24Problem&, int64_t, float*, int64_t);
template void expand_tile_avx2<float, at::BFloat16>(const Sparse24Problem&, int64_t, at::BFloat16*, int64_t);
template void expand_tile_avx2<at::Half, at::BFloat16>(const Sparse24Problem&, int64_t, at::BFloat16*, int64_t);
template void expand_tile_avx2<at::BFloat16, at::BFloat16>(const Sparse24Problem&, int64_t, at::BFloat16*, int64_t);
template void expand_tile_avx2<Int4Values, at::BFloat16>(const Sparse24Problem&, int64_t, at::BFloat16*, int64_t);

}  // namespace comptrust::cpu::sparse24

#endif  // COMPTRUST_X86
