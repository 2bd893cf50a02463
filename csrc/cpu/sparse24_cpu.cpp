// CPU 2:4 sparse x float GEMM/GEMV over the tiled 2:4 layout (csrc/include/comptrust/sparse24_tiles.h),
// with float32/bfloat16/float16 kept values or int4 ones.
//
// One kernel for batches below kDenseMinRows, on blocks of up to kRowBlock rows (larger batches expand the
// weight block by block and run torch's GEMM, see run_expanded). Per group of 4 inputs, x[4g..4g+3]
// is broadcast into both halves of a register and vpermps picks, per output column, the input each kept
// value multiplies: two permutes and two fused multiply-adds cover 16 weights, and the metadata word needs
// two variable shifts and no masking (see the layout header). Batch 1 is memory-bound: this is the path
// that must read the half-size weight at DRAM speed.
// int4 values: per quantization group, sum_k x*(q - z) with q - z formed in integers, then times s.
// A dequantize-to-dense-panel kernel (gemm_tiled's choice for batch >= 8) was slower here at every batch
// from 8 to 64 (4096x4096 fp32, m = 32: 14.5 ms against 11.2): its scatter costs more than it saves, and it
// multiplies the zeros that this kernel skips.
// An AVX-512 version (both kept-value slots in one register) runs where the CPU has it; a portable scalar
// twin where AVX2 is missing. Work split: tiles (8 output columns) are
// at::parallel_for's tasks.
// On AVX-512, 32 to 511 rows run the row-vector kernel instead (sparse24_row_vectors.h: vectorized over x's rows,
// so only the kept weights are multiplied), except where the tile unit below is faster.
// Where the CPU has AMX, bf16 activations from 8 rows, and fp32 ones from 16 when the kept values are exact in
// bf16, run on the tile unit instead (run_bf16_panels); without AMX but with AVX512-BF16, bf16 activations
// from 8 to kDotMaxRows rows (kAmxMaxRows on large layers) run the same panels on vdpbf16ps (bf16_dot.h), as
// sparse rows that skip the zeros.
// int8 activations with int4 values run on VNNI (a8_int4_avx512), and there too fp32 ones at batch 1 on large
// layers, as int8 limbs (int8_limbs.h).
// DecodeProgram binds one fp32 row's product to its layers once (Sparse24Gemv, bound_gemv.h): the per-tile batch-1
// kernels above, a layer's q/k/v or gate/up in one parallel region, without the dispatcher's per-call work.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "bf16_panels.h"
#include "bound_gemv.h"
#include "comptrust/sparse24_tiles.h"
#include "dense_blocks.h"
#include "int8_limbs.h"
#include "simd_common.h"
#include "sparse24_row_vectors.h"
#include "isa.h"

namespace comptrust::cpu {
namespace {

struct Sparse24Problem {
  const float* x;          // [m, k] fp32
  const void* values;      // float kinds [n/8, k/4, 2, 8]; int4: [n/8, k/16, 8] int32
  const uint32_t* meta;    // [n/8, k/4]
  const uint8_t* zeros;    // int4 only: [n/8, groups, 8]
  const at::Half* scales;  // int4 only: [n/8, groups, 8]
  float* y;                // [m, n]
  int64_t m, n, k;
  int64_t group_size;  // kept values per quantization group (int4); k/2 for float values: one "group"
  int64_t groups;

  int64_t sparse_groups() const { return k / kSparse24Group; }
  const uint32_t* tile_meta(int64_t t) const { return meta + t * sparse_groups(); }
  template <class V>
  const V* tile_values(int64_t t) const {
    return static_cast<const V*>(values) + t * sparse_groups() * kSparse24Kept * kTileCols;
  }
  const int32_t* tile_words(int64_t t) const { return static_cast<const int32_t*>(values) + t * (k / 16) * kTileCols; }
  const uint8_t* tile_zeros(int64_t t) const { return zeros + t * groups * kTileCols; }
  const at::Half* tile_scales(int64_t t) const { return scales + t * groups * kTileCols; }
  // Kept values [kept_begin, kept_end) of quantization group g.
  int64_t kept_end(int64_t g) const { return std::min(k / kSparse24Kept, (g + 1) * group_size); }
};

// Tag types for the kept values' storage: at::BFloat16 / at::Half / float, or int4 codes.
struct Int4Values {};

template <class V>
inline float to_float(V v) {
  return static_cast<float>(v);
}

// ------------------------------------------------------------------------------------------ scalar
// Kept value j of group g in column c of tile t, dequantized.
template <class V>
float kept_value(const Sparse24Problem& p, int64_t t, int64_t g, int j, int c) {
  if constexpr (std::is_same_v<V, Int4Values>) {
    const int64_t kept = kSparse24Kept * g + j;
    const uint32_t word = static_cast<uint32_t>(p.tile_words(t)[(kept / 8) * kTileCols + c]);
    const int code = static_cast<int>((word >> (4 * (kept % 8))) & 0xF);
    const int64_t qg = kept / p.group_size;
    return (static_cast<float>(code) - p.tile_zeros(t)[qg * kTileCols + c]) *
           static_cast<float>(p.tile_scales(t)[qg * kTileCols + c]);
  } else {
    return to_float(p.tile_values<V>(t)[(g * kSparse24Kept + j) * kTileCols + c]);
  }
}

template <class V>
void tile_scalar(const Sparse24Problem& p, int64_t t) {
  const uint32_t* tm = p.tile_meta(t);
  for (int64_t i = 0; i < p.m; ++i) {
    const float* x = p.x + i * p.k;
    for (int c = 0; c < kTileCols; ++c) {
      float out = 0.f;
      for (int64_t g = 0; g < p.sparse_groups(); ++g) {
        const uint32_t nibble = (tm[g] >> (4 * c)) & 0xF;
        out += kept_value<V>(p, t, g, 0, c) * x[kSparse24Group * g + (nibble & 3)] +
               kept_value<V>(p, t, g, 1, c) * x[kSparse24Group * g + (nibble >> 2)];
      }
      p.y[i * p.n + t * kTileCols + c] = out;
    }
  }
}

// Tile t as dense W^T rows: out[kk][0..7] for kk = 0..k-1, rows ld elements apart (zeros where pruned).
template <class V, typename Out>
void expand_tile_scalar(const Sparse24Problem& p, int64_t t, Out* out, int64_t ld) {
  const uint32_t* tm = p.tile_meta(t);
  for (int64_t g = 0; g < p.sparse_groups(); ++g) {
    for (int64_t i = 0; i < kSparse24Group; ++i) std::fill_n(out + (kSparse24Group * g + i) * ld, kTileCols, Out(0.f));
    for (int c = 0; c < kTileCols; ++c) {
      const uint32_t nibble = (tm[g] >> (4 * c)) & 0xF;
      out[(kSparse24Group * g + (nibble & 3)) * ld + c] = static_cast<Out>(kept_value<V>(p, t, g, 0, c));
      out[(kSparse24Group * g + (nibble >> 2)) * ld + c] = static_cast<Out>(kept_value<V>(p, t, g, 1, c));
    }
  }
}

#ifdef COMPTRUST_X86
// -------------------------------------------------------------------------------- AVX2 helpers
COMPTRUST_AVX2 inline __m256 load_values(const float* v) { return _mm256_loadu_ps(v); }
COMPTRUST_AVX2 inline __m256 load_values(const at::Half* v) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
}
COMPTRUST_AVX2 inline __m256 load_values(const at::BFloat16* v) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));  // bf16 is the high half of an fp32
}

// Per-lane shifts that bring column c's idx0 (idx1) to the low bits of lane c.
COMPTRUST_AVX2 inline __m256i idx0_shifts() { return _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28); }
COMPTRUST_AVX2 inline __m256i idx1_shifts() { return _mm256_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30); }

// x[4g..4g+3] in both 128-bit halves, so an index's third bit does not matter to vpermps.
COMPTRUST_AVX2 inline __m256 group_inputs(const float* x4) {
  return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x4));
}

// ------------------------------------------------------------------- AVX2 direct, float values
template <int R>
constexpr int kFloatChains = R == 1 ? 2 : 1;  // groups in flight per step; each has 2 chains (j = 0, 1)
// Float values stream 8x the bytes per decoded weight that int4 codes do, so they are prefetched further
// ahead than kPrefetchBytes: at batch 1 on 4096x4096, 4096 bytes read ~1.3x faster than 1024 (512 was
// slower still), and without software prefetch 1.5x slower. Into L2 8 KB ahead rather than into L1 4 KB ahead
// (AMD EPYC, cold, alternated in one process): 1.08-1.27x on 4096x4096 and 11008x4096 at batch 1 and 4, AVX-512
// and AVX2 paths, fp32 and bf16 values; even on SmolLM2's small shapes.
constexpr int64_t kValuePrefetchBytes = 8192;

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
template <int R>
constexpr int kProductChains = R == 1 ? 4 : 2;

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

template <class V>
COMPTRUST_AVX2 void rows_avx2(const Sparse24Problem& p, int64_t t) {
  for_each_row_block(p.m, [&](auto rows, int64_t i0) {
    constexpr int R = decltype(rows)::value;
    if constexpr (std::is_same_v<V, Int4Values>) direct_int4_avx2<R>(p, t, i0);
    else direct_float_avx2<V, R>(p, t, i0);
  });
}

