// The AVX-512 two-tile kernels of the tiled GEMM (gemm_tiled.h): tiles t and t + 1 side by side in each zmm
// (16 output columns for the same inputs), float x decoded in registers (direct, int4 / int3 / int8) and int8 x
// (or fp32 x as three int8 limbs) on VNNI's vpdpbusd, several tile pairs per unit where that reads more streams.
#include "gemm_tiled.h"

#ifdef COMPTRUST_X86
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <utility>

namespace comptrust::cpu::tiled {
namespace {

// ------------------------------------------------------------ AVX-512 two-tile kernels: shared parts
// The AVX-512 direct and a8 kernels run tiles t and t + 1 together, lanes 0..7 and 8..15 of each zmm; where
// t is the last tile it runs twice over and only the low half is stored.
struct TilePair {
  const Problem& p;
  int64_t t, t1;
  bool pair;
  const int32_t* w0;
  const int32_t* w1;

  TilePair(const Problem& problem, int64_t tile)
      : p(problem), t(tile), t1(tile + 1 < problem.n / kTileCols ? tile + 1 : tile), pair(t1 != tile),
        w0(problem.tile_w(tile)), w1(problem.tile_w(t1)) {}

  // The word row at `offset` int32s into both tiles.
  COMPTRUST_AVX512 __m512i words(int64_t offset) const { return two_tiles(w0 + offset, w1 + offset); }

  // Half `half` of int3 block `block` in both tiles: its A words and its nibble words shifted to bits 0-3.
  COMPTRUST_AVX512 void int3_half(int64_t block, int half, __m512i& a, __m512i& nibbles) const {
    const Int3Words at = int3_words(p.k / kInt3BlockRows, block, half);
    a = words(at.a);
    nibbles = _mm512_srli_epi32(words(at.nibbles), at.shift);
  }

  COMPTRUST_AVX512 void prefetch(int64_t offset, int lines) const {
    for (int line = 0; line < lines; ++line) {
      prefetch_ahead(w0 + offset + 16 * line);
      prefetch_ahead(w1 + offset + 16 * line);
    }
  }

  // out[r] += s * (sum[r] - z * (row i0 + r's x summed over group g)): group g's zero point and scale.
  template <int R>
  COMPTRUST_AVX512 void add_group(int64_t g, int64_t i0, const __m512 (&sum)[R], __m512 (&out)[R]) const {
    const __m512 zero = join_halves(load_zeros(p.tile_zeros(t) + g * kTileCols), load_zeros(p.tile_zeros(t1) + g * kTileCols));
    const __m512 scale = join_halves(load_scales(p.tile_scales(t) + g * kTileCols), load_scales(p.tile_scales(t1) + g * kTileCols));
    COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
      const __m512 xsum = _mm512_set1_ps(p.x_group_sum[(i0 + r) * p.groups + g]);
      out[r] = _mm512_fmadd_ps(scale, _mm512_fnmadd_ps(zero, xsum, sum[r]), out[r]);
    }
  }

