// The bf16 panels of the tiled GEMM (gemm_tiled.h): bf16 x (and fp32 x as three exact bf16 planes) against
// panels of codes or dequantized weights, on the AMX-BF16 tile unit or AVX512-BF16's vdpbf16ps (amx_bf16.h,
// bf16_dot.h, driver bf16_panels.h).
#include "gemm_tiled.h"

#ifdef COMPTRUST_X86
#include <ATen/Parallel.h>

#include <algorithm>

#include "amx_bf16.h"
#include "bf16_panels.h"

namespace comptrust::cpu::tiled {
// ------------------------------------------------------------------------ AMX-BF16 (bf16 x)
// Where the CPU has AMX, bf16 activations from kPanelMinRows to kAmxMaxRows rows run on the tile unit
// (amx_bf16.h) over panels of two tiles. k % 32 == 0 only; other shapes take the fp32 paths. Speed against
// bf16 F.linear (oneDNN, also on AMX), side by side on cold SmolLM2 and 4096x4096 weights: panels of codes,
// int4 1.6-2.5x at 8-16 rows and 1.2-2.1x at 64, int3 1.2-2.2x and 1.1-2.1x (panels of dequantized weights,
// which int4 and int3 took before: 0.95-1.35x and 0.56-1.06x). From 1024 rows (the crossover measured with
// dequantized panels) the bf16 BLAS path is faster.
// Without AMX but with AVX512-BF16 (Zen 4) the same panels run on vdpbf16ps (bf16_dot.h). Against bf16 F.linear
// (oneDNN, vdpbf16ps too), cold weights, side by side with the fp32 panel path it replaces / the BLAS path: int4
// at 8 rows 1.6-1.9x (0.8x), 32 rows 1.1-1.3x (0.6x), 64 rows 1.10-1.15x (0.6-0.8x, BLAS); int3 the same within
// noise. Both are compute-bound from ~64 rows, where oneDNN's kernel is a little faster than ours (0.9-0.95x at
// 128 rows), so the BLAS path takes over at kDotMaxRows (576x1536 at 256 rows: 0.79-0.86x / 0.90-0.93x), except
// on layers of kDotLargeWeights or more (4096x4096 at 256-512 rows: 0.87-0.91x / 0.81-0.84x).
constexpr int64_t kAmxMaxRows = 1024;
constexpr int64_t kDotMaxRows = 128;
constexpr int64_t kDotLargeWeights = int64_t{1} << 22;

// Whether bf16 x of m rows runs on the bf16 panels (either engine).
bool bf16_panels_for(int64_t m, int64_t n, int64_t k) {
  if (m < kPanelMinRows || m >= kAmxMaxRows || k % kAmxStep) return false;
  if (amx_bf16_usable()) return true;
  return avx512_bf16_usable() && (m < kDotMaxRows || n * k >= kDotLargeWeights);
}

namespace {


// (codes - zero) * scale over 16 columns, codes0 of the panel's first tile and codes1 of its second.
COMPTRUST_AVX512_BF16 inline __m512 panel_weights(__m256 codes0, __m256 codes1, __m512 zero, __m512 scale) {
  return _mm512_mul_ps(_mm512_sub_ps(join_halves(codes0, codes1), zero), scale);
}

// panel[(kk - kb0) / 2][16][2] (bf16 bits) for inputs kb0..kb1: tiles t, t+1 dequantized (a missing second
// tile: zero scales, so zero weights). Inputs kk, kk+1 become one 64-byte B row: vcvtne2ps2bf16 rounds both
// 16-column rows to bf16 (nearest even) and vpermw interleaves them into column pairs.
template <int BITS>
COMPTRUST_AVX512_BF16 void dequantize_pairs(const Problem& p, int64_t t, int tiles, int64_t kb0, int64_t kb1,
                                            uint16_t* panel) {
  const bool second = tiles > 1;
  const int32_t* w0 = p.tile_w(t);
  const int32_t* w1 = second ? p.tile_w(t + 1) : w0;  // read but multiplied by zero scales
  for (int64_t g = kb0 / p.group_size; g * p.group_size < kb1; ++g) {
    const int64_t kb = std::max(kb0, g * p.group_size), ke = std::min(kb1, p.group_end(g));
    const __m512 zero = join_halves(load_tile_zeros<BITS>(p.tile_zeros(t) + g * kTileCols),
                             second ? load_tile_zeros<BITS>(p.tile_zeros(t + 1) + g * kTileCols) : _mm256_setzero_ps());
    const __m512 scale = join_halves(load_scales(p.tile_scales(t) + g * kTileCols),
                              second ? load_scales(p.tile_scales(t + 1) + g * kTileCols) : _mm256_setzero_ps());
    if constexpr (BITS == 3) {
      for (int64_t block = kb / kInt3BlockRows; block < ke / kInt3BlockRows; ++block) {
        for (int half = 0; half < 2; ++half) {
          __m256i a0, nibbles0, a1, nibbles1;
          load_int3_half(w0, p.k / kInt3BlockRows, block, half, a0, nibbles0);
          load_int3_half(w1, p.k / kInt3BlockRows, block, half, a1, nibbles1);
          for (int j = 0; j < 16; j += 2)
            store_pair_row(panel + (block * kInt3BlockRows - kb0 + half * 16 + j) / 2 * kAmxCols * 2,
                           panel_weights(int3_codes(a0, nibbles0, j), int3_codes(a1, nibbles1, j), zero, scale),
                           panel_weights(int3_codes(a0, nibbles0, j + 1), int3_codes(a1, nibbles1, j + 1), zero, scale));
        }
      }
    } else {
      constexpr int per_word = BITS == 4 ? 8 : 4;
      for (int64_t row = kb / per_word; row < ke / per_word; ++row) {
        const __m256i words0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + row * kTileCols));
        const __m256i words1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w1 + row * kTileCols));
        for (int b = 0; b < per_word; b += 2) {
          uint16_t* out = panel + (row * per_word + b - kb0) / 2 * kAmxCols * 2;
          if constexpr (BITS == 4)
            store_pair_row(out, panel_weights(int4_codes(words0, b), int4_codes(words1, b), zero, scale),
                           panel_weights(int4_codes(words0, b + 1), int4_codes(words1, b + 1), zero, scale));
          else
            store_pair_row(out, panel_weights(int8_codes(words0, b), int8_codes(words1, b), zero, scale),
                           panel_weights(int8_codes(words0, b + 1), int8_codes(words1, b + 1), zero, scale));
        }
      }
    }
  }
}