// ------------------------------------------------------------------ AVX2 expansion to dense rows
// A group's four dense rows for one tile: row i holds, per column, the kept value whose index is i, or zero.
COMPTRUST_AVX2 inline void group_rows(uint32_t meta_word, __m256 v0, __m256 v1, __m256 (&rows)[kSparse24Group]) {
  const __m256i word = _mm256_set1_epi32(static_cast<int>(meta_word)), three = _mm256_set1_epi32(3);
  const __m256i idx0 = _mm256_and_si256(_mm256_srlv_epi32(word, idx0_shifts()), three);
  const __m256i idx1 = _mm256_and_si256(_mm256_srlv_epi32(word, idx1_shifts()), three);
  COMPTRUST_UNROLL for (int i = 0; i < kSparse24Group; ++i) {
    const __m256i row = _mm256_set1_epi32(i);
    const __m256 at0 = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(idx0, row)), v0);
    const __m256 at1 = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(idx1, row)), v1);
    rows[i] = _mm256_or_ps(at0, at1);
  }
}

template <typename Out>
COMPTRUST_AVX2 inline void expand_group(uint32_t meta_word, __m256 v0, __m256 v1, Out* out, int64_t ld) {
  __m256 rows[kSparse24Group];
  group_rows(meta_word, v0, v1, rows);
  COMPTRUST_UNROLL for (int i = 0; i < kSparse24Group; ++i) store8(out + i * ld, rows[i]);
}

// Kept values 0 and 1 of group g of tile t, dequantized (int4: as kept_value does).
template <class V>
COMPTRUST_AVX2 inline void group_values(const Sparse24Problem& p, int64_t t, int64_t g, __m256& v0, __m256& v1) {
  if constexpr (std::is_same_v<V, Int4Values>) {
    const int64_t qg = kSparse24Kept * g / p.group_size;
    const __m256 zeros = load_zeros(p.tile_zeros(t) + qg * kTileCols);
    const __m256 scale = load_scales(p.tile_scales(t) + qg * kTileCols);
    const __m256i words = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(p.tile_words(t) + g / kSparseInt4WordGroups * kTileCols));
    const int slot = static_cast<int>(kSparse24Kept * (g % kSparseInt4WordGroups));
    v0 = _mm256_mul_ps(_mm256_sub_ps(int4_codes(words, slot), zeros), scale);
    v1 = _mm256_mul_ps(_mm256_sub_ps(int4_codes(words, slot + 1), zeros), scale);
  } else {
    const V* v = p.tile_values<V>(t) + g * kSparse24Kept * kTileCols;
    v0 = load_values(v);
    v1 = load_values(v + kTileCols);
  }
}

// Tile t as dense W^T rows (as expand_tile_scalar); int4 values dequantized as kept_value does.
template <class V, typename Out>
COMPTRUST_AVX2 void expand_tile_avx2(const Sparse24Problem& p, int64_t t, Out* out, int64_t ld) {
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

template <class V>
COMPTRUST_AVX512 void rows_avx512(const Sparse24Problem& p, int64_t t) {
  for_each_row_block(p.m, [&](auto rows, int64_t i0) {
    constexpr int R = decltype(rows)::value;
    if constexpr (std::is_same_v<V, Int4Values>) direct_int4_avx512<R>(p, t, i0);
    else direct_float_avx512<V, R>(p, t, i0);
  });
}

// ------------------------------------------------------------------------ AMX-BF16 (bf16 x)
// bf16 activations from kAmxMinRows to kAmxMaxRows rows, where the CPU has AMX: two tiles expanded to dense
// rows (zeros where pruned) straight into the tile unit's bf16 pairs (amx_bf16.h), chunk by chunk. The pruned
// zeros are multiplied, which the tile unit does faster than this file's kernels skip them. int4 values
// whose groups are whole tile steps go as integers q - zero, scaled per group after the product. Speed
// against bf16 F.linear on cold weights, side by side, tile path / sparse kernel, bf16 values (int4 values):
// at 8 rows 576x1536 1.56 / 1.20 (1.69 / 1.32), 1536x576 1.77 / 1.58 (2.06 / 1.63), 4096x4096 1.35 / 1.01
// (1.46 / 1.11); at 16-64 rows the tile path 1.15-1.57 on the SmolLM2 shapes and 0.96-1.31 on 4096x4096
// (int4 values 0.93-1.91), the sparse kernel 0.25-0.91.
// Without AMX but with AVX512-BF16 (Zen 4) the same panels run on vdpbf16ps (bf16_dot.h), up to kDotMaxRows (where
// dense blocks take over again; kAmxMaxRows on large layers, see bf16_panels_for), as sparse rows: each column's two
// kept inputs gathered by vpermw, so the pruned zeros are not multiplied. Against bf16 F.linear (the pruned matrix,
// dense), cold weights, side by side with the same panels as dense rows (zeros multiplied, which ran at the dense
// product's speed from ~32 rows): bf16 values on 4096x4096 / 576x1536, 32 rows 1.34x / 1.52x (dense rows 1.08x /
// 1.23x), 64 rows 1.29x / 1.19x (1.02x / 1.11x), 128-256 rows 1.25-1.42x (0.93-1.00x); int4 values on 4096x4096,
// 1536x576, 11008x4096, 32-64 rows 1.38-1.58x (1.04-1.24x), 256 rows 1.26-1.40x (0.96-0.97x). 4096x11008 at 256 rows
// runs even (0.98x, dense rows the same): past 64 rows each pass rereads the whole decoded panels, 1 MB at that k.
// (Against the kernels they replaced, column kernel below 32 rows and row-vector kernel from 32, dense rows
// measured 8 rows 1.32-1.39x / 1.08-1.22x bf16 F.linear, 64 rows 1.01-1.02x / 0.68-0.75x.)
// From 512 rows the sparse rows stay ahead of the dense blocks on large layers (kDotLargeWeights and up), against
// bf16 F.linear, dot engine / dense blocks: 4096x4096 bf16 values 512-768 rows 1.23-1.29x / 0.86x, 1024 rows
// 1.01x / 0.92x; int4 values 512-1024 rows 1.38-1.40x / 0.82-0.95x; 11008x4096 int4 values at 768 rows 1.07x /
// 0.87x. On the SmolLM2 shapes they do not (576x1536 bf16 values at 768-896 rows 0.76-0.83x / 0.90-0.92x, 576x576
// at 512-640 rows 0.82-0.85x / 0.92-0.93x), so those stop at kDotMaxRows.
constexpr int64_t kAmxMinRows = 8;
constexpr int64_t kAmxMaxRows = 1024;
constexpr int64_t kDotMaxRows = 512;
constexpr int64_t kDotLargeWeights = int64_t{1} << 22;

// Whether bf16 x runs on the bf16 panels (either engine).
bool bf16_panels_for(const Sparse24Problem& p) {
  if (p.m < kAmxMinRows || p.m >= kAmxMaxRows || p.k % kAmxStep) return false;
  if (amx_bf16_usable()) return true;
  return avx512_bf16_usable() && (p.m < kDotMaxRows || p.n * p.k >= kDotLargeWeights);
}

// panel[(kk - kb0) / 2][16][2] (bf16 bits) for inputs kb0..kb1: tiles t, t+1 as dense rows (a missing second
// tile zero). Each 2:4 group gives four rows, so two B rows: its inputs 0, 1 and 2, 3. Both tiles' kept values
// share one zmm (lanes 0..7 tile t, 8..15 tile t + 1), and each dense row is the kept values whose 2-bit index
// names it, picked with two compare masks: 4 instructions per row of 16 columns (the AVX2 group_rows takes 5
// per 8 and a join). ROWS kSparse24: the group's sparse rows instead (bf16_dot.h), the same two B rows' space.
template <class V, PanelRows ROWS>
COMPTRUST_AVX512_BF16 void sparse_pairs(const Sparse24Problem& p, int64_t t, int tiles, int64_t kb0, int64_t kb1,
                                        uint16_t* panel) {
  const uint32_t* meta0 = p.tile_meta(t);
  const uint32_t* meta1 = p.tile_meta(tiles > 1 ? t + 1 : t);
  const __m512i shift0 = _mm512_broadcast_i64x4(idx0_shifts()), shift1 = _mm512_broadcast_i64x4(idx1_shifts());
  const __m512i three = _mm512_set1_epi32(3);
  for (int64_t g = kb0 / kSparse24Group; g < kb1 / kSparse24Group; ++g) {
    __m256 a0, a1, b0, b1;
    group_values<V>(p, t, g, a0, a1);
    if (tiles > 1) group_values<V>(p, t + 1, g, b0, b1);
    else b0 = b1 = _mm256_setzero_ps();  // no second tile: its columns stay zero
    const __m512 v0 = join_halves(a0, b0), v1 = join_halves(a1, b1);
    const __m512i word = _mm512_inserti64x4(_mm512_set1_epi32(static_cast<int>(meta0[g])),
                                            _mm256_set1_epi32(static_cast<int>(meta1[g])), 1);
    const __m512i idx0 = _mm512_and_si512(_mm512_srlv_epi32(word, shift0), three);
    const __m512i idx1 = _mm512_and_si512(_mm512_srlv_epi32(word, shift1), three);
    uint16_t* out = panel + (kSparse24Group * g - kb0) / 2 * kAmxCols * 2;
    if constexpr (ROWS == PanelRows::kSparse24) {  // sparse rows: see PairLanes::kept_pairs and positions
      store_pair_row(out, v0, v1);
      const auto first = static_cast<int32_t>(kSparse24Group * g % kDotTableInputs);
      _mm512_storeu_si512(out + kAmxCols * 2, _mm512_add_epi32(_mm512_or_si512(idx0, _mm512_slli_epi32(idx1, 16)),
                                                               _mm512_set1_epi32(first * 0x10001)));
      continue;
    }
    __m512 rows[kSparse24Group];
    COMPTRUST_UNROLL for (int i = 0; i < kSparse24Group; ++i) {
      const __m512i row = _mm512_set1_epi32(i);
      rows[i] = _mm512_mask_mov_ps(_mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(idx0, row), v0),
                                   _mm512_cmpeq_epi32_mask(idx1, row), v1);
    }
    store_pair_row(out, rows[0], rows[1]);
    store_pair_row(out + kAmxCols * 2, rows[2], rows[3]);
  }
}

