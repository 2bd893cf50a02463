// The AVX-512 kernels of the 2:4 GEMM (sparse24.h): float or int4 kept values against float x, both kept-value
// slots of a group in one zmm.
#include "sparse24.h"

#ifdef COMPTRUST_X86
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

namespace comptrust::cpu::sparse24 {
namespace {

// --------------------------------------------------------------------------------------- AVX-512
// One zmm holds both kept-value slots of a group for the tile's 8 columns: lanes 0..7 slot 0, lanes 8..15
// slot 1, which is exactly how a group's 16 values lie in the tile. One variable shift of the broadcast
// metadata word yields both slots' indices, and with x[4g..4g+3] in all four 128-bit lanes one vpermps
// (which reads 4 index bits) gathers both slots' inputs: per group one permute and one multiply-add where
// the AVX2 kernel needs two of each. The two halves are added at the end.
COMPTRUST_AVX512 inline __m512 load_values16(const float* v) { return _mm512_loadu_ps(v); }
COMPTRUST_AVX512 inline __m512 load_values16(const at::Half* v) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
}
COMPTRUST_AVX512 inline __m512 load_values16(const at::BFloat16* v) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
// Lane c < 8: column c's idx0 (bits 4c); lane 8 + c: its idx1 (bits 4c + 2).
COMPTRUST_AVX512 inline __m512i slot_shifts() {
  return _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 2, 6, 10, 14, 18, 22, 26, 30);
}
COMPTRUST_AVX512 inline __m512 group_inputs16(const float* x4) { return _mm512_broadcast_f32x4(_mm_loadu_ps(x4)); }

// P > 1 runs tiles t..t+P-1 through each step together: 2P weight streams (values and metadata) in flight
// instead of 2, which gets more of the memory bandwidth at batch 1 (see gemm_tiled_avx512.cpp's a8 kernels).
template <class V, int R, int P = 1>
COMPTRUST_AVX512 void direct_float_avx512(const Sparse24Problem& p, int64_t t, int64_t i0) {
  constexpr int A = kFloatChains<R>;  // groups in flight per step, one chain each
  const float* x = p.x + i0 * p.k;
  const __m512i shifts = slot_shifts();
  __m512 acc[P][R][A];
  COMPTRUST_UNROLL for (int q = 0; q < P; ++q)
    COMPTRUST_UNROLL for (int r = 0; r < R; ++r)
      COMPTRUST_UNROLL for (int a = 0; a < A; ++a) acc[q][r][a] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.sparse_groups(); g += A) {  // an even number of groups (k % 8 == 0)
    COMPTRUST_UNROLL for (int q = 0; q < P; ++q) {
      const uint32_t* tm = p.tile_meta(t + q);
      const V* tv = p.tile_values<V>(t + q);
      prefetch_ahead(tm + g);
      COMPTRUST_UNROLL for (int a = 0; a < A; ++a) {
        const int64_t gg = g + a;
        const V* v = tv + gg * kSparse24Kept * kTileCols;
        prefetch_to_l2(v, kValuePrefetchBytes);
        const __m512i idx = _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(tm[gg])), shifts);
        const __m512 values = load_values16(v);
        COMPTRUST_UNROLL for (int r = 0; r < R; ++r)
          acc[q][r][a] = _mm512_fmadd_ps(
              values, _mm512_permutexvar_ps(idx, group_inputs16(x + r * p.k + kSparse24Group * gg)), acc[q][r][a]);
      }
    }
  }
  COMPTRUST_UNROLL for (int q = 0; q < P; ++q)
    COMPTRUST_UNROLL for (int r = 0; r < R; ++r)
      _mm256_storeu_ps(p.y + (i0 + r) * p.n + (t + q) * kTileCols, fold_chains(acc[q][r]));
}