// --- Panels of codes (amx_bf16.h gemm_bf16_panels), for int4 and int3 with groups of whole tile steps.
// Decoding is two to four instructions per 64-byte B row (16 columns x 2 inputs), against about 16 for
// dequantize_pairs: vpmultishiftqb moves each code of the pair into the low bits of its 16-bit lane, then
// vpermw looks it up in a table of the bf16 integers (amx_bf16.h).
// scale[g][16] and zero_scale[g][16] of tiles t, t+1 (a missing second tile: zeros).
template <int BITS>
COMPTRUST_AVX512_BF16 void group_params(const Problem& p, int64_t t, int tiles, float* scale, float* zero_scale) {
  const bool second = tiles > 1;
  for (int64_t g = 0; g < p.groups; ++g) {
    const __m512 zero = join_halves(load_tile_zeros<BITS>(p.tile_zeros(t) + g * kTileCols),
                                    second ? load_tile_zeros<BITS>(p.tile_zeros(t + 1) + g * kTileCols) : _mm256_setzero_ps());
    const __m512 s = join_halves(load_scales(p.tile_scales(t) + g * kTileCols),
                                 second ? load_scales(p.tile_scales(t + 1) + g * kTileCols) : _mm256_setzero_ps());
    _mm512_store_ps(scale + g * kAmxCols, s);
    _mm512_store_ps(zero_scale + g * kAmxCols, _mm512_mul_ps(zero, s));
  }
}