// The 16-bit lanes of a B pair row (lane L: column c = L / 2, tile t for c < 8, row j = L % 2 of the pair)
// and, per 2:4 group, which lanes each kept-value slot fills.
struct PairLanes {
  static constexpr __mmask32 kOddLanes = 0xAAAAAAAA;
  __m512i pick0, pick1;  // per lane: kept value 0 / 1 of column c among a group's two tiles' 32 values
  __m512i pick_meta;     // per lane: which 16 bits of four groups' meta words (see indices) hold column c's nibble
  __m512i shift0, shift1, three, rows01, rows23;

  COMPTRUST_AVX512_BF16 PairLanes() {
    alignas(64) uint16_t slot0[32], slot1[32], meta_half[32], shift[32], row[32];
    for (int lane = 0; lane < 32; ++lane) {
      const int c = lane / 2, tile = c / kTileCols, col = c % kTileCols;
      slot0[lane] = static_cast<uint16_t>(tile * 16 + col);
      slot1[lane] = static_cast<uint16_t>(tile * 16 + 8 + col);
      meta_half[lane] = static_cast<uint16_t>(tile * 8 + col / 4);  // 16-bit half of group 0's word
      shift[lane] = static_cast<uint16_t>(4 * (col % 4));
      row[lane] = static_cast<uint16_t>(lane % 2);
    }
    pick0 = _mm512_load_si512(slot0);
    pick1 = _mm512_load_si512(slot1);
    pick_meta = _mm512_load_si512(meta_half);
    shift0 = _mm512_load_si512(shift);
    shift1 = _mm512_add_epi16(shift0, _mm512_set1_epi16(2));
    three = _mm512_set1_epi16(3);
    rows01 = _mm512_load_si512(row);
    rows23 = _mm512_add_epi16(rows01, _mm512_set1_epi16(2));
  }

  // Per lane, the rows (0..3 within 2:4 group gg of 4) that kept-value slots 0 and 1 of its column name. meta
  // holds the two tiles' meta words of 4 consecutive groups: tile t's in 32-bit lanes 0..3, t + 1's in 4..7.
  COMPTRUST_AVX512_BF16 void indices(__m512i meta, int gg, __m512i& idx0, __m512i& idx1) const {
    const __m512i lane_meta = _mm512_permutexvar_epi16(_mm512_add_epi16(pick_meta, _mm512_set1_epi16(2 * gg)), meta);
    idx0 = _mm512_and_si512(_mm512_srlv_epi16(lane_meta, shift0), three);
    idx1 = _mm512_and_si512(_mm512_srlv_epi16(lane_meta, shift1), three);
  }

  // Sparse rows (bf16_dot.h) of 2:4 group g: its kept-value pairs (lane L: slot L % 2 of column L / 2) ...
  COMPTRUST_AVX512_BF16 __m512i kept_pairs(__m512i v0, __m512i v1) const {
    return _mm512_mask_mov_epi16(v0, kOddLanes, v1);
  }

  // ... and, per lane, the position of the input that value multiplies in its 32-input stretch of x.
  COMPTRUST_AVX512_BF16 __m512i positions(__m512i idx0, __m512i idx1, int64_t g) const {
    const auto first = static_cast<int16_t>(kSparse24Group * g % kDotTableInputs);
    return _mm512_add_epi16(_mm512_mask_mov_epi16(idx0, kOddLanes, idx1), _mm512_set1_epi16(first));
  }

  // The pair row (pair 0: group rows 0, 1; pair 1: rows 2, 3): lanes whose slot-0 index names their row take
  // v0, slot 1's v1, the others `none`.
  COMPTRUST_AVX512_BF16 __m512i pair_row(__m512i idx0, __m512i idx1, int pair, __m512i v0, __m512i v1,
                                         __m512i none) const {
    const __m512i rows = pair ? rows23 : rows01;
    return _mm512_mask_mov_epi16(_mm512_mask_mov_epi16(none, _mm512_cmpeq_epi16_mask(idx0, rows), v0),
                                 _mm512_cmpeq_epi16_mask(idx1, rows), v1);
  }
};

// The meta words of groups g..g+3 of tiles t (32-bit lanes 0..3) and t1 (lanes 4..7), for PairLanes::indices.
COMPTRUST_AVX512_BF16 inline __m512i four_groups_meta(const uint32_t* meta0, const uint32_t* meta1, int64_t g) {
  return _mm512_castsi256_si512(_mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(meta0 + g))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(meta1 + g)), 1));
}

// bf16 kept values go to the panel without the round trip through fp32: one masked move per kept-value slot
// fills both rows of a pair at once. Same bits as sparse_pairs (a bf16 value converted to fp32 and rounded
// back is itself). ROWS as for sparse_pairs.
template <PanelRows ROWS>
COMPTRUST_AVX512_BF16 void sparse_pairs_bf16(const Sparse24Problem& p, int64_t t, int tiles, int64_t kb0,
                                             int64_t kb1, uint16_t* panel) {
  const PairLanes lanes;
  const auto* values0 = reinterpret_cast<const uint16_t*>(p.tile_values<at::BFloat16>(t));
  const auto* values1 = tiles > 1 ? reinterpret_cast<const uint16_t*>(p.tile_values<at::BFloat16>(t + 1)) : nullptr;
  const uint32_t* meta0 = p.tile_meta(t);
  const uint32_t* meta1 = tiles > 1 ? p.tile_meta(t + 1) : meta0;  // a missing tile's values are zero
  for (int64_t g0 = kb0 / kSparse24Group; g0 < kb1 / kSparse24Group; g0 += 4) {  // kb0, kb1: multiples of 32
    const __m512i meta = four_groups_meta(meta0, meta1, g0);
    COMPTRUST_UNROLL for (int gg = 0; gg < 4; ++gg) {
      const int64_t g = g0 + gg, at = g * kSparse24Kept * kTileCols;  // a group's v0[8], v1[8]: 32 bytes per tile
      const __m256i group0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values0 + at));
      const __m256i group1 =
          values1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values1 + at)) : _mm256_setzero_si256();
      const __m512i values = _mm512_inserti64x4(_mm512_castsi256_si512(group0), group1, 1);
      const __m512i v0 = _mm512_permutexvar_epi16(lanes.pick0, values), v1 = _mm512_permutexvar_epi16(lanes.pick1, values);
      __m512i idx0, idx1;
      lanes.indices(meta, gg, idx0, idx1);
      uint16_t* out = panel + (kSparse24Group * g - kb0) / 2 * kAmxCols * 2;
      if constexpr (ROWS == PanelRows::kSparse24) {
        _mm512_storeu_si512(out, lanes.kept_pairs(v0, v1));
        _mm512_storeu_si512(out + kAmxCols * 2, lanes.positions(idx0, idx1, g));
        continue;
      }
      COMPTRUST_UNROLL for (int pair = 0; pair < 2; ++pair)
        _mm512_storeu_si512(out + pair * kAmxCols * 2, lanes.pair_row(idx0, idx1, pair, v0, v1, _mm512_setzero_si512()));
    }
  }
}

