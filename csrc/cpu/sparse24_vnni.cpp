// The VNNI kernel of the 2:4 GEMM (sparse24.h): int4 kept values against int8 x (act_bits 8), or fp32 x as int8
// limbs at batch 1.
//
// act_bits = 8: x quantized to int8 per row and per block of up to kActBlock inputs, the blocks restarting at
// each quantization group (2 * group_size inputs), as reference.quantize_activations_int8 does. One zmm holds
// 16 columns (tiles t and t + 1). Per 2:4 group, vpshufb gathers each column's two kept inputs from the
// group's four int8 x (the control built from the metadata nibbles by vpmultishiftqb and one vpternlogd),
// vpmultishiftqb puts the kept codes in bytes, and vpdpbusd adds q0 x0 + q1 x1 per column into int32; a
// second vpdpbusd with weights 1 adds x0 + x1, for the zero point: sum (q - z) x = sum q x - z sum x.
// Two groups per step: 8 vector instructions per 64 multiply-adds, against 8 per 16 for float x.
// One row runs tile by tile where it can (stream_int4_avx512), the same decoding over one tile's two word rows.
#include "sparse24.h"

#ifdef COMPTRUST_X86
#include <algorithm>
#include <cstring>

namespace comptrust::cpu::sparse24 {
namespace {

// vpmultishiftqb controls, per column lane c (the odd lane of a quadword reads its upper half):
//   meta: the quadword holds the meta words of groups g, g + 1 (the same for both lanes); bytes 0..3 get
//         idx0, idx1 of group g and of group g + 1 for column c % 8.
//   codes[h] (half h of a word: groups 2h, 2h + 1): bytes 0..3 get kept values 4h .. 4h + 3 of the column.
struct MultishiftOffsets {
  alignas(64) uint8_t meta[64];
  alignas(64) uint8_t codes[2][64];
};
constexpr MultishiftOffsets make_multishift_offsets() {
  MultishiftOffsets offsets{};
  for (int lane = 0; lane < 16; ++lane) {
    const int c = lane % kTileCols, high = lane % 2 ? 32 : 0;
    for (int j = 0; j < 4; ++j) {
      offsets.meta[4 * lane + j] = static_cast<uint8_t>(32 * (j / 2) + 4 * c + 2 * (j % 2));
      for (int h = 0; h < 2; ++h) offsets.codes[h][4 * lane + j] = static_cast<uint8_t>(high + 16 * h + 4 * j);
    }
  }
  return offsets;
}
inline constexpr MultishiftOffsets kMultishift = make_multishift_offsets();

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
  const __m512i meta_offsets = _mm512_load_si512(kMultishift.meta);
  const __m512i code_offsets[2] = {_mm512_load_si512(kMultishift.codes[0]), _mm512_load_si512(kMultishift.codes[1])};
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

// One row on one tile (8 columns) at a time, so that a thread's stretch of tiles is one sequential stream of code
// words and one of metadata (a8_int4_avx512 at batch 1 reads 2 * kStreamA8Pairs tiles side by side: eight streams).
// The 16 lanes hold the tile's 8 columns twice: lanes 0..7 word row w (inputs 16w..16w+15), lanes 8..15 row w + 1,
// one 64-byte load for both; the two halves' sums are added at the end. Per half h the vpshufb source is one 16-byte
// broadcast of x whose bytes 0..7 feed lanes 0..7 (groups 4w + 2h, + 1) and bytes 8..15 lanes 8..15 (groups
// 4w + 4 + 2h, + 1): x8 in stream_int4_order, a block of 32 inputs as [16w + 0..7, 16w + 16..23, 16w + 8..15,
// 16w + 24..31]. The metadata of both rows is one 32-byte load, vpermq giving each half its groups' quadword.
// A step of two word rows is one activation block: needs k and the quantization group's inputs to be multiples of
// 32 (stream_int4_fits). x's scales are per block of stream_int4_block_inputs: fp32 x's limbs up to 128 inputs,
// whose integer sums are scaled once (per 32 inputs that was 15 of the kernel's ~50 vector instructions). Against
// blocks of 32, cold, alternated in one process on Zen 5 (old time / new): 4096 x 4096 1.20x, 11008 x 4096 1.45x,
// 4096 x 11008 1.20x; then 1.36-1.55x as fast as dense int4's one-stream kernel (int8 x: 1.45-1.60x).
template <int LIMBS>
COMPTRUST_AVX512_VNNI_VBMI void stream_int4_avx512(const Sparse24Problem& p, const int8_t* x8, const float* block_scale,
                                                   int64_t t) {
  const int64_t block_rows = stream_int4_block_inputs(p, LIMBS > 1) / 16;  // word rows per block of x's scales
  const int64_t per_group = (2 * p.group_size + 16 * block_rows - 1) / (16 * block_rows);
  const __m512i meta_offsets = _mm512_load_si512(kMultishift.meta);
  const __m512i code_offsets[2] = {_mm512_load_si512(kMultishift.codes[0]), _mm512_load_si512(kMultishift.codes[1])};
  const __m512i meta_quads[2] = {_mm512_setr_epi64(0, 0, 0, 0, 2, 2, 2, 2), _mm512_setr_epi64(1, 1, 1, 1, 3, 3, 3, 3)};
  // Control bytes (idx & 3) | second group's 4 | the upper half's 8.
  const __m512i two_bits = _mm512_set1_epi32(0x03030303), group_bytes = halves(0x04040000, 0x0C0C0808);
  const __m512i nibbles = _mm512_set1_epi32(0x0F0F0F0F), ones = _mm512_set1_epi32(0x01010101);
  const int32_t* words = p.tile_words(t);
  const uint32_t* meta = p.tile_meta(t);
  __m512 out = _mm512_setzero_ps();
  for (int64_t qg = 0; qg < p.groups; ++qg) {
    const __m256 zero8 = load_zeros(p.tile_zeros(t) + qg * kTileCols);
    const __m512 zero = join_halves(zero8, zero8);
    __m512 acc = _mm512_setzero_ps();
    const int64_t w_end = p.kept_end(qg) / 8;  // 8 kept values (16 inputs) per word row
    for (int64_t w = qg * p.group_size / 8, block = 0; w < w_end; ++block) {
      __m512i dot[LIMBS], xsum[LIMBS];  // sum q x, sum x
      COMPTRUST_UNROLL for (int l = 0; l < LIMBS; ++l) dot[l] = xsum[l] = _mm512_setzero_si512();
      for (const int64_t block_end = std::min(w_end, w + block_rows); w < block_end; w += 2) {
        prefetch_to_l2(words + w * kTileCols, 2 * kPrefetchBytes);
        prefetch_to_l2(meta + kSparseInt4WordGroups * w, kPrefetchBytes);
        const __m512i rows = _mm512_loadu_si512(words + w * kTileCols);
        const __m512i metas =
            _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(meta + kSparseInt4WordGroups * w)));
        COMPTRUST_UNROLL for (int h = 0; h < 2; ++h) {
          const __m512i control = _mm512_ternarylogic_epi32(
              _mm512_multishift_epi64_epi8(meta_offsets, _mm512_permutexvar_epi64(meta_quads[h], metas)), two_bits,
              group_bytes, 0xEA);  // a & b | c
          const __m512i codes = _mm512_and_si512(_mm512_multishift_epi64_epi8(code_offsets[h], rows), nibbles);
          COMPTRUST_UNROLL for (int l = 0; l < LIMBS; ++l) {
            const __m128i inputs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x8 + l * p.k + 16 * w + 16 * h));
            const __m512i kept_x = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(inputs), control);
            dot[l] = dpbusd(dot[l], codes, kept_x);
            xsum[l] = dpbusd(xsum[l], ones, kept_x);
          }
        }
      }
      COMPTRUST_UNROLL for (int l = 0; l < LIMBS; ++l) {
        const __m512 sx = _mm512_set1_ps(block_scale[(l * p.groups + qg) * per_group + block]);
        acc = _mm512_fmadd_ps(sx, _mm512_fnmadd_ps(zero, _mm512_cvtepi32_ps(xsum[l]), _mm512_cvtepi32_ps(dot[l])), acc);
      }
    }
    const __m256 scale8 = load_scales(p.tile_scales(t) + qg * kTileCols);
    out = _mm512_fmadd_ps(join_halves(scale8, scale8), acc, out);
  }
  _mm256_storeu_ps(p.y + t * kTileCols, _mm256_add_ps(_mm512_castps512_ps256(out),
                                                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(out), 1))));
}

}  // namespace