template <int R>
COMPTRUST_AVX512 void direct_int4_avx512(const Sparse24Problem& p, int64_t t, int64_t i0) {
  constexpr int A = kProductChains<R>;
  const uint32_t* tm = p.tile_meta(t);
  const int32_t* tw = p.tile_words(t);
  const float* x = p.x + i0 * p.k;
  const __m512i shifts = slot_shifts(), nibble = _mm512_set1_epi32(0xF);
  // Group u of a word holds kept values 2u (slot 0, lanes 0..7) and 2u + 1 (slot 1, lanes 8..15).
  __m512i code_shifts[kSparseInt4WordGroups];
  COMPTRUST_UNROLL for (int u = 0; u < kSparseInt4WordGroups; ++u)
    code_shifts[u] = halves(8 * u, 8 * u + 4);
  __m256 out[R];
  COMPTRUST_UNROLL for (int r = 0; r < R; ++r) out[r] = _mm256_setzero_ps();
  for (int64_t qg = 0; qg < p.groups; ++qg) {
    const __m512i zeros = _mm512_broadcast_i64x4(_mm256_cvtepu8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.tile_zeros(t) + qg * kTileCols))));
    __m512 acc[R][A];
    COMPTRUST_UNROLL for (int r = 0; r < R; ++r)
      COMPTRUST_UNROLL for (int a = 0; a < A; ++a) acc[r][a] = _mm512_setzero_ps();
    for (int64_t w = qg * p.group_size / 8; w < p.kept_end(qg) / 8; ++w) {
      prefetch_ahead(tw + w * kTileCols);
      prefetch_ahead(tm + w * kSparseInt4WordGroups);
      const __m512i words = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tw + w * kTileCols)));
      COMPTRUST_UNROLL for (int u = 0; u < kSparseInt4WordGroups; ++u) {
        const int64_t g = w * kSparseInt4WordGroups + u;
        const __m512i codes = _mm512_and_si512(_mm512_srlv_epi32(words, code_shifts[u]), nibble);
        const __m512 centered = _mm512_cvtepi32_ps(_mm512_sub_epi32(codes, zeros));
        const __m512i idx = _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(tm[g])), shifts);
        COMPTRUST_UNROLL for (int r = 0; r < R; ++r)
          acc[r][u % A] = _mm512_fmadd_ps(
              centered, _mm512_permutexvar_ps(idx, group_inputs16(x + r * p.k + kSparse24Group * g)), acc[r][u % A]);
      }
    }
    const __m256 scale = load_scales(p.tile_scales(t) + qg * kTileCols);
    COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
      out[r] = _mm256_fmadd_ps(scale, fold_chains(acc[r]), out[r]);
    }
  }
  COMPTRUST_UNROLL for (int r = 0; r < R; ++r) _mm256_storeu_ps(p.y + (i0 + r) * p.n + t * kTileCols, out[r]);
}

}  // namespace

template <class V>
void rows_avx512(const Sparse24Problem& p, int64_t t) {
  for_each_row_block(p.m, [&](auto rows, int64_t i0) {
    constexpr int R = decltype(rows)::value;
    if constexpr (std::is_same_v<V, Int4Values>) direct_int4_avx512<R>(p, t, i0);
    else direct_float_avx512<V, R>(p, t, i0);
  });
}

template <class V>
void one_row_avx512(const Sparse24Problem& p, int64_t t) {
  if constexpr (std::is_same_v<V, Int4Values>) direct_int4_avx512<1>(p, t, 0);
  else direct_float_avx512<V, 1>(p, t, 0);
}

template <class V>
void stream_tiles_avx512(const Sparse24Problem& p, int64_t t) {
  direct_float_avx512<V, 1, kStreamTiles>(p, t, 0);
}

template void rows_avx512<float>(const Sparse24Problem&, int64_t);
template void rows_avx512<at::Half>(const Sparse24Problem&, int64_t);
template void rows_avx512<at::BFloat16>(const Sparse24Problem&, int64_t);
template void rows_avx512<Int4Values>(const Sparse24Problem&, int64_t);
template void one_row_avx512<float>(const Sparse24Problem&, int64_t);
template void one_row_avx512<at::Half>(const Sparse24Problem&, int64_t);
template void one_row_avx512<at::BFloat16>(const Sparse24Problem&, int64_t);
template void one_row_avx512<Int4Values>(const Sparse24Problem&, int64_t);
template void stream_tiles_avx512<float>(const Sparse24Problem&, int64_t);
template void stream_tiles_avx512<at::Half>(const Sparse24Problem&, int64_t);
template void stream_tiles_avx512<at::BFloat16>(const Sparse24Problem&, int64_t);
}  // namespace comptrust::cpu::sparse24

#endif  // COMPTRUST_X86
