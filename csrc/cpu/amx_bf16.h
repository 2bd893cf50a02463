// The AMX-BF16 tile-unit product the CPU kernels share for bf16 activations (gemm_tiled_*.cpp,
// sparse24_*.cpp), on CPUs where amx_bf16_usable() (isa.h). Each kernel supplies a panel: two of its tiles
// (16 output columns) expanded over k, chunk by chunk, into the tile unit's pair layout, panel[kk / 2][16][2] bf16
// (row r of a B tile holds W[2r][c], W[2r + 1][c] for c = 0..15). Then for up to 64 rows at a time
// C[16 x 16] += A[16 x 32] . B[32 x 16] runs over k, one tdpbf16ps per 16 rows, 16 columns and 32 inputs.
// Weights are rounded to bf16 (as a bf16 dense model's are), sums kept in fp32, the output rounded once.
// Quantized weights may instead supply panels of their raw codes, scaled per group after the tile unit's
// product (gemm_bf16_panels): cheaper to decode, and the weights stay exact.
// Needs k % kAmxStep == 0. Every panel streams all rows of x through the tile loads, so very large batches
// are better served by expanding the weight for torch's GEMM (dense_blocks.h); the callers set the bound.
#pragma once
#include "isa.h"  // defines COMPTRUST_X86 on x86-64

#ifdef COMPTRUST_X86
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "comptrust/cpu_tiles.h"
#include "simd_common.h"

namespace comptrust::cpu {

constexpr int64_t kAmxStep = 32;    // inputs per tile step: A is 16 rows x 64 bytes
constexpr int64_t kAmxRows = 16;    // rows per A and C tile
constexpr int kAmxBlocks = 4;       // C tiles per pass: 64 rows
constexpr int kAmxCols = 16;        // columns per panel: two tiles

// Tile registers: C blocks in tmm0..3, A in tmm4 (16 rows) or tmm6 (a pass's last, shorter block), B in tmm5.
// Macros, not constants: the intrinsics paste the register number into their assembly text.
#define COMPTRUST_TMM_A 4
#define COMPTRUST_TMM_B 5
#define COMPTRUST_TMM_A_TAIL 6

// The 64-byte LDTILECFG operand: palette 1, then bytes per row and rows of each of the 16 tile registers.
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The B row of inputs kk, kk+1: both rounded to bf16, interleaved into column pairs.
COMPTRUST_AVX512_BF16 inline void store_pair_row(uint16_t* row, __m512 even, __m512 odd) {
  alignas(64) static constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                           8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i rounded = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(odd, even));  // [even 0..15, odd 0..15]
  _mm512_storeu_si512(row, _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), rounded));
}

// C += A . B for block C of a pass (A from rows 16*C.. of x; the short last block through tmm6).
#define COMPTRUST_AMX_STEP(C, TMM_A)                                                \
  do {                                                                              \
    for (int plane = 0; plane < PLANES; ++plane) {                                  \
      _tile_loadd(TMM_A, x + plane * plane_stride + (C) * kAmxRows * k + kb, k * 2); \
      _tile_dpbf16ps(C, TMM_A, COMPTRUST_TMM_B);                                    \
    }                                                                               \
  } while (0)
#define COMPTRUST_AMX_BLOCK(C)                                                                     \
  if constexpr (BLOCKS > (C)) {                                                                    \
    if constexpr (TAIL && BLOCKS == (C) + 1) COMPTRUST_AMX_STEP(C, COMPTRUST_TMM_A_TAIL);          \
    else COMPTRUST_AMX_STEP(C, COMPTRUST_TMM_A);                                                   \
  }