void a8_int4_rows(const Sparse24Problem& p, const int8_t* x8, const float* block_scale, int64_t u) {
  for_each_row_block(p.m, [&](auto rows, int64_t i0) {
    a8_int4_avx512<decltype(rows)::value>(p, x8, block_scale, 2 * u, i0);
  });
}

void a8_int4_row_unit(const Sparse24Problem& p, const int8_t* x8, const float* block_scale, int64_t u, int64_t units,
                      bool limbs) {
  const int64_t pair = u < units ? kStreamA8Pairs * u : u + units * (kStreamA8Pairs - 1);
  if (u < units) {
    limbs ? a8_int4_avx512<1, kStreamA8Pairs, kLimbs>(p, x8, block_scale, 2 * pair, 0)
          : a8_int4_avx512<1, kStreamA8Pairs>(p, x8, block_scale, 2 * pair, 0);
  } else {
    limbs ? a8_int4_avx512<1, 1, kLimbs>(p, x8, block_scale, 2 * pair, 0)
          : a8_int4_avx512<1, 1>(p, x8, block_scale, 2 * pair, 0);
  }
}

void stream_int4_tile(const Sparse24Problem& p, const int8_t* x8, const float* block_scale, int64_t t, bool limbs) {
  limbs ? stream_int4_avx512<kLimbs>(p, x8, block_scale, t) : stream_int4_avx512<1>(p, x8, block_scale, t);
}
}  // namespace comptrust::cpu::sparse24

#endif  // COMPTRUST_X86