// int4 kept values whose quantization groups are whole tile steps (2 * group_size % 32 == 0) go to the tile
// unit as panels of integers q - zero (exact in bf16; pruned weights 0), each group's sums then scaled once
// (gemm_bf16_panels, with zero * scale 0 since the zero is already subtracted). vpmultishiftqb puts
// each code in the low bits of its lanes, and vpermw maps q - zero + 16 (1..31) to the bf16 integer.
// Writes the B rows of inputs kb0..kb1 (multiples of 32); ROWS as for sparse_pairs.
template <PanelRows ROWS>
COMPTRUST_AVX512_BF16 void sparse_int4_code_pairs(const Sparse24Problem& p, int64_t t, int tiles, int64_t kb0,
                                                  int64_t kb1, uint16_t* codes) {
  const PairLanes lanes;
  const int64_t t1 = tiles > 1 ? t + 1 : t;  // a missing second tile repeats the first; its scales are zero
  const int32_t* words0 = p.tile_words(t);
  const int32_t* words1 = p.tile_words(t1);
  const uint32_t* meta0 = p.tile_meta(t);
  const uint32_t* meta1 = p.tile_meta(t1);
  const __m512i column_of_lane = _mm512_srli_epi16(
      _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9,
                       8, 7, 6, 5, 4, 3, 2, 1, 0), 1);
  const __m512i nibble = _mm512_set1_epi16(0xF), none = _mm512_set1_epi16(16), table = bf16_difference_table();
  const int64_t group_inputs = 2 * p.group_size;
  for (int64_t group = kb0 / group_inputs; group * group_inputs < kb1; ++group) {
    const __m128i zero_bytes = _mm_unpacklo_epi64(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.tile_zeros(t) + group * kTileCols)),
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.tile_zeros(t1) + group * kTileCols)));
    const __m512i zero =
        _mm512_permutexvar_epi16(column_of_lane, _mm512_castsi256_si512(_mm256_cvtepu8_epi16(zero_bytes)));
    const __m512i bias = _mm512_sub_epi16(_mm512_set1_epi16(16), zero);
    const int64_t begin = std::max(kb0, group * group_inputs), end = std::min(kb1, (group + 1) * group_inputs);
    for (int64_t w = begin / 16; w < end / 16; ++w) {  // one word per column: 8 kept values, 4 groups, 16 inputs
      prefetch_ahead(words0 + w * kTileCols);
      prefetch_ahead(words1 + w * kTileCols);
      const __m512i words = two_tiles(words0 + w * kTileCols, words1 + w * kTileCols);
      const __m512i meta = four_groups_meta(meta0, meta1, w * kSparseInt4WordGroups);
      COMPTRUST_UNROLL for (int gg = 0; gg < kSparseInt4WordGroups; ++gg) {
        const int64_t g = w * kSparseInt4WordGroups + gg;
        const __m512i v0 = _mm512_add_epi16(
            _mm512_and_si512(_mm512_multishift_epi64_epi8(pair_offsets(8 * gg, 8 * gg), words), nibble), bias);
        const __m512i v1 = _mm512_add_epi16(
            _mm512_and_si512(_mm512_multishift_epi64_epi8(pair_offsets(8 * gg + 4, 8 * gg + 4), words), nibble), bias);
        __m512i idx0, idx1;
        lanes.indices(meta, gg, idx0, idx1);
        uint16_t* out = codes + (kSparse24Group * g - kb0) / 2 * kAmxCols * 2;
        if constexpr (ROWS == PanelRows::kSparse24) {
          _mm512_storeu_si512(out, _mm512_permutexvar_epi16(lanes.kept_pairs(v0, v1), table));
          _mm512_storeu_si512(out + kAmxCols * 2, lanes.positions(idx0, idx1, g));
          continue;
        }
        COMPTRUST_UNROLL for (int pair = 0; pair < 2; ++pair)
          _mm512_storeu_si512(out + pair * kAmxCols * 2,
                              _mm512_permutexvar_epi16(lanes.pair_row(idx0, idx1, pair, v0, v1, none), table));
      }
    }
  }
}

// scale[g][16] of tiles t, t+1 (a missing second tile: zeros); zero_scale 0 (sparse_int4_code_pairs subtracts the zero).
COMPTRUST_AVX512_BF16 void sparse_int4_group_params(const Sparse24Problem& p, int64_t t, int tiles, float* scale,
                                                    float* zero_scale) {
  for (int64_t g = 0; g < p.groups; ++g) {
    _mm512_store_ps(scale + g * kAmxCols,
                    join_halves(load_scales(p.tile_scales(t) + g * kTileCols),
                                tiles > 1 ? load_scales(p.tile_scales(t + 1) + g * kTileCols) : _mm256_setzero_ps()));
    _mm512_store_ps(zero_scale + g * kAmxCols, _mm512_setzero_ps());
  }
}

// Values exact in bf16 (int4 as q - zero when its groups are whole tile steps, bf16 values): fp32 (fp16) x from
// kAmxSplitMinRows rows up to the expanded path (kDenseMinRows) runs on the tile unit as three bf16 planes whose
// sum is exactly x (amx_bf16.h AmxActivations), as accurate as the fp32 kernels. fp32 and fp16 values would be
// rounded, so they stay on the sparse kernel. Against fp32 F.linear, side by side on cold SmolLM2 and
// 4096x4096 weights, tile path / sparse kernel: int4 values 2.2-3.7x / 1.3-2.2x at 16-48 rows, 1.4-2.8x /
// 0.8-0.9x at 64, 0.85-1.7x / 0.7-0.8x at 128; bf16 values 1.7-2.8x / 1.0-2.1x at 16-48 rows, 1.1-2.7x /
// 0.8-1.0x at 64. At 8 rows the sparse kernel is as fast or faster (2.7-4.3x / 2.2-4.5x).
// From kRowVectorOverSplitRows rows on layers of at least kRowVectorOverSplitWeights weights, the row-vector
// kernel (sparse24_row_vectors.h) beats the planes, side by side against fp32 F.linear (planes / row vectors):
// int4 values (g128) on 4096x4096, 11008x4096, 4096x11008 at 48 rows 1.29-2.06 / 1.19-1.40, at 64 0.95-1.34 /
// 1.23-1.38, at 96 0.98-1.09 / 1.20-1.63; bf16 values at 64 rows 0.90-1.88 / 1.33-1.79, at 96 0.84-1.29 /
// 1.20-1.71. On the SmolLM2 shapes the planes stay ahead up to 128 rows (int4 1.17-2.47 / 0.93-1.62).
constexpr int64_t kAmxSplitMinRows = 16;
constexpr int64_t kRowVectorOverSplitRows = 64;
constexpr int64_t kRowVectorOverSplitWeights = int64_t{1} << 24;
template <class V>
bool amx_exact_values(const Sparse24Problem& p) {
  if constexpr (std::is_same_v<V, Int4Values>) return 2 * p.group_size % kAmxStep == 0;
  return std::is_same_v<V, at::BFloat16>;
}

// y = x @ W^T on the tile unit: Out bf16 for bf16 x (one plane), float for fp32 x (three planes, only where
// amx_exact_values).
// The tile unit takes the panels as dense rows; vdpbf16ps as sparse rows, which skip the pruned zeros (bf16_dot.h).
template <class V, class Out>
void run_bf16_panels(const Sparse24Problem& p, const AmxActivations& x, Out* y) {
  const auto run = [&](auto rows) {
    constexpr PanelRows ROWS = decltype(rows)::value;
    if constexpr (std::is_same_v<V, Int4Values>) {
      if (2 * p.group_size % kAmxStep == 0) {
        gemm_bf16_panels<ROWS>(
            x, y, p.m, p.n, p.k, 2 * p.group_size, false,
            [&](int64_t t, int tiles, int64_t kb0, int64_t kb1, uint16_t* codes) {
              sparse_int4_code_pairs<ROWS>(p, t, tiles, kb0, kb1, codes);
            },
            [&](int64_t t, int tiles, float* scale, float* zero_scale) {
              sparse_int4_group_params(p, t, tiles, scale, zero_scale);
            });
        return;
      }
    }
    gemm_bf16_panels_values<ROWS>(x, y, p.m, p.n, p.k,
                                  [&](int64_t t, int tiles, int64_t kb0, int64_t kb1, uint16_t* panel) {
                                    if constexpr (std::is_same_v<V, at::BFloat16>)
                                      sparse_pairs_bf16<ROWS>(p, t, tiles, kb0, kb1, panel);
                                    else
                                      sparse_pairs<V, ROWS>(p, t, tiles, kb0, kb1, panel);
                                  });
  };
  if (amx_bf16_usable()) run(std::integral_constant<PanelRows, PanelRows::kDense>{});
  else run(std::integral_constant<PanelRows, PanelRows::kSparse24>{});
}

// ---------------------------------------------------------- AVX-512 VNNI a8 (int8 x, int4 values)
// act_bits = 8: x quantized to int8 per row and per block of up to kActBlock inputs, the blocks restarting at
// each quantization group (2 * group_size inputs), as reference.quantize_activations_int8 does. One zmm holds
// 16 columns (tiles t and t + 1). Per 2:4 group, vpshufb gathers each column's two kept inputs from the
// group's four int8 x (the control built from the metadata nibbles by vpmultishiftqb and one vpternlogd),
// vpmultishiftqb puts the kept codes in bytes, and vpdpbusd adds q0 x0 + q1 x1 per column into int32; a
// second vpdpbusd with weights 1 adds x0 + x1, for the zero point: sum (q - z) x = sum q x - z sum x.
// Two groups per step: 8 vector instructions per 64 multiply-adds, against 8 per 16 for float x.

#endif  // COMPTRUST_X86

// Rows of x per task of the activation loops below: one task for a few rows of a small layer.
inline int64_t activation_rows_grain(int64_t k) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)); }

// x8[i, k] (natural order) and block_scale[i, groups * blocks_per_group] for rows of x [m, k].
void quantize_rows_int8(const float* x, int64_t m, int64_t k, int64_t group_inputs, int8_t* x8, float* block_scale) {
  const int64_t groups = (k + group_inputs - 1) / group_inputs, per_group = (group_inputs + kActBlock - 1) / kActBlock;
#ifdef COMPTRUST_X86
  const bool avx512 = select_isa() == Isa::kAvx512;
#endif
  at::parallel_for(0, m, activation_rows_grain(k), [&](int64_t row_begin, int64_t row_end) {
    for (int64_t i = row_begin; i < row_end; ++i) {
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t b = 0; b < per_group; ++b) {
          const int64_t begin = g * group_inputs + b * kActBlock;
          const int64_t end = std::min({begin + kActBlock, (g + 1) * group_inputs, k});
#ifdef COMPTRUST_X86
          if (avx512 && end - begin == kActBlock) {
            block_scale[(i * groups + g) * per_group + b] = quantize_block_int8(x + i * k + begin, x8 + i * k + begin);
            continue;
          }
#endif
          float amax = 0.f;
          for (int64_t kk = begin; kk < end; ++kk) amax = std::max(amax, std::abs(x[i * k + kk]));
          const float inv = amax > 0.f ? 127.f / amax : 0.f;  // a true division, as the reference
          for (int64_t kk = begin; kk < end; ++kk)
            x8[i * k + kk] = static_cast<int8_t>(round_int8_range(x[i * k + kk] * inv));
          block_scale[(i * groups + g) * per_group + b] = amax / 127.f;
        }
      }
    }
  });
}