  template <int R>
  COMPTRUST_AVX512 void store(int64_t i0, const __m512 (&out)[R]) const {
    COMPTRUST_UNROLL for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(p.y + (i0 + r) * p.n + t * kTileCols, pair ? 0xFFFF : 0x00FF, out[r]);
  }
};

// ------------------------------------------------------------------ AVX-512 VNNI a8 (int8 x)
// Two tiles per zmm (TilePair: lanes 0..7 tile t, 8..15 tile t + 1). Each 32-bit lane holds
// one column's codes for 4 inputs as u8 bytes, in the order quantize_rows stored x8, so one vpdpbusd with
// the 4 activations broadcast from memory adds 4 products per lane into int32: 64 multiply-adds per
// instruction, against 16 per vpmaddubsw + vpaddw in the AVX2 kernel. Sums are exact in int32, so a block
// of 32 inputs needs no intermediate widening; it is scaled once, as in a8_avx2.
//   int4: the low nibbles of a word are inputs 0, 2, 4, 6 of its 8, the high nibbles 1, 3, 5, 7.
//   int3: byte q of a lane's code operand i is row 4q + i of a block's half (cpu_tiles.h: int3_code_bytes).
// x8[0..3] broadcast to every 32-bit lane.
COMPTRUST_AVX512 inline __m512i x8_lanes4(const int8_t* x8) {
  int32_t v;
  std::memcpy(&v, x8, sizeof v);
  return _mm512_set1_epi32(v);
}

// P tile pairs from tile t: t, t + 1; t + 2, t + 3; ...
template <int P, size_t... I>
std::array<TilePair, P> tile_pairs(const Problem& p, int64_t t, std::index_sequence<I...>) {
  return {TilePair(p, t + 2 * static_cast<int64_t>(I))...};
}

// P > 1 runs P neighbouring tile pairs through each group together: 2P weight streams in flight instead of 2.
// A thread reading more streams at once gets more of the memory bandwidth (read-only test on this 2-core
// Xeon, 8 MiB per call: 2 streams 28 GB/s, 4 streams 31.5, 8 streams 33-34).
// LIMBS = 3: fp32 x (quantize_limbs): each of the R rows is three int8 rows (limbs) whose block sums are scaled
// by their own block scales into the row's one accumulator; the codes are decoded once for all of them.
template <int BITS, int R, int P, int LIMBS = 1>
COMPTRUST_AVX512_VNNI void a8_avx512(const Problem& p, int64_t t, int64_t i0) {
  constexpr int V = R * LIMBS;  // int8 rows
  const std::array<TilePair, P> tiles = tile_pairs<P>(p, t, std::make_index_sequence<P>{});
  const int8_t* x8 = p.x8 + i0 * LIMBS * p.k;
  const __m512i nibbles = _mm512_set1_epi8(0x0F);
  __m512 out[P][R];
  COMPTRUST_UNROLL for (int q = 0; q < P; ++q)
    COMPTRUST_UNROLL for (int r = 0; r < R; ++r) out[q][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t kb = g * p.group_size, ke = p.group_end(g);
    __m512 acc[P][R];
    COMPTRUST_UNROLL for (int q = 0; q < P; ++q)
      COMPTRUST_UNROLL for (int r = 0; r < R; ++r) acc[q][r] = _mm512_setzero_ps();
    for (int64_t b = 0, bk = kb; bk < ke; ++b, bk += p.block_inputs) {
      const int64_t bend = std::min(ke, bk + p.block_inputs);
      // Two accumulator chains per pair and row (int4: even and odd inputs; int3: the two halves): vpdpbusd
      // waits ~5 cycles for its predecessor, and one chain would set the pace. With 8 or more (pair, row)
      // sums in flight one chain each is enough (and four pairs of fp32 x's three limbs fit in registers).
      constexpr int C = P * V >= 8 ? 1 : 2;
      __m512i dot[P][V][C];
      COMPTRUST_UNROLL for (int q = 0; q < P; ++q)
        COMPTRUST_UNROLL for (int v = 0; v < V; ++v)
          COMPTRUST_UNROLL for (int c = 0; c < C; ++c) dot[q][v][c] = _mm512_setzero_si512();
      if constexpr (BITS == 4) {
        for (int64_t row = bk / 8; row < bend / 8; ++row) {
          __m512i even[P], odd[P];
          COMPTRUST_UNROLL for (int q = 0; q < P; ++q) {
            tiles[q].prefetch(row * kTileCols, 1);
            const __m512i words = tiles[q].words(row * kTileCols);
            even[q] = _mm512_and_si512(words, nibbles);
            odd[q] = _mm512_and_si512(_mm512_srli_epi32(words, 4), nibbles);
          }
          // Row by row, each row's two broadcasts feeding every pair: two x registers live, not 2V.
          COMPTRUST_UNROLL for (int v = 0; v < V; ++v) {
            const __m512i x_even = x8_lanes4(x8 + v * p.k + row * 8), x_odd = x8_lanes4(x8 + v * p.k + row * 8 + 4);
            COMPTRUST_UNROLL for (int q = 0; q < P; ++q) {
              dot[q][v][0] = dpbusd(dot[q][v][0], even[q], x_even);
              dot[q][v][C - 1] = dpbusd(dot[q][v][C - 1], odd[q], x_odd);
            }
          }
        }
      } else {
        for (int64_t ib = bk; ib < bend; ib += kInt3BlockRows) {  // int3 blocks: p.block_inputs is whole ones
          const int64_t block = ib / kInt3BlockRows;
          COMPTRUST_UNROLL for (int q = 0; q < P; ++q) tiles[q].prefetch(block * kInt3BlockPlanes * kTileCols, 2);
          COMPTRUST_UNROLL for (int half = 0; half < 2; ++half) {
            __m512i a[P], half_nibbles[P];
            COMPTRUST_UNROLL for (int q = 0; q < P; ++q) tiles[q].int3_half(block, half, a[q], half_nibbles[q]);
            COMPTRUST_UNROLL for (int i = 0; i < 4; ++i) {
              __m512i codes[P];  // byte q' of a lane: row 4q' + i of the half
              COMPTRUST_UNROLL for (int q = 0; q < P; ++q) codes[q] = int3_code_bytes(a[q], half_nibbles[q], i);
              // Each row's broadcast inputs feed every pair, one x register live.
              COMPTRUST_UNROLL for (int v = 0; v < V; ++v) {
                const __m512i xv = x8_lanes4(x8 + v * p.k + ib + half * 16 + i * 4);
                COMPTRUST_UNROLL for (int q = 0; q < P; ++q)
                  dot[q][v][half % C] = dpbusd(dot[q][v][half % C], codes[q], xv);
              }
            }
          }
        }
      }
      COMPTRUST_UNROLL for (int v = 0; v < V; ++v) {
        const __m512 sx = _mm512_set1_ps(p.x_block_scale[((i0 * LIMBS + v) * p.groups + g) * p.blocks_per_group + b]);
        COMPTRUST_UNROLL for (int q = 0; q < P; ++q) {
          const __m512i sum = C == 2 ? _mm512_add_epi32(dot[q][v][0], dot[q][v][C - 1]) : dot[q][v][0];
          acc[q][v / LIMBS] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), sx, acc[q][v / LIMBS]);
        }
      }
    }
    COMPTRUST_UNROLL for (int q = 0; q < P; ++q) tiles[q].template add_group<R>(g, i0, acc[q], out[q]);
  }
  COMPTRUST_UNROLL for (int q = 0; q < P; ++q) tiles[q].template store<R>(i0, out[q]);
}

