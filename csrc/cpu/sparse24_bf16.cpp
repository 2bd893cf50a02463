// The bf16 panels of the 2:4 GEMM (sparse24.h): bf16 x (and fp32 x as three exact bf16 planes) against panels of
// the 2:4 tiles as dense or sparse rows, on the AMX-BF16 tile unit or AVX512-BF16's vdpbf16ps (amx_bf16.h,
// bf16_dot.h, driver bf16_panels.h).
#include "sparse24.h"

#ifdef COMPTRUST_X86
#include <algorithm>
#include <type_traits>

#include "bf16_panels.h"

namespace comptrust::cpu::sparse24 {
// ------------------------------------------------------------------------ AMX-BF16 (bf16 x)
// bf16 activations from kAmxMinRows to kAmxMaxRows rows, where the CPU has AMX: two tiles expanded to dense
// rows (zeros where pruned) straight into the tile unit's bf16 pairs (amx_bf16.h), chunk by chunk. The pruned
// zeros are multiplied, which the tile unit does faster than the column kernels skip them. int4 values
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

namespace {

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

}  // namespace

template <class V>
bool amx_fp32_for(const Sparse24Problem& p, Isa isa) {
  const bool row_vectors_first =
      isa == Isa::kAvx512 && p.m >= kRowVectorOverSplitRows && p.n * p.k >= kRowVectorOverSplitWeights;
  return p.m >= kAmxSplitMinRows && p.m < kDenseMinRows && !row_vectors_first && p.k % kAmxStep == 0 &&
         amx_exact_values<V>(p) && amx_bf16_usable();
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

template bool amx_fp32_for<float>(const Sparse24Problem&, Isa);
template bool amx_fp32_for<at::Half>(const Sparse24Problem&, Isa);
template bool amx_fp32_for<at::BFloat16>(const Sparse24Problem&, Isa);
template bool amx_fp32_for<Int4Values>(const Sparse24Problem&, Isa);
template void run_bf16_panels<float, at::BFloat16>(const Sparse24Problem&, const AmxActivations&, at::BFloat16*);
template void run_bf16_panels<at::Half, at::BFloat16>(const Sparse24Problem&, const AmxActivations&, at::BFloat16*);
template void run_bf16_panels<at::BFloat16, at::BFloat16>(const Sparse24Problem&, const AmxActivations&, at::BFloat16*);
template void run_bf16_panels<Int4Values, at::BFloat16>(const Sparse24Problem&, const AmxActivations&, at::BFloat16*);
template void run_bf16_panels<float, float>(const Sparse24Problem&, const AmxActivations&, float*);
template void run_bf16_panels<at::Half, float>(const Sparse24Problem&, const AmxActivations&, float*);
template void run_bf16_panels<at::BFloat16, float>(const Sparse24Problem&, const AmxActivations&, float*);
template void run_bf16_panels<Int4Values, float>(const Sparse24Problem&, const AmxActivations&, float*);
}  // namespace comptrust::cpu::sparse24

#endif  // COMPTRUST_X86