// out[m, k] = x8 times its block scales (quantize_rows_int8's layouts): the int8 activations as the float
// kernels take them (the fallback where the CPU lacks VNNI or VBMI).
void dequantize_rows_int8(const int8_t* x8, const float* block_scale, int64_t m, int64_t k, int64_t group_inputs,
                          float* out) {
  const int64_t groups = (k + group_inputs - 1) / group_inputs, per_group = (group_inputs + kActBlock - 1) / kActBlock;
  at::parallel_for(0, m, activation_rows_grain(k), [&](int64_t row_begin, int64_t row_end) {
    for (int64_t i = row_begin; i < row_end; ++i)
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t b = 0; b < per_group; ++b) {
          const int64_t begin = g * group_inputs + b * kActBlock;
          const int64_t end = std::min({begin + kActBlock, (g + 1) * group_inputs, k});
          const float scale = block_scale[(i * groups + g) * per_group + b];
          for (int64_t kk = begin; kk < end; ++kk) out[i * k + kk] = static_cast<float>(x8[i * k + kk]) * scale;
        }
  });
}

#ifdef COMPTRUST_X86
// x8[i * kLimbs + l, k] (natural order) and block_scale[i * kLimbs + l, groups * blocks_per_group]: limb l of
// rows of fp32 x [m, k] (int8_limbs.h), blocks as quantize_rows_int8's.
void quantize_rows_limbs(const float* x, int64_t m, int64_t k, int64_t group_inputs, int8_t* x8, float* block_scale) {
  static const LimbOrder kNatural = limb_order([](int j) { return j; });
  const int64_t groups = (k + group_inputs - 1) / group_inputs, per_group = (group_inputs + kActBlock - 1) / kActBlock;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t b = 0; b < per_group; ++b) {
        const int64_t begin = g * group_inputs + b * kActBlock;
        const int64_t end = std::min({begin + kActBlock, (g + 1) * group_inputs, k});
        int8_t* const out[kLimbs] = {x8 + i * kLimbs * k + begin, x8 + (i * kLimbs + 1) * k + begin,
                                     x8 + (i * kLimbs + 2) * k + begin};
        float steps[kLimbs];
        limbs_of_block(x + i * k + begin, std::max<int64_t>(0, end - begin), kNatural, out, steps);
        for (int l = 0; l < kLimbs; ++l) block_scale[((i * kLimbs + l) * groups + g) * per_group + b] = steps[l];
      }
}

// Rows i0..i0+R-1 of y for tiles t, t + 1 (t the last tile: run twice over, the low half stored), or at
// batch 1 the P pairs from tile t together (more weight streams in flight, as gemm_tiled_avx512.cpp's a8 kernels).
// Two 2:4 groups at a time: each 32-bit lane (column) gets bytes [q0, q1, q0', q1'] of groups g, g + 1 and
// the four inputs they multiply, so one vpdpbusd adds all four products. The decoding is shared by the R rows.
// LIMBS = kLimbs: fp32 x as int8 limbs (int8_limbs.h, quantize_rows_limbs): each row is three int8 rows whose
// block sums are scaled by their own block scales into the row's one accumulator.
template <int R, int P = 1, int LIMBS = 1>
COMPTRUST_AVX512_VNNI_VBMI void a8_int4_avx512(const Sparse24Problem& p, const int8_t* x8, const float* block_scale,
                                               int64_t t, int64_t i0) {
  static_assert(P == 1 || R == 1, "several pairs at batch 1 only");
  constexpr int V = R * LIMBS;                 // int8 rows
  constexpr int C = V == 1 && P == 1 ? 2 : 1;  // chains per int8 row and pair (vpdpbusd waits ~5 cycles for its predecessor)
  constexpr int U = R * P;                     // accumulators: (pair, row)
  constexpr int W = V * P;                     // integer sums: (pair, int8 row)
  const int64_t tiles = p.n / kTileCols;
  int64_t ta[P], tb[P];  // each pair's two tiles
  for (int q = 0; q < P; ++q) {
    ta[q] = t + 2 * q;
    tb[q] = ta[q] + 1 < tiles ? ta[q] + 1 : ta[q];
  }
  const int64_t group_inputs = 2 * p.group_size, per_group = (group_inputs + kActBlock - 1) / kActBlock;
  const int8_t* xr = x8 + i0 * LIMBS * p.k;
  // vpmultishiftqb controls, per column lane c (the odd lane of a quadword reads its upper half):
  //   meta: the quadword holds the meta words of groups g, g + 1 (the same for both lanes); bytes 0..3 get
  //         idx0, idx1 of group g and of group g + 1 for column c % 8.
  //   codes (half h of a word: groups 2h, 2h + 1): bytes 0..3 get kept values 4h .. 4h + 3 of the column.
  alignas(64) uint8_t meta_bits[64], code_bits[2][64];
  for (int lane = 0; lane < 16; ++lane) {
    const int c = lane % kTileCols, high = lane % 2 ? 32 : 0;
    for (int j = 0; j < 4; ++j) {
      meta_bits[4 * lane + j] = static_cast<uint8_t>(32 * (j / 2) + 4 * c + 2 * (j % 2));
      for (int h = 0; h < 2; ++h) code_bits[h][4 * lane + j] = static_cast<uint8_t>(high + 16 * h + 4 * j);
    }
  }
  const __m512i meta_offsets = _mm512_load_si512(meta_bits);
  const __m512i code_offsets[2] = {_mm512_load_si512(code_bits[0]), _mm512_load_si512(code_bits[1])};
  // Control bytes (idx & 3) | (0, 0, 4, 4): group g + 1's inputs are bytes 4..7 of the broadcast x.
  const __m512i two_bits = _mm512_set1_epi32(0x03030303), second_group = _mm512_set1_epi32(0x04040000);
  const __m512i nibbles = _mm512_set1_epi32(0x0F0F0F0F), ones = _mm512_set1_epi32(0x01010101);
  __m512 out[U];
  COMPTRUST_UNROLL for (int u = 0; u < U; ++u) out[u] = _mm512_setzero_ps();
  for (int64_t qg = 0; qg < p.groups; ++qg) {
    __m512 zero[P], scale[P], acc[U];
    COMPTRUST_UNROLL for (int q = 0; q < P; ++q) {
      zero[q] = join_halves(load_zeros(p.tile_zeros(ta[q]) + qg * kTileCols), load_zeros(p.tile_zeros(tb[q]) + qg * kTileCols));
      scale[q] = join_halves(load_scales(p.tile_scales(ta[q]) + qg * kTileCols),
                             load_scales(p.tile_scales(tb[q]) + qg * kTileCols));
    }
    COMPTRUST_UNROLL for (int u = 0; u < U; ++u) acc[u] = _mm512_setzero_ps();
    const int64_t w_begin = qg * p.group_size / 8, w_end = p.kept_end(qg) / 8;  // 16 inputs per word
    for (int64_t wb = w_begin, block = 0; wb < w_end; wb += kActBlock / 16, ++block) {
      __m512i dot[W][C], xsum[W][C];  // sum q x, sum x
      COMPTRUST_UNROLL for (int w = 0; w < W; ++w)
        COMPTRUST_UNROLL for (int c = 0; c < C; ++c) dot[w][c] = xsum[w][c] = _mm512_setzero_si512();
      for (int64_t w = wb; w < std::min(w_end, wb + kActBlock / 16); ++w) {
        COMPTRUST_UNROLL for (int q = 0; q < P; ++q) {
          const int32_t* w0 = p.tile_words(ta[q]) + w * kTileCols;
          const int32_t* w1 = p.tile_words(tb[q]) + w * kTileCols;
          prefetch_ahead(w0);
          prefetch_ahead(w1);
          const __m512i words = two_tiles(w0, w1);
          COMPTRUST_UNROLL for (int h = 0; h < 2; ++h) {
            const int64_t g = w * kSparseInt4WordGroups + 2 * h;
            int64_t metas0, metas1;
            std::memcpy(&metas0, p.tile_meta(ta[q]) + g, sizeof metas0);
            std::memcpy(&metas1, p.tile_meta(tb[q]) + g, sizeof metas1);
            const __m512i meta = _mm512_mask_set1_epi64(_mm512_set1_epi64(metas0), 0xF0, metas1);
            const __m512i control = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(meta_offsets, meta),
                                                              two_bits, second_group, 0xEA);  // a & b | c
            const __m512i codes = _mm512_and_si512(_mm512_multishift_epi64_epi8(code_offsets[h], words), nibbles);
            COMPTRUST_UNROLL for (int v = 0; v < V; ++v) {
              int64_t inputs;
              std::memcpy(&inputs, xr + v * p.k + kSparse24Group * g, sizeof inputs);
              const __m512i kept_x = _mm512_shuffle_epi8(_mm512_set1_epi64(inputs), control);
              const int s = q * V + v;
              dot[s][h % C] = dpbusd(dot[s][h % C], codes, kept_x);
              xsum[s][h % C] = dpbusd(xsum[s][h % C], ones, kept_x);
            }
          }
        }
      }
      COMPTRUST_UNROLL for (int w = 0; w < W; ++w) {
        const int q = w / V, v = w % V, u = q * R + v / LIMBS;
        const __m512 sx = _mm512_set1_ps(block_scale[((i0 * LIMBS + v) * p.groups + qg) * per_group + block]);
        __m512i dots = dot[w][0], sums = xsum[w][0];
        if constexpr (C > 1) dots = _mm512_add_epi32(dots, dot[w][1]), sums = _mm512_add_epi32(sums, xsum[w][1]);
        acc[u] = _mm512_fmadd_ps(sx, _mm512_fnmadd_ps(zero[q], _mm512_cvtepi32_ps(sums), _mm512_cvtepi32_ps(dots)), acc[u]);
      }
    }
    COMPTRUST_UNROLL for (int u = 0; u < U; ++u) out[u] = _mm512_fmadd_ps(scale[u / R], acc[u], out[u]);
  }
  COMPTRUST_UNROLL for (int u = 0; u < U; ++u) {
    const int q = u / R, r = u % R;
    _mm512_mask_storeu_ps(p.y + (i0 + r) * p.n + ta[q] * kTileCols, tb[q] != ta[q] ? 0xFFFF : 0x00FF, out[u]);
  }
}