// fp32 x's rows as limbs two at a time (six int8 rows: with two tile pairs, 12 int32 sums beside the fp32 ones
// fill the registers), then the odd one: run(std::integral_constant<int, R>{}, first_row).
template <class Run>
void for_each_limbs_row_block(int64_t m, Run&& run) {
  int64_t i0 = 0;
  for (; i0 + 2 <= m; i0 += 2) run(std::integral_constant<int, 2>{}, i0);
  if (i0 < m) run(std::integral_constant<int, 1>{}, i0);
}

// Tiles 2u and 2u + 1.
template <int BITS>
COMPTRUST_AVX512_VNNI void a8_rows_avx512(const Problem& p, int64_t u) {
  if (p.limbs == kLimbs) {
    for_each_limbs_row_block(p.m, [&](auto rows, int64_t i0) {
      a8_avx512<BITS, decltype(rows)::value, 1, kLimbs>(p, 2 * u, i0);
    });
    return;
  }
  for_each_row_block(p.m, [&](auto rows, int64_t i0) { a8_avx512<BITS, decltype(rows)::value, 1>(p, 2 * u, i0); });
}

// Batch 1 on layers of at least kStreamPairsMin tile pairs: kStreamPairs pairs at a time (smaller layers
// would split unevenly between the threads).
constexpr int kStreamPairs = 4;
constexpr int64_t kStreamPairsMin = 64;
// More rows, on layers of at least kRowBlockPairsMin pairs: kRowBlockPairs pairs at a time, so each row's
// broadcast inputs feed both pairs and the decoded codes of a pair every row of the block.
constexpr int kRowBlockPairs = 2;
constexpr int64_t kRowBlockPairsMin = 8;