// codes[(kk - kb0) / 2][16][2] for inputs kb0..kb1 (multiples of 32): the codes of tiles t, t+1 (a missing
// second tile repeats the first; its scales are zero).
COMPTRUST_AVX512_BF16 void int4_code_pairs(const Problem& p, int64_t t, int tiles, int64_t kb0, int64_t kb1,
                                           uint16_t* codes) {
  const int32_t* w0 = p.tile_w(t);
  const int32_t* w1 = tiles > 1 ? p.tile_w(t + 1) : w0;
  const __m512i table = bf16_code_table(15);
  for (int64_t row = kb0 / 8; row < kb1 / 8; ++row) {  // 8 inputs per word: 4 B rows
    prefetch_ahead(w0 + row * kTileCols);
    prefetch_ahead(w1 + row * kTileCols);
    const __m512i words = two_tiles(w0 + row * kTileCols, w1 + row * kTileCols);
    uint16_t* out = codes + (row * 8 - kb0) / 2 * kAmxCols * 2;
    COMPTRUST_UNROLL for (int j = 0; j < 4; ++j) {
      const __m512i pair = _mm512_multishift_epi64_epi8(pair_offsets(8 * j, 8 * j + 4), words);
      _mm512_storeu_si512(out + j * kAmxCols * 2, _mm512_permutexvar_epi16(pair, table));
    }
  }
}

// int3 (cpu_tiles.h): rows 4q and 4q + 1 of a block's half are two 3-bit fields of its A word, one
// vpmultishiftqb; rows 4q + 2 and 4q + 3 take row 4q + 2's low bits from the A word and the rest from the nibble
// word, merged by vpternlogd.
COMPTRUST_AVX512_BF16 void int3_code_pairs(const Problem& p, int64_t t, int tiles, int64_t kb0, int64_t kb1,
                                           uint16_t* codes) {
  const int32_t* w0 = p.tile_w(t);
  const int32_t* w1 = tiles > 1 ? p.tile_w(t + 1) : w0;
  const __m512i table = bf16_code_table(7), first_low2 = _mm512_set1_epi32(3);  // bits 0-1 of a column's first lane
  for (int64_t block = kb0 / kInt3BlockRows; block < kb1 / kInt3BlockRows; ++block) {
    const int64_t offset = block * kInt3BlockPlanes * kTileCols;
    prefetch_ahead(w0 + offset);
    prefetch_ahead(w1 + offset);
    for (int half = 0; half < 2; ++half) {
      const Int3Words at = int3_words(p.k / kInt3BlockRows, block, half);
      const __m512i a = two_tiles(w0 + at.a, w1 + at.a), nibbles = two_tiles(w0 + at.nibbles, w1 + at.nibbles);
      uint16_t* out = codes + (block * kInt3BlockRows - kb0 + half * 16) / 2 * kAmxCols * 2;
      COMPTRUST_UNROLL for (int q = 0; q < 4; ++q) {
        const __m512i rows01 = _mm512_multishift_epi64_epi8(pair_offsets(8 * q, 8 * q + 3), a);
        const __m512i low2 = _mm512_multishift_epi64_epi8(pair_offsets(8 * q + 6, 8 * q + 6), a);
        const __m512i rest = _mm512_multishift_epi64_epi8(pair_offsets(8 * q + at.shift + 1, 8 * q + at.shift), nibbles);
        const __m512i rows23 = _mm512_ternarylogic_epi32(first_low2, low2, rest, 0xCA);  // first_low2 ? low2 : rest
        _mm512_storeu_si512(out + 2 * q * kAmxCols * 2, _mm512_permutexvar_epi16(rows01, table));
        _mm512_storeu_si512(out + (2 * q + 1) * kAmxCols * 2, _mm512_permutexvar_epi16(rows23, table));
      }
    }
  }
}