#endif  // COMPTRUST_X86

// Tiles per task such that a task has at least kMinTaskMacs multiply-adds (as gemm_tiled_cpu.cpp).
constexpr int64_t kMinTaskMacs = 1 << 15;
// Batch 1, float values: 4 tiles per task on layers of at least 128 tiles. Side by side, cold weights, 4096x4096
// and 11008x4096 fp32 values against dense fp32 F.linear: 1.84-1.88x (one tile per task: 1.47-1.52x, the
// bytes' limit is 1.88x).
constexpr int kStreamTiles = 4;
constexpr int64_t kStreamTilesMin = 128;
constexpr int kStreamA8Pairs = 2;  // int4 values, int8 x

template <class V>
void run(const Sparse24Problem& p, Isa isa) {
  const int64_t tiles = p.n / kTileCols;
  const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / (p.m * (p.k / kSparse24Kept) * kTileCols));
#ifdef COMPTRUST_X86
  if (isa == Isa::kAvx512) {
    // Batch 1 with float values on layers of at least kStreamTilesMin tiles: kStreamTiles tiles per task (int4
    // values are bound by their decoding, and ran slower that way).
    if constexpr (!std::is_same_v<V, Int4Values>) {
      if (p.m == 1 && tiles >= kStreamTilesMin) {
        const int64_t groups = tiles / kStreamTiles;
        at::parallel_for(0, groups + tiles % kStreamTiles, 1, [&](int64_t begin, int64_t end) {
          for (int64_t u = begin; u < end; ++u) {
            if (u < groups) direct_float_avx512<V, 1, kStreamTiles>(p, u * kStreamTiles, 0);
            else direct_float_avx512<V, 1>(p, u + groups * (kStreamTiles - 1), 0);
          }
        });
        return;
      }
    }
    at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) rows_avx512<V>(p, t);
    });
    return;
  }
  if (isa == Isa::kAvx2) {
    at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) rows_avx2<V>(p, t);
    });
    return;
  }
#endif
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) tile_scalar<V>(p, t);
  });
}

// ------------------------------------------------------------------------------------ entry points
int64_t check_x_and_meta(const char* op, const at::Tensor& x, const at::Tensor& meta) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [m, k], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  const int64_t k = x.size(1);
  TORCH_CHECK(k > 0 && k % 8 == 0, op, ": k=", k, " must be a positive multiple of 8");
  TORCH_CHECK(meta.scalar_type() == at::kInt, op, ": meta must be int32 (tiled), got ", meta.scalar_type());
  TORCH_CHECK(meta.dim() == 2 && meta.size(0) > 0 && meta.size(1) == k / kSparse24Group, op, ": meta is ",
              meta.sizes(), ", expected [n/8, k/4=", k / kSparse24Group, "] for k=", k);
  return meta.size(0);
}

void check_cpu(const char* op, std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors)
    TORCH_CHECK(t->device().is_cpu(), op, " (CPU): every tensor must be on the CPU, got one on ", t->device());
}

// From kDenseMinRows rows on, blocks of tiles are expanded to dense rows and run through torch's GEMM
// (dense_blocks.h): multiplying the pruned zeros at BLAS speed beats skipping them in this file's kernels
// there. Measured against dense fp32 F.linear, side by side on SmolLM2 and 4096x4096 shapes (direct /
// expanded): 256 rows 1.3-1.6x / 1.1-1.25x, 3072 rows 2.0-2.9x / 0.9-1.25x; 128 rows about even (direct
// ahead for fp32 values, behind for int4 ones); 64 rows 0.7-1.3x / 1.5-1.9x. On AVX-512 the row-vector kernel
// takes 32 to 511 rows first, so there this path starts at kRowVectorMaxRows.
constexpr int64_t kDenseMinRows = 192;

template <class V, typename Out>
void run_expanded(const Sparse24Problem& p, const at::Tensor& x, at::Tensor& y, Isa isa) {
  gemm_by_dense_blocks<Out>(x, y, [&](int64_t t, Out* out, int64_t ld) {
#ifdef COMPTRUST_X86
    if (isa != Isa::kScalar) return expand_tile_avx2<V>(p, t, out, ld);
#endif
    expand_tile_scalar<V>(p, t, out, ld);
  });
}

at::Tensor run_int4_int8(Sparse24Problem& p, const at::Tensor& x, bool limbs);
constexpr int64_t kLimbsMinWeights = int64_t{1} << 22;

#ifdef COMPTRUST_X86
// One row of int8 x (or of fp32 x's limbs) through int4 values on the a8 kernel: on layers of at least
// kStreamTilesMin tiles the first a8_row_units(p) work units are kStreamA8Pairs tile pairs each, then (and on
// smaller layers every unit is) one pair, the last of which may hold one tile.
inline int64_t a8_row_units(const Sparse24Problem& p) {
  const int64_t pairs = (p.n / kTileCols + 1) / 2;
  return 2 * pairs >= kStreamTilesMin ? (pairs - 1) / kStreamA8Pairs : 0;
}

template <int LIMBS>
COMPTRUST_AVX512_VNNI_VBMI void a8_int4_row_unit(const Sparse24Problem& p, const int8_t* x8, const float* block_scale,
                                                 int64_t u, int64_t units) {
  if (u < units) a8_int4_avx512<1, kStreamA8Pairs, LIMBS>(p, x8, block_scale, 2 * kStreamA8Pairs * u, 0);
  else a8_int4_avx512<1, 1, LIMBS>(p, x8, block_scale, 2 * (u + units * (kStreamA8Pairs - 1)), 0);
}
#endif