// C blocks += x[rows, kb0..kb1) @ B for the pass's BLOCKS blocks of 16 rows (the last shorter if TAIL), the B
// rows of inputs kb0..kb1 from b_rows[(kk - kb0) / 2][16][2]; x is the sum of PLANES bf16 planes, plane_stride
// elements apart (AmxActivations), all accumulated into the same C.
template <int BLOCKS, bool TAIL, int PLANES>
COMPTRUST_AMX inline void amx_steps(const at::BFloat16* x, int64_t k, int64_t plane_stride, const uint16_t* b_rows,
                                    int64_t kb0, int64_t kb1) {
  for (int64_t kb = kb0; kb < kb1; kb += kAmxStep) {
    _tile_loadd(COMPTRUST_TMM_B, b_rows + (kb - kb0) / 2 * kAmxCols * 2, kAmxCols * 4);
    COMPTRUST_AMX_BLOCK(0)
    COMPTRUST_AMX_BLOCK(1)
    COMPTRUST_AMX_BLOCK(2)
    COMPTRUST_AMX_BLOCK(3)
  }
}
#undef COMPTRUST_AMX_BLOCK
#undef COMPTRUST_AMX_STEP

template <int BLOCKS>
COMPTRUST_AMX inline void zero_blocks() {
  if constexpr (BLOCKS > 0) _tile_zero(0);
  if constexpr (BLOCKS > 1) _tile_zero(1);
  if constexpr (BLOCKS > 2) _tile_zero(2);
  if constexpr (BLOCKS > 3) _tile_zero(3);
}

// c[16 * b + r][16] = C block b's row r.
template <int BLOCKS>
COMPTRUST_AMX inline void store_blocks(float* c) {
  constexpr int64_t block_floats = kAmxRows * kAmxCols, stride = kAmxCols * 4;
  if constexpr (BLOCKS > 0) _tile_stored(0, c, stride);
  if constexpr (BLOCKS > 1) _tile_stored(1, c + block_floats, stride);
  if constexpr (BLOCKS > 2) _tile_stored(2, c + 2 * block_floats, stride);
  if constexpr (BLOCKS > 3) _tile_stored(3, c + 3 * block_floats, stride);
}

// Panels of raw codes (gemm_bf16_panels): per group g, the tile unit sums x . q over the group's inputs, then in
// fp32 for the 16 columns
//   c[r] += scale_g * (sum x.q) - zero_g * scale_g * (sum of x[r] over the group)
// (the direct kernels' identity, gemm_tiled.h). The codes are small integers, exact in bf16, so only x
// is rounded: the weights are as exact as in the fp32 kernels. Panels of weight values are one group with
// scale 1 and no zero point.
struct GroupParams {
  const float* scale;       // [groups][16]
  const float* zero_scale;  // [groups][16]: zero * scale
};

// Inputs per chunk of codes in a grouped pass: 8 KB of B rows, which stay in L1 when decoded just before use.
constexpr int64_t kCodeChunk = 256;

// The stretch of inputs after the chunk ending at kb1: the rest of its group up to kCodeChunk, else the next
// group's first chunk; empty (k, k) after the last.
inline std::pair<int64_t, int64_t> next_chunk(int64_t kb1, int64_t k, int64_t group_size) {
  const int64_t group_end = kb1 % group_size ? std::min(k, (kb1 / group_size + 1) * group_size) : std::min(k, kb1 + group_size);
  return {kb1, std::min(group_end, kb1 + kCodeChunk)};
}

// c[rows][16] = the pass's rows of x @ W over all groups, in chunks of at most kCodeChunk inputs inside one
// group (x_group_sum nullptr: no zero points). codes(kb0, kb1, next0, next1) gives chunk kb0..kb1's B rows
// (b_rows[(kk - kb0) / 2][16][2]); the chunk after it is next0..next1 (empty after the last), so that codes
// can decode it while the tile unit runs.
template <int BLOCKS, bool TAIL, int PLANES, class Codes>
COMPTRUST_AMX void amx_pass_grouped(const at::BFloat16* x, int64_t k, int64_t plane_stride, int64_t group_size,
                                    const GroupParams& params, const float* x_group_sum, int64_t rows, float* c,
                                    Codes&& codes) {
  const int64_t groups = (k + group_size - 1) / group_size;
  alignas(64) float sums[kAmxBlocks * kAmxRows * kAmxCols];
  for (int64_t r = 0; r < rows; ++r) _mm512_store_ps(c + r * kAmxCols, _mm512_setzero_ps());
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t group_end = std::min(k, (g + 1) * group_size);
    zero_blocks<BLOCKS>();
    for (int64_t kb0 = g * group_size; kb0 < group_end; kb0 += kCodeChunk) {
      const int64_t kb1 = std::min(group_end, kb0 + kCodeChunk);
      const auto [next0, next1] = next_chunk(kb1, k, group_size);
      amx_steps<BLOCKS, TAIL, PLANES>(x, k, plane_stride, codes(kb0, kb1, next0, next1), kb0, kb1);
    }
    store_blocks<BLOCKS>(sums);
    const __m512 scale = _mm512_load_ps(params.scale + g * kAmxCols);
    const __m512 zero_scale = _mm512_load_ps(params.zero_scale + g * kAmxCols);
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 out = _mm512_fmadd_ps(_mm512_load_ps(sums + r * kAmxCols), scale, _mm512_load_ps(c + r * kAmxCols));
      _mm512_store_ps(c + r * kAmxCols, x_group_sum ? _mm512_fnmadd_ps(zero_scale, _mm512_set1_ps(x_group_sum[r * groups + g]), out)
                                                    : out);
    }
  }
}