// Panels of codes need groups of whole tile steps; int8 and other groups take panels of dequantized weights,
// which are rounded to bf16 (so serve bf16 activations only).
bool amx_code_panels(const Problem& p) { return p.bits != 8 && p.group_size % kAmxStep == 0; }

// y[m, n] = x[m, k] @ W^T on the tile unit over panels of codes (amx_code_panels): Out bf16 for bf16 x, float
// for fp32 x split into exact bf16 planes.
template <class Out>
void run_amx_codes(const Problem& p, const AmxActivations& x, Out* y) {
  gemm_bf16_panels(
      x, y, p.m, p.n, p.k, p.group_size, true,
      [&](int64_t t, int tiles, int64_t kb0, int64_t kb1, uint16_t* codes) {
        p.bits == 4 ? int4_code_pairs(p, t, tiles, kb0, kb1, codes) : int3_code_pairs(p, t, tiles, kb0, kb1, codes);
      },
      [&](int64_t t, int tiles, float* scale, float* zero_scale) {
        p.bits == 4 ? group_params<4>(p, t, tiles, scale, zero_scale) : group_params<3>(p, t, tiles, scale, zero_scale);
      });
}

}  // namespace

bool amx_fp32_for(const Problem& p) {
  return p.m >= kPanelMinRows && p.k % kAmxStep == 0 && amx_code_panels(p) && amx_bf16_usable();
}

// y[m, n] (fp32) = x[m, k] (fp32) @ W^T on the tile unit, x split into three exact bf16 planes
// (amx_bf16.h AmxActivations): as accurate as the fp32 kernels (max error against the float64 product
// 0.3-1.2e-6 of the largest output, fp32 F.linear 0.5-1.7e-6). Where the CPU has AMX it replaces the AVX-512
// fp32 panel from kPanelMinRows rows, in gemm_tiled_2d's passes of up to kRowsPerPass rows. Int4 side by side on
// cold SmolLM2 and 4096x4096 weights, against the panel: 1.6-2.5x at 8 rows, 1.4-2.1x at 32, 1.6-1.8x at 64,
// 1.2-2.4x at 128, even at 256; against fp32 F.linear 2.9-5.5x at 8 rows, 1.4-2.0x at 64.
void run_amx_fp32(const Problem& p, const float* x, float* y) {
  const at::Tensor planes = at::empty({3, p.m, p.k}, at::kBFloat16);
  const at::Tensor sums = at::empty({p.m, p.groups}, at::kFloat);
  split_fp32_rows(x, p.m, p.k, planes.data_ptr<at::BFloat16>());
  group_sums_fp32(p, x, sums.data_ptr<float>());
  run_amx_codes(p, AmxActivations{planes.data_ptr<at::BFloat16>(), 3, sums.data_ptr<float>()}, y);
}

// y[m, n] (bf16) = x[m, k] (bf16) @ W^T on the tile unit.
void run_bf16_panels(const Problem& p, const at::BFloat16* x, at::BFloat16* y) {
  const AmxActivations planes{x, 1, nullptr};
  if (amx_code_panels(p)) return run_amx_codes(p, planes, y);
  const auto fill = [&](int64_t t, int tiles, int64_t kb0, int64_t kb1, uint16_t* panel) {
    if (p.bits == 4) dequantize_pairs<4>(p, t, tiles, kb0, kb1, panel);
    else if (p.bits == 8) dequantize_pairs<8>(p, t, tiles, kb0, kb1, panel);
    else dequantize_pairs<3>(p, t, tiles, kb0, kb1, panel);
  };
  gemm_bf16_panels_values(planes, y, p.m, p.n, p.k, fill);
}
}  // namespace comptrust::cpu::tiled

#endif  // COMPTRUST_X86