template <class V>
at::Tensor run_kind(Sparse24Problem& p, const at::Tensor& x) {
  const Isa isa = select_isa();
#ifdef COMPTRUST_X86
  // fp32 x at batch 1 with int4 values on layers of at least kLimbsMinWeights: as int8 limbs on the VNNI kernel
  // (int8_limbs.h), fp32-accurate. Against dense fp32 F.linear, side by side on cold weights, limbs / float
  // kernel: 4096x4096 5.78x / 4.79x, 11008x4096 5.68x / 5.01x, 4096x11008 6.17x / 4.53x; on the SmolLM2 shapes
  // 0.77-1.16x the float kernel's speed, which stays there.
  if constexpr (std::is_same_v<V, Int4Values>)
    if (p.m == 1 && p.n * p.k >= kLimbsMinWeights && isa == Isa::kAvx512 && avx512_vnni_vbmi_usable())
      return run_int4_int8(p, x, true);
#endif
#ifdef COMPTRUST_X86
  if (x.scalar_type() == at::kBFloat16 && bf16_panels_for(p)) {
    const at::Tensor xb = x.contiguous();
    at::Tensor y = at::empty({p.m, p.n}, x.options());
    run_bf16_panels<V>(p, AmxActivations{xb.data_ptr<at::BFloat16>(), 1, nullptr}, y.data_ptr<at::BFloat16>());
    return y;
  }
  const bool row_vectors_first =
      isa == Isa::kAvx512 && p.m >= kRowVectorOverSplitRows && p.n * p.k >= kRowVectorOverSplitWeights;
  if (x.scalar_type() != at::kBFloat16 && p.m >= kAmxSplitMinRows && p.m < kDenseMinRows && !row_vectors_first &&
      p.k % kAmxStep == 0 && amx_exact_values<V>(p) && amx_bf16_usable()) {
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    const at::Tensor planes = at::empty({3, p.m, p.k}, at::kBFloat16);
    split_fp32_rows(xf.data_ptr<float>(), p.m, p.k, planes.data_ptr<at::BFloat16>());
    at::Tensor y = at::empty({p.m, p.n}, xf.options());
    run_bf16_panels<V>(p, AmxActivations{planes.data_ptr<at::BFloat16>(), 3, nullptr}, y.data_ptr<float>());
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  // kRowVectorMinRows to kRowVectorMaxRows rows: vectorized over x's rows (sparse24_row_vectors.h), multiplying
  // only the kept weights.
  if (isa == Isa::kAvx512 && p.m >= kRowVectorMinRows && p.m < kRowVectorMaxRows) {
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    at::Tensor y;
    if constexpr (std::is_same_v<V, Int4Values>)
      y = sparse24_row_vectors(
          xf, Int4KeptValues{p.tile_words(0), p.zeros, p.scales, p.sparse_groups(), p.groups, p.group_size}, p.meta, p.n);
    else
      y = sparse24_row_vectors(xf, FloatKeptValues<V>{static_cast<const V*>(p.values), p.sparse_groups()}, p.meta, p.n);
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
#endif
  if (p.m >= kDenseMinRows) {
    if (x.scalar_type() == at::kBFloat16) {
      at::Tensor y = at::empty({p.m, p.n}, x.options());
      run_expanded<V, at::BFloat16>(p, x.contiguous(), y, isa);
      return y;
    }
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    at::Tensor y = at::empty({p.m, p.n}, xf.options());
    run_expanded<V, float>(p, xf, y, isa);
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({p.m, p.n}, xf.options());
  p.x = xf.data_ptr<float>();
  p.y = y.data_ptr<float>();
  if (p.m > 0) run<V>(p, isa);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// int4 values on the VNNI kernel (a8_int4_avx512): int8 activations (act_bits = 8), or at batch 1 fp32 ones as
// int8 limbs (limbs, where avx512_vnni_vbmi_usable()). Without VNNI + VBMI, int8 activations run the float
// kernels on the dequantized int8 x (the same product, as the reference computes it).
at::Tensor run_int4_int8(Sparse24Problem& p, const at::Tensor& x, bool limbs) {
  if (p.m == 0) return at::empty({0, p.n}, x.options());
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t group_inputs = 2 * p.group_size, per_group = (group_inputs + kActBlock - 1) / kActBlock;
  TORCH_INTERNAL_ASSERT(!limbs || p.m == 1, "sparse24_int4_gemm_tiled: int8 limbs at batch 1 only");
  const int64_t rows = p.m * (limbs ? kLimbs : 1);
  at::Tensor x8 = at::empty({rows, p.k}, xf.options().dtype(at::kChar));
  at::Tensor block_scale = at::empty({rows, p.groups * per_group}, xf.options());
#ifdef COMPTRUST_X86
  if (limbs)
    quantize_rows_limbs(xf.data_ptr<float>(), p.m, p.k, group_inputs, x8.data_ptr<int8_t>(), block_scale.data_ptr<float>());
  else
#endif
    quantize_rows_int8(xf.data_ptr<float>(), p.m, p.k, group_inputs, x8.data_ptr<int8_t>(), block_scale.data_ptr<float>());
#ifdef COMPTRUST_X86
  if (avx512_vnni_vbmi_usable()) {
    at::Tensor y = at::empty({p.m, p.n}, xf.options());
    p.y = y.data_ptr<float>();
    const int64_t pairs = (p.n / kTileCols + 1) / 2;
    const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / (p.m * p.k * kTileCols));  // pairs per task
    const int8_t* x8_data = x8.data_ptr<int8_t>();
    const float* x_scales = block_scale.data_ptr<float>();
    const int64_t units = p.m == 1 ? a8_row_units(p) : 0;
    at::parallel_for(0, units + pairs - units * kStreamA8Pairs, units ? 1 : grain, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        if (p.m == 1) {
          limbs ? a8_int4_row_unit<kLimbs>(p, x8_data, x_scales, u, units) : a8_int4_row_unit<1>(p, x8_data, x_scales, u, units);
          continue;
        }
        for_each_row_block(p.m, [&](auto rows, int64_t i0) {
          a8_int4_avx512<decltype(rows)::value>(p, x8_data, x_scales, 2 * u, i0);
        });
      }
    });
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
#endif
  TORCH_CHECK(!limbs, "sparse24_int4_gemm_tiled: int8 limbs need AVX-512 VNNI and VBMI");  // callers check
  at::Tensor dequantized = at::empty({p.m, p.k}, xf.options());
  dequantize_rows_int8(x8.data_ptr<int8_t>(), block_scale.data_ptr<float>(), p.m, p.k, group_inputs,
                       dequantized.data_ptr<float>());
  const at::Tensor y = run_kind<Int4Values>(p, dequantized);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor run_problem(Sparse24Problem& p, const at::Tensor& x, at::ScalarType kind) {
  switch (kind) {
    case at::kFloat: return run_kind<float>(p, x);
    case at::kBFloat16: return run_kind<at::BFloat16>(p, x);
    case at::kHalf: return run_kind<at::Half>(p, x);
    default: return run_kind<Int4Values>(p, x);  // kInt: int4 words
  }
}

// x [..., k] -> y [..., n], as F.linear (and gemm_tiled_cpu).
template <class Op>
at::Tensor on_rows(const char* op, const at::Tensor& x, Op&& run_2d) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., k], got a 0-D tensor");
  const at::Tensor y = run_2d(x.dim() == 1 ? x.unsqueeze(0) : x.flatten(0, -2));
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = y.size(1);
  return y.view(sizes);
}

// Both ops' checks of (x, tensors) and their problem over x's rows, pointing into the tensors (which the caller
// keeps alive: the ops pass contiguous copies, bind_sparse24_* require contiguous tensors).
Sparse24Problem float_problem(const char* op, const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta) {
  check_cpu(op, {&x, &values, &meta});
  const int64_t tiles = check_x_and_meta(op, x, meta), k = x.size(1);
  const auto kind = values.scalar_type();
  TORCH_CHECK(kind == at::kFloat || kind == at::kBFloat16 || kind == at::kHalf, op,
              ": values must be float32, bfloat16 or float16, got ", kind);
  TORCH_CHECK(values.dim() == 4 && values.size(0) == tiles && values.size(1) == k / kSparse24Group &&
                  values.size(2) == kSparse24Kept && values.size(3) == kTileCols,
              op, ": values is ", values.sizes(), ", expected [", tiles, ", ", k / kSparse24Group, ", 2, 8] for n=",
              tiles * kTileCols, ", k=", k);
  return Sparse24Problem{nullptr, values.data_ptr(), reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>()),
                         nullptr, nullptr, nullptr, x.size(0), tiles * kTileCols, k, k / kSparse24Kept, 1};
}

Sparse24Problem int4_problem(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& meta,
                             const at::Tensor& zeros, const at::Tensor& scales, int64_t group_size) {
  check_cpu(op, {&x, &weight, &meta, &zeros, &scales});
  const int64_t tiles = check_x_and_meta(op, x, meta), k = x.size(1);
  TORCH_CHECK(k % 16 == 0, op, ": k=", k, " must be a multiple of 16 (k/2 kept values, 8 per int32 word)");
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0, op, ": group_size=", group_size,
              " (kept values) must be a positive multiple of 8");
  TORCH_CHECK(weight.scalar_type() == at::kInt, op, ": weight must be int32, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == tiles && weight.size(1) == k / 16 && weight.size(2) == kTileCols,
              op, ": weight is ", weight.sizes(), ", expected [", tiles, ", ", k / 16, ", 8] for k=", k);
  TORCH_CHECK(zeros.scalar_type() == at::kByte, op, ": zeros must be uint8, got ", zeros.scalar_type());
  TORCH_CHECK(scales.scalar_type() == at::kHalf, op, ": scales must be float16, got ", scales.scalar_type());
  const int64_t kept = k / kSparse24Kept, groups = (kept + group_size - 1) / group_size;
  for (const at::Tensor* t : {&zeros, &scales})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == tiles && t->size(1) == groups && t->size(2) == kTileCols, op, ": ",
                (t == &zeros ? "zeros" : "scales"), " is ", t->sizes(), ", expected [", tiles, ", ", groups,
                ", 8] for k=", k, ", group_size=", group_size);
  return Sparse24Problem{nullptr, weight.data_ptr(), reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>()),
                         zeros.data_ptr<uint8_t>(), scales.data_ptr<at::Half>(), nullptr, x.size(0), tiles * kTileCols,
                         k, group_size, groups};
}

at::Tensor sparse24_gemm_tiled_2d(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta) {
  const at::Tensor v = values.contiguous(), mt = meta.contiguous();
  Sparse24Problem p = float_problem("sparse24_gemm_tiled", x, v, mt);
  return run_problem(p, x, v.scalar_type());
}

at::Tensor sparse24_int4_gemm_tiled_2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& meta,
                                       const at::Tensor& zeros, const at::Tensor& scales, int64_t group_size,
                                       int64_t act_bits) {
  TORCH_CHECK(act_bits == 0 || act_bits == 8, "sparse24_int4_gemm_tiled: act_bits=", act_bits,
              " must be 0 (float activations) or 8");
  const at::Tensor w = weight.contiguous(), mt = meta.contiguous(), z = zeros.contiguous(), s = scales.contiguous();
  Sparse24Problem p = int4_problem("sparse24_int4_gemm_tiled", x, w, mt, z, s, group_size);
  if (act_bits == 8) return run_int4_int8(p, x, false);
  return run_problem(p, x, at::kInt);
}