COMPTRUST_AMX inline void configure_pass(int64_t rows) {
  AmxTileConfig config;
  const int blocks = static_cast<int>((rows + kAmxRows - 1) / kAmxRows);
  const int tail = static_cast<int>(rows % kAmxRows);
  for (int b = 0; b < blocks; ++b) {
    config.rows[b] = static_cast<uint8_t>(b == blocks - 1 && tail ? tail : kAmxRows);
    config.colsb[b] = kAmxCols * 4;
  }
  config.rows[COMPTRUST_TMM_A] = kAmxRows;
  config.colsb[COMPTRUST_TMM_A] = kAmxStep * 2;
  config.rows[COMPTRUST_TMM_B] = kAmxStep / 2;
  config.colsb[COMPTRUST_TMM_B] = kAmxCols * 4;
  if (tail) {
    config.rows[COMPTRUST_TMM_A_TAIL] = static_cast<uint8_t>(tail);
    config.colsb[COMPTRUST_TMM_A_TAIL] = kAmxStep * 2;
  }
  _tile_loadconfig(&config);
}

// Configures the tiles for a pass of rows (1..64) and calls pass(blocks, tail) with the pass's number of
// 16-row blocks and whether the last is shorter, both as compile-time constants.
template <class Pass>
COMPTRUST_AMX inline void dispatch_pass(int64_t rows, Pass&& pass) {
  configure_pass(rows);
  const bool tail = rows % kAmxRows != 0;
  using Short = std::true_type;
  using Full = std::false_type;
  switch ((rows + kAmxRows - 1) / kAmxRows) {
    case 1: tail ? pass(std::integral_constant<int, 1>{}, Short{}) : pass(std::integral_constant<int, 1>{}, Full{}); break;
    case 2: tail ? pass(std::integral_constant<int, 2>{}, Short{}) : pass(std::integral_constant<int, 2>{}, Full{}); break;
    case 3: tail ? pass(std::integral_constant<int, 3>{}, Short{}) : pass(std::integral_constant<int, 3>{}, Full{}); break;
    default: tail ? pass(std::integral_constant<int, 4>{}, Short{}) : pass(std::integral_constant<int, 4>{}, Full{}); break;
  }
}

COMPTRUST_AMX inline void release_tiles() { _tile_release(); }

// y[r, 0..8*tiles) = c[r][...] (rounded once where Out is bf16), for r < rows; y rows n apart, c rows ldc.
template <class Out>
COMPTRUST_AVX2 inline void store_rows(const float* c, int64_t ldc, int64_t rows, int tiles, Out* y, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int u = 0; u < tiles; ++u) store8(y + r * n + u * kTileCols, _mm256_load_ps(c + r * ldc + u * kTileCols));
}