// Tile pairs taken together as one unit of work (1: single pairs).
int pairs_per_unit(int64_t m, int64_t pairs) {
  if (m == 1) return pairs >= kStreamPairsMin ? kStreamPairs : 1;
  return pairs >= kRowBlockPairsMin ? kRowBlockPairs : 1;
}

// The unit of pairs_per_unit pairs from first_pair. At batch 1, fp32 x's limbs too (12 int32 sums, one chain
// each): cold, side by side, 6-9% faster on the Zen 4 than two pairs twice (4 streams), int4 and int3 on
// 4096x4096, 11008x4096 and 4096x11008.
template <int BITS>
COMPTRUST_AVX512_VNNI void a8_pair_unit_avx512(const Problem& p, int64_t first_pair) {
  if (p.m == 1) {
    if (p.limbs == kLimbs) a8_avx512<BITS, 1, kStreamPairs, kLimbs>(p, 2 * first_pair, 0);
    else a8_avx512<BITS, 1, kStreamPairs>(p, 2 * first_pair, 0);
    return;
  }
  if (p.limbs == kLimbs) {
    for_each_limbs_row_block(p.m, [&](auto rows, int64_t i0) {
      a8_avx512<BITS, decltype(rows)::value, kRowBlockPairs, kLimbs>(p, 2 * first_pair, i0);
    });
    return;
  }
  for_each_row_block(p.m, [&](auto rows, int64_t i0) {
    a8_avx512<BITS, decltype(rows)::value, kRowBlockPairs>(p, 2 * first_pair, i0);
  });
}

// ------------------------------------------------------------- AVX-512 direct (float x, int4 / int3)
// One zmm takes the same word row of two neighbouring tiles (lanes 0..7 tile t, lanes 8..15 tile t + 1:
// 16 output columns, all for the same inputs). Codes are looked up with vpermps in a table of their float
// values (vpermps reads only an index's low 4 bits, so no mask and no convert is needed), and the
// multiply-add takes x as an embedded broadcast from L1.
//   int4: one shift puts code j of the words in the low nibble: 3 instructions per 16 multiply-adds (the
//         AVX2 kernel needs 5 per 8: shift, mask, convert, broadcast, fma).
//   int3: row 4q + i of a block's half is 3 bits of its A word (i < 2) or nibble word (i = 3) at a fixed
//         place (cpu_tiles.h), one shift; i = 2 takes bits 0..1 from the shifted A word and bit 2 up from the
//         shifted nibble word in one vpternlogd. The bits above a code are its neighbours', so the table
//         repeats 0..7. 3-5 per 16.
// The two tiles' outputs are adjacent in y, so one 16-float store writes both.
template <int BITS, int R>
COMPTRUST_AVX512 void direct_avx512(const Problem& p, int64_t t, int64_t i0) {
  constexpr int A = R == 1 ? 4 : 2;
  const TilePair tiles(p, t);
  const float* x = p.x + i0 * p.k;
  const __m512 table = BITS == 4 ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
                                 : _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7);
  __m512 out[R];
  COMPTRUST_UNROLL for (int r = 0; r < R; ++r) out[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512 acc[R][A];
    COMPTRUST_UNROLL for (int r = 0; r < R; ++r)
      COMPTRUST_UNROLL for (int a = 0; a < A; ++a) acc[r][a] = _mm512_setzero_ps();
    if constexpr (BITS == 4) {
      for (int64_t w = g * p.group_size / 8; w < p.group_end(g) / 8; ++w) {
        tiles.prefetch(w * kTileCols, 1);
        const __m512i words = tiles.words(w * kTileCols);
        COMPTRUST_UNROLL for (int j = 0; j < 8; ++j) {
          const __m512 codes = _mm512_permutexvar_ps(j == 0 ? words : _mm512_srli_epi32(words, 4 * j), table);
          COMPTRUST_UNROLL for (int r = 0; r < R; ++r)
            acc[r][j % A] = _mm512_fmadd_ps(codes, _mm512_set1_ps(x[r * p.k + 8 * w + j]), acc[r][j % A]);
        }
      }
    } else {
      const __m512i low_bits = _mm512_set1_epi32(3);
      for (int64_t block = g * p.group_size / kInt3BlockRows; block < p.group_end(g) / kInt3BlockRows; ++block) {
        tiles.prefetch(block * kInt3BlockPlanes * kTileCols, 2);  // a block is 96 bytes
        COMPTRUST_UNROLL for (int half = 0; half < 2; ++half) {
          __m512i a, nibbles;
          tiles.int3_half(block, half, a, nibbles);
          const float* xb = x + block * kInt3BlockRows + half * 16;
          _Pragma("GCC unroll 16") for (int j = 0; j < 16; ++j) {
            // Row 4q + i's code in bits 0-2 (cpu_tiles.h); the bits above index the table's second, equal half.
            const int q = j / 4, i = j % 4;
            const __m512i index =
                i == 0 ? _mm512_srli_epi32(a, 8 * q)
                : i == 1 ? _mm512_srli_epi32(a, 8 * q + 3)
                : i == 3 ? _mm512_srli_epi32(nibbles, 8 * q)
                         // A & C | B & ~C (A, B, C = 0xF0, 0xCC, 0xAA): 0xE4, with C the mask of bits 0..1.
                         : _mm512_ternarylogic_epi32(_mm512_srli_epi32(a, 8 * q + 6), _mm512_srli_epi32(nibbles, 8 * q + 1),
                                                     low_bits, 0xE4);
            const __m512 codes = _mm512_permutexvar_ps(index, table);
            COMPTRUST_UNROLL for (int r = 0; r < R; ++r)
              acc[r][j % A] = _mm512_fmadd_ps(codes, _mm512_set1_ps(xb[r * p.k + j]), acc[r][j % A]);
          }
        }
      }
    }
    __m512 sums[R];
    COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
      sums[r] = acc[r][0];
      COMPTRUST_UNROLL for (int a = 1; a < A; ++a) sums[r] = _mm512_add_ps(sums[r], acc[r][a]);
    }
    tiles.add_group<R>(g, i0, sums, out);
  }
  tiles.store<R>(i0, out);
}