at::Tensor sparse24_gemm_tiled_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta) {
  return on_rows("sparse24_gemm_tiled", x, [&](const at::Tensor& x2d) { return sparse24_gemm_tiled_2d(x2d, values, meta); });
}

at::Tensor sparse24_int4_gemm_tiled_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& meta,
                                        const at::Tensor& zeros, const at::Tensor& scales, int64_t group_size,
                                        int64_t act_bits) {
  return on_rows("sparse24_int4_gemm_tiled", x, [&](const at::Tensor& x2d) {
    return sparse24_int4_gemm_tiled_2d(x2d, weight, meta, zeros, scales, group_size, act_bits);
  });
}

#ifdef COMPTRUST_X86
// What the two bound 2:4 products share: the layers' problems (checked when bound) and the tensors they point into.
class BoundSparse24 : public BoundGemv {
 protected:
  BoundSparse24(std::vector<at::Tensor> tensors, std::vector<Sparse24Problem> problems)
      : tensors_(std::move(tensors)), problems_(std::move(problems)) {
    k_ = problems_[0].k;
    for (const Sparse24Problem& p : problems_) widths_.push_back(p.n);
  }

  std::vector<at::Tensor> tensors_;  // what the problems point into
  std::vector<Sparse24Problem> problems_;
};

// One fp32 row through 2:4 layers of one input, bound once (bound_gemv.h): all the layers' tiles shared out in one
// parallel region, each tile on the kernel the ops run it on at m == 1 (the float values' kStreamTiles kernel
// computes each of its tiles exactly as the one-tile kernel does), so the outputs are bit-identical to the ops'.
// V: the kept values' storage (float kinds or Int4Values).
template <class V>
class Sparse24Gemv final : public BoundSparse24 {
 public:
  Sparse24Gemv(std::vector<at::Tensor> tensors, std::vector<Sparse24Problem> problems)
      : BoundSparse24(std::move(tensors), std::move(problems)) {
    first_tile_.push_back(0);
    for (const Sparse24Problem& p : problems_) first_tile_.push_back(first_tile_.back() + p.n / kTileCols);
  }

  void run(const float* x, float* const* y) const override {
    const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / ((k_ / kSparse24Kept) * kTileCols));
    at::parallel_for(0, first_tile_.back(), grain, [&](int64_t begin, int64_t end) {
      for (size_t i = 0; i < problems_.size(); ++i) {
        const int64_t first = std::max(begin, first_tile_[i]), last = std::min(end, first_tile_[i + 1]);
        Sparse24Problem p = problems_[i];
        p.x = x;
        p.y = y[i];
        for (int64_t t = first - first_tile_[i]; t < last - first_tile_[i]; ++t) {
          if constexpr (std::is_same_v<V, Int4Values>) direct_int4_avx512<1>(p, t, 0);
          else direct_float_avx512<V, 1>(p, t, 0);
        }
      }
    });
  }

 private:
  std::vector<int64_t> first_tile_;  // the layers' tiles numbered one after another
};

// One fp32 row of int8 activations (act_bits 8) through 2:4 int4 layers of one input and group size, bound once:
// x quantized once for all of them (quantize_rows_int8), their work units (a8_int4_row_unit, as the op splits a
// layer at m == 1) shared out in one parallel region, so the outputs are bit-identical to the op's.
class Sparse24Int4A8Gemv final : public BoundSparse24 {
 public:
  Sparse24Int4A8Gemv(std::vector<at::Tensor> tensors, std::vector<Sparse24Problem> problems)
      : BoundSparse24(std::move(tensors), std::move(problems)) {
    first_unit_.push_back(0);
    for (const Sparse24Problem& p : problems_) {
      const int64_t pairs = (p.n / kTileCols + 1) / 2;
      pair_units_.push_back(a8_row_units(p));
      first_unit_.push_back(first_unit_.back() + pair_units_.back() + pairs - pair_units_.back() * kStreamA8Pairs);
    }
  }

  void run(const float* x, float* const* y) const override {
    const Sparse24Problem& first = problems_[0];
    const int64_t group_inputs = 2 * first.group_size, per_group = (group_inputs + kActBlock - 1) / kActBlock;
    std::vector<int8_t> x8(k_);
    std::vector<float> block_scale(first.groups * per_group);
    quantize_rows_int8(x, 1, k_, group_inputs, x8.data(), block_scale.data());
    at::parallel_for(0, first_unit_.back(), 1, [&](int64_t begin, int64_t end) {
      size_t layer = 0;
      for (int64_t u = begin; u < end; ++u) {
        while (u >= first_unit_[layer + 1]) ++layer;
        Sparse24Problem p = problems_[layer];
        p.y = y[layer];
        a8_int4_row_unit<1>(p, x8.data(), block_scale.data(), u - first_unit_[layer], pair_units_[layer]);
      }
    });
  }

 private:
  std::vector<int64_t> first_unit_;  // the layers' work units numbered one after another
  std::vector<int64_t> pair_units_;  // each layer's units of kStreamA8Pairs pairs (a8_row_units)
};
#endif

// Whether every tensor is a contiguous CPU one (what a bound product reads without copying).
bool bindable(const std::vector<at::Tensor>& tensors) {
  return std::all_of(tensors.begin(), tensors.end(),
                     [](const at::Tensor& t) { return t.device().is_cpu() && t.is_contiguous(); });
}

}  // namespace

std::shared_ptr<const BoundGemv> bind_sparse24_gemv(const std::vector<at::Tensor>& values,
                                                    const std::vector<at::Tensor>& meta) {
  TORCH_CHECK(!values.empty() && meta.size() == values.size(),
              "bind_sparse24_gemv: needs one or more values and as many meta");
#ifdef COMPTRUST_X86
  if (select_isa() != Isa::kAvx512 || !bindable(values) || !bindable(meta)) return nullptr;
  const auto kind = values[0].scalar_type();
  const int64_t k = meta[0].dim() == 2 ? meta[0].size(1) * kSparse24Group : 0;
  const at::Tensor x = at::empty({1, k});  // what the checks read of x: its shape, dtype and device
  std::vector<Sparse24Problem> problems;
  for (size_t i = 0; i < values.size(); ++i) {
    problems.push_back(float_problem("sparse24_gemm_tiled", x, values[i], meta[i]));
    if (values[i].scalar_type() != kind) return nullptr;
  }
  std::vector<at::Tensor> tensors(values);
  tensors.insert(tensors.end(), meta.begin(), meta.end());
  switch (kind) {
    case at::kFloat: return std::make_shared<Sparse24Gemv<float>>(std::move(tensors), std::move(problems));
    case at::kBFloat16: return std::make_shared<Sparse24Gemv<at::BFloat16>>(std::move(tensors), std::move(problems));
    default: return std::make_shared<Sparse24Gemv<at::Half>>(std::move(tensors), std::move(problems));
  }
#else
  return nullptr;
#endif
}

std::shared_ptr<const BoundGemv> bind_sparse24_int4_gemv(const std::vector<at::Tensor>& weights,
                                                         const std::vector<at::Tensor>& meta,
                                                         const std::vector<at::Tensor>& zeros,
                                                         const std::vector<at::Tensor>& scales, int64_t group_size,
                                                         int64_t act_bits) {
  TORCH_CHECK(!weights.empty() && meta.size() == weights.size() && zeros.size() == weights.size() &&
                  scales.size() == weights.size(),
              "bind_sparse24_int4_gemv: needs one or more weights and as many meta, zeros and scales");
  TORCH_CHECK(act_bits == 0 || act_bits == 8, "bind_sparse24_int4_gemv: act_bits=", act_bits, " must be 0 or 8");
#ifdef COMPTRUST_X86
  if (select_isa() != Isa::kAvx512 || (act_bits == 8 && !avx512_vnni_vbmi_usable())) return nullptr;
  for (const auto* tensors : {&weights, &meta, &zeros, &scales})
    if (!bindable(*tensors)) return nullptr;
  const int64_t k = meta[0].dim() == 2 ? meta[0].size(1) * kSparse24Group : 0;
  const at::Tensor x = at::empty({1, k});
  std::vector<Sparse24Problem> problems;
  for (size_t i = 0; i < weights.size(); ++i) {
    problems.push_back(int4_problem("sparse24_int4_gemm_tiled", x, weights[i], meta[i], zeros[i], scales[i], group_size));
    // fp32 x where run_kind takes int8 limbs instead (large layers)
    if (act_bits == 0 && problems.back().n * k >= kLimbsMinWeights && avx512_vnni_vbmi_usable()) return nullptr;
  }
  std::vector<at::Tensor> tensors;
  for (const auto* list : {&weights, &meta, &zeros, &scales}) tensors.insert(tensors.end(), list->begin(), list->end());
  if (act_bits == 8) return std::make_shared<Sparse24Int4A8Gemv>(std::move(tensors), std::move(problems));
  return std::make_shared<Sparse24Gemv<Int4Values>>(std::move(tensors), std::move(problems));
#else
  return nullptr;
#endif
}

}  // namespace comptrust::cpu

TORCH_LIBRARY_IMPL(comptrust, CPU, m) {
  m.impl("sparse24_gemm_tiled", &comptrust::cpu::sparse24_gemm_tiled_cpu);
  m.impl("sparse24_int4_gemm_tiled", &comptrust::cpu::sparse24_int4_gemm_tiled_cpu);
}
