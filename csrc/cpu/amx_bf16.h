// The AMX-BF16 tile-unit product the CPU kernels share for bf16 activations (gemm_tiled_cpu.cpp,
// sparse24_cpu.cpp), on CPUs where amx_bf16_usable() (isa.h). Each kernel supplies a panel: two of its tiles
// (16 output columns) expanded over all of k into the tile unit's pair layout, panel[kk / 2][16][2] bf16
// (row r of a B tile holds W[2r][c], W[2r + 1][c] for c = 0..15). Then for up to 64 rows at a time
// C[16 x 16] += A[16 x 32] . B[32 x 16] runs over k, one tdpbf16ps per 16 rows, 16 columns and 32 inputs.
// Weights are rounded to bf16 (as a bf16 dense model's are), sums kept in fp32, the output rounded once.
// Needs k % kAmxStep == 0. Every panel streams all rows of x through the tile loads, so very large batches
// are better served by expanding the weight for torch's GEMM (dense_blocks.h); the callers set the bound.
#pragma once
#include "isa.h"  // defines COMPTRUST_X86 on x86-64

#ifdef COMPTRUST_X86
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
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
COMPTRUST_AMX inline void store_pair_row(uint16_t* row, __m512 even, __m512 odd) {
  alignas(64) static constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                           8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i rounded = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(odd, even));  // [even 0..15, odd 0..15]
  _mm512_storeu_si512(row, _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), rounded));
}

// C += A . B for block C of a pass (A from rows 16*C.. of x; the short last block through tmm6).
#define COMPTRUST_AMX_STEP(C, TMM_A)                                  \
  do {                                                                \
    _tile_loadd(TMM_A, x + (C) * kAmxRows * k + kb, k * 2);           \
    _tile_dpbf16ps(C, TMM_A, COMPTRUST_TMM_B);                        \
  } while (0)
#define COMPTRUST_AMX_BLOCK(C)                                                                     \
  if constexpr (BLOCKS > (C)) {                                                                    \
    if constexpr (TAIL && BLOCKS == (C) + 1) COMPTRUST_AMX_STEP(C, COMPTRUST_TMM_A_TAIL);          \
    else COMPTRUST_AMX_STEP(C, COMPTRUST_TMM_A);                                                   \
  }

// c[rows][16] = x[rows, 0..k) @ panel for the pass's BLOCKS blocks of 16 rows (the last shorter if TAIL).
template <int BLOCKS, bool TAIL>
COMPTRUST_AMX void amx_pass(const at::BFloat16* x, int64_t k, const uint16_t* panel, float* c) {
  if constexpr (BLOCKS > 0) _tile_zero(0);
  if constexpr (BLOCKS > 1) _tile_zero(1);
  if constexpr (BLOCKS > 2) _tile_zero(2);
  if constexpr (BLOCKS > 3) _tile_zero(3);
  for (int64_t kb = 0; kb < k; kb += kAmxStep) {
    _tile_loadd(COMPTRUST_TMM_B, panel + kb / 2 * kAmxCols * 2, kAmxCols * 4);
    COMPTRUST_AMX_BLOCK(0)
    COMPTRUST_AMX_BLOCK(1)
    COMPTRUST_AMX_BLOCK(2)
    COMPTRUST_AMX_BLOCK(3)
  }
  constexpr int64_t block_floats = kAmxRows * kAmxCols, stride = kAmxCols * 4;
  if constexpr (BLOCKS > 0) _tile_stored(0, c, stride);
  if constexpr (BLOCKS > 1) _tile_stored(1, c + block_floats, stride);
  if constexpr (BLOCKS > 2) _tile_stored(2, c + 2 * block_floats, stride);
  if constexpr (BLOCKS > 3) _tile_stored(3, c + 3 * block_floats, stride);
}
#undef COMPTRUST_AMX_BLOCK
#undef COMPTRUST_AMX_STEP

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

COMPTRUST_AMX inline void amx_rows(const at::BFloat16* x, int64_t rows, int64_t k, const uint16_t* panel, float* c) {
  configure_pass(rows);
  const bool tail = rows % kAmxRows != 0;
  switch ((rows + kAmxRows - 1) / kAmxRows) {
    case 1: tail ? amx_pass<1, true>(x, k, panel, c) : amx_pass<1, false>(x, k, panel, c); break;
    case 2: tail ? amx_pass<2, true>(x, k, panel, c) : amx_pass<2, false>(x, k, panel, c); break;
    case 3: tail ? amx_pass<3, true>(x, k, panel, c) : amx_pass<3, false>(x, k, panel, c); break;
    default: tail ? amx_pass<4, true>(x, k, panel, c) : amx_pass<4, false>(x, k, panel, c); break;
  }
}

COMPTRUST_AMX inline void release_tiles() { _tile_release(); }

// y[r, 0..8*tiles) = c[r][...] rounded to bf16, for r < rows; y rows n apart.
COMPTRUST_AVX2 inline void store_rows_bf16(const float* c, int64_t rows, int tiles, at::BFloat16* y, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int u = 0; u < tiles; ++u) store8(y + r * n + u * kTileCols, _mm256_load_ps(c + r * kAmxCols + u * kTileCols));
}

// y[m, n] (bf16) = x[m, k] (bf16) @ W^T. fill_panel(t, tiles, panel) writes tiles t..t+tiles-1 (tiles is
// 1 or 2; a missing second tile's columns zero) as panel[k / 2][16][2] bf16 bits.
template <class FillPanel>
void gemm_amx_bf16(const at::BFloat16* x, at::BFloat16* y, int64_t m, int64_t n, int64_t k, FillPanel&& fill_panel) {
  const int64_t tiles = n / kTileCols, panels = (tiles + 1) / 2;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<uint16_t> panel;  // k * 16 bf16: 128 KB at k = 4096, kept for the next call
    if (static_cast<int64_t>(panel.size()) < k * kAmxCols) panel.resize(k * kAmxCols);
    alignas(64) float c[kAmxBlocks * kAmxRows * kAmxCols];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = 2 * i;
      const int count = static_cast<int>(std::min<int64_t>(2, tiles - t));
      fill_panel(t, count, panel.data());
      for (int64_t r0 = 0; r0 < m; r0 += kAmxBlocks * kAmxRows) {
        const int64_t rows = std::min<int64_t>(kAmxBlocks * kAmxRows, m - r0);
        amx_rows(x + r0 * k, rows, k, panel.data(), c);
        store_rows_bf16(c, rows, count, y + r0 * n + t * kTileCols, n);
      }
    }
    release_tiles();
  });
}

}  // namespace comptrust::cpu
#endif  // COMPTRUST_X86