// Tiles 2u and 2u + 1.
template <int BITS>
COMPTRUST_AVX512 void direct_rows(const Problem& p, int64_t u) {
  for_each_row_block(p.m, [&](auto rows, int64_t i0) { direct_avx512<BITS, decltype(rows)::value>(p, 2 * u, i0); });
}

// ------------------------------------------------------------- AVX-512 direct (float x, int8)
// The int8 word row holds 4 inputs of the tile's 8 columns; as for int4, one zmm takes two of them (input
// 4r + 2q in lanes 0..7, 4r + 2q + 1 in lanes 8..15), so a word row costs two shift/mask/convert/subtract/
// multiply-add rounds where AVX2 needs four. Word rows go in pairs so one batch row still fills 4 chains.
// The zero point is subtracted per code (see direct_avx2).
template <int R>
COMPTRUST_AVX512 void direct_int8_avx512(const Problem& p, int64_t t, int64_t i0) {
  constexpr int A = R == 1 ? 4 : 2;
  const int32_t* tw = p.tile_w(t);
  const float* x = p.x + i0 * p.k;
  const __m512i byte = _mm512_set1_epi32(0xFF);
  // Step s of a pair of word rows: bytes 2(s%2), 2(s%2)+1 of word row s/2, against x[2s], x[2s+1] of the 8 inputs.
  __m512i code_shifts[2], x_lanes[4];
  COMPTRUST_UNROLL for (int q = 0; q < 2; ++q)
    code_shifts[q] = halves(16 * q, 16 * q + 8);
  COMPTRUST_UNROLL for (int s = 0; s < 4; ++s)
    x_lanes[s] = halves(2 * s, 2 * s + 1);
  __m256 out[R];
  COMPTRUST_UNROLL for (int r = 0; r < R; ++r) out[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    const __m256 zero8 = load_tile_zeros<8>(p.tile_zeros(t) + g * kTileCols);
    const __m512 zero = join_halves(zero8, zero8);
    __m512 acc[R][A];
    COMPTRUST_UNROLL for (int r = 0; r < R; ++r)
      COMPTRUST_UNROLL for (int a = 0; a < A; ++a) acc[r][a] = _mm512_setzero_ps();
    const int64_t row_end = p.group_end(g) / 4;
    for (int64_t row = g * p.group_size / 4; row < row_end; row += 2) {
      const bool pair = row + 1 < row_end;  // a group of 4 (mod 8) inputs ends on a single word row
      prefetch_ahead(tw + row * kTileCols);
      const __m512i w[2] = {
          _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tw + row * kTileCols))),
          pair ? _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tw + (row + 1) * kTileCols)))
               : _mm512_setzero_si512()};
      __m512 xs[R];  // x[4 row .. 4 row + 7] in the low lanes (4 of them on a single row); vpermps picks 0..7
      COMPTRUST_UNROLL for (int r = 0; r < R; ++r)
        xs[r] = pair ? _mm512_castps256_ps512(_mm256_loadu_ps(x + r * p.k + row * 4))
                     : _mm512_castps128_ps512(_mm_loadu_ps(x + r * p.k + row * 4));
      COMPTRUST_UNROLL for (int s = 0; s < 4; ++s) {
        if (s >= 2 && !pair) break;
        const __m512i codes_i = _mm512_and_si512(_mm512_srlv_epi32(w[s / 2], code_shifts[s % 2]), byte);
        const __m512 weights = _mm512_sub_ps(_mm512_cvtepi32_ps(codes_i), zero);
        COMPTRUST_UNROLL for (int r = 0; r < R; ++r)
          acc[r][s % A] = _mm512_fmadd_ps(weights, _mm512_permutexvar_ps(x_lanes[s], xs[r]), acc[r][s % A]);
      }
    }
    const __m256 scale = load_scales(p.tile_scales(t) + g * kTileCols);
    COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
      out[r] = _mm256_fmadd_ps(scale, fold_chains(acc[r]), out[r]);
    }
  }
  COMPTRUST_UNROLL for (int r = 0; r < R; ++r) _mm256_storeu_ps(p.y + (i0 + r) * p.n + t * kTileCols, out[r]);
}