// Decoding codes into panels: vpmultishiftqb moves a code into the low bits of a 16-bit
// lane, then vpermw, which indexes by the lane's low 5 bits, looks it up in a table of bf16 integers.
// Table entry i: i & mask (entries 16..31 repeat 0..15, so the bits above a code, its neighbours', need no
// mask when mask is 2^BITS - 1).
COMPTRUST_AVX512_BF16 inline __m512i bf16_code_table(int mask) {
  const __m512 codes = _mm512_cvtepi32_ps(_mm512_and_si512(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(mask)));
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(codes, codes));
}
// Table entry i: i - 16 (for differences q - zero in -15..15, looked up as q - zero + 16).
COMPTRUST_AVX512_BF16 inline __m512i bf16_difference_table() {
  const __m512 low = _mm512_cvtepi32_ps(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(low, _mm512_sub_ps(low, _mm512_set1_ps(16.f))));
}

// vpmultishiftqb control for words with one output column per 32-bit lane: 16-bit lane 0 of the column gets
// the 8 bits from bit `first` of the column's word, lane 1 those from bit `second` (rotating within the
// word's quadword, so a negative offset reads the bits below bit 0 from the neighbour's word).
COMPTRUST_AVX512_BF16 inline __m512i pair_offsets(int first, int second) {
  const auto byte = [](int bit) { return static_cast<uint64_t>(bit & 63); };
  return _mm512_set1_epi64(static_cast<int64_t>(byte(first) | byte(second) << 16 | byte(32 + first) << 32 |
                                                byte(32 + second) << 48));
}

// sums[r][g] = sum of x[r, g * group_size .. end of group g) in fp32.
COMPTRUST_AVX512_BF16 inline void group_sums_bf16(const at::BFloat16* x, int64_t m, int64_t k, int64_t group_size, float* sums) {
  const int64_t groups = (k + group_size - 1) / group_size;
  for (int64_t r = 0; r < m; ++r) {
    const auto* row = reinterpret_cast<const uint16_t*>(x + r * k);
    for (int64_t g = 0; g < groups; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = g * group_size; i < std::min(k, (g + 1) * group_size); i += 16) {  // k % 32 == 0
        const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i));
        acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)));
      }
      sums[r * groups + g] = _mm512_reduce_add_ps(acc);
    }
  }
}

// The rows the tile unit multiplies: x as the sum of bf16 planes [planes][m][k]. bf16 activations are one
// plane. fp32 activations are three (split_fp32_rows): hi + mid + lo == x exactly, and each plane's product
// with a bf16 weight is exact in fp32, so the tile unit's fp32 sums are as accurate as an fp32 kernel's while
// running three tdpbf16ps (512 multiply-adds each per 16 rows) where the FMA kernels run 16 per instruction.
// Only weights exact in bf16 qualify: codes, and bf16 values (not fp32/fp16 values, not dequantized panels).
struct AmxActivations {
  const at::BFloat16* planes;
  int count;                 // 1 or 3
  const float* group_sums;   // [m][groups] fp32 sums of x per group; nullptr: from the bf16 plane (count 1)
};

// planes[3][m][k] = the exact split of fp32 x[m, k] (k % 16 == 0): hi = bf16(x), mid = bf16(x - hi),
// lo = x - hi - mid. x has 24 significant bits and each rounding (nearest even) takes the top 8 of what is
// left, so lo is exact in bf16 (short of underflow below ~2^-110, where the tile unit flushes to zero anyway).
COMPTRUST_AVX512_BF16 inline __m512 widen_bf16(__m256bh h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(h)), 16));
}
COMPTRUST_AVX512_BF16 inline void split_fp32_rows(const float* x, int64_t m, int64_t k, at::BFloat16* planes) {
  for (int64_t i = 0; i < m * k; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __m256bh hi = _mm512_cvtneps_pbh(v);
    const __m512 rest = _mm512_sub_ps(v, widen_bf16(hi));
    const __m256bh mid = _mm512_cvtneps_pbh(rest);
    const __m256bh lo = _mm512_cvtneps_pbh(_mm512_sub_ps(rest, widen_bf16(mid)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(planes + i), reinterpret_cast<__m256i>(hi));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(planes + m * k + i), reinterpret_cast<__m256i>(mid));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(planes + 2 * m * k + i), reinterpret_cast<__m256i>(lo));
  }
}

}  // namespace comptrust::cpu
#endif  // COMPTRUST_X86