// The a8 kernels' work split: units of pairs_per_unit tile pairs (unit(first pair)), the rest single pairs
// (pair(u)); the last pair, which may hold one tile, always alone. grain: tiles per task (kMinTaskMacs).
template <class Unit, class Pair>
void for_each_pair_unit(const Problem& p, int64_t grain, Unit&& unit, Pair&& pair) {
  const int64_t pairs = (p.n / kTileCols + 1) / 2;
  const int per_unit = pairs_per_unit(p.m, pairs);
  const int64_t groups = per_unit > 1 ? (pairs - 1) / per_unit : 0;
  const int64_t units = groups + pairs - groups * per_unit;
  const int64_t tiles_per_unit = 2 * (groups ? per_unit : 1);
  at::parallel_for(0, units, (grain + tiles_per_unit - 1) / tiles_per_unit, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) u < groups ? unit(u * per_unit) : pair(u + groups * (per_unit - 1));
  });
}

}  // namespace

void run_vnni_two_tile(const Problem& p, int64_t grain) {
  for_each_pair_unit(
      p, grain,
      [&](int64_t first) { p.bits == 4 ? a8_pair_unit_avx512<4>(p, first) : a8_pair_unit_avx512<3>(p, first); },
      [&](int64_t u) { p.bits == 4 ? a8_rows_avx512<4>(p, u) : a8_rows_avx512<3>(p, u); });
}

void direct_rows_avx512(const Problem& p, int64_t u) { p.bits == 4 ? direct_rows<4>(p, u) : direct_rows<3>(p, u); }

void int8_rows_avx512(const Problem& p, int64_t t) {
  for_each_row_block(p.m, [&](auto rows, int64_t i0) { direct_int8_avx512<decltype(rows)::value>(p, t, i0); });
}
}  // namespace comptrust::cpu::tiled

#endif  // COMPTRUST_X86
