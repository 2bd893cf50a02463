// The panel path of the tiled GEMM (gemm_tiled.h), float x from kPanelMinRows rows: tiles dequantized into an
// L1-resident fp32 panel, multiplied by a register-blocked microkernel (AVX2 6x16, AVX-512 6x32); and the AVX2
// dequantization of whole tiles for the BLAS path (dense_blocks.h).
#include "gemm_tiled.h"

#ifdef COMPTRUST_X86
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace comptrust::cpu::tiled {
namespace {

constexpr int kPanelRows = 6;

// ------------------------------------------------------------------------ AVX2 panel (float x)
// out[kk - kc][0..7], rows ld elements apart: dequantized weights (q - z) * s of input rows kc..kce (inside
// group g) of tile t. Same arithmetic as the reference dequantization (and as dequantize_tile_scalar).
template <int BITS, typename Out>
COMPTRUST_AVX2 void dequantize_tile(const Problem& p, int64_t t, int64_t g, int64_t kc, int64_t kce, Out* out,
                                    int64_t ld) {
  const int32_t* tw = p.tile_w(t);
  const __m256 scale = load_scales(p.tile_scales(t) + g * kTileCols);
  const __m256 zero = load_tile_zeros<BITS>(p.tile_zeros(t) + g * kTileCols);
  if constexpr (BITS == 8) {
    for (int64_t row = kc / 4; row < kce / 4; ++row) {
      const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tw + row * kTileCols));
      for (int b = 0; b < 4; ++b)
        store8(out + (row * 4 + b - kc) * ld, _mm256_mul_ps(_mm256_sub_ps(int8_codes(words, b), zero), scale));
    }
  } else if constexpr (BITS == 4) {
    for (int64_t row = kc / 8; row < kce / 8; ++row) {
      const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tw + row * kTileCols));
      for (int b = 0; b < 8; ++b)
        store8(out + (row * 8 + b - kc) * ld, _mm256_mul_ps(_mm256_sub_ps(int4_codes(words, b), zero), scale));
    }
  } else {
    for (int64_t block = kc / kInt3BlockRows; block < kce / kInt3BlockRows; ++block) {
      for (int half = 0; half < 2; ++half) {
        __m256i a, nibbles;
        load_int3_half(tw, p.k / kInt3BlockRows, block, half, a, nibbles);
        for (int j = 0; j < 16; ++j)
          store8(out + (block * kInt3BlockRows + half * 16 + j - kc) * ld,
                 _mm256_mul_ps(_mm256_sub_ps(int3_codes(a, nibbles, j), zero), scale));
      }
    }
  }
}

// A panel is TILES tiles wide: 2 (16 columns, two ymm per row) for the AVX2 microkernel, 4 (32 columns,
// two zmm per row) for the AVX-512 one. Either way 6 rows x 2 vectors = 12 accumulators, and each step
// loads 2 panel vectors and broadcasts 6 inputs for 12 fused multiply-adds. kPanelFloats keeps a panel at
// 16 KB, inside L1 next to the streamed rows of x.
constexpr int64_t kPanelFloats = 4096;
template <int TILES>
constexpr int64_t kPanelChunk = kPanelFloats / (TILES * kTileCols);  // input rows per panel: 256 or 128

// panel[kk - kc][TILES * 8]: tiles t..t+tiles-1 dequantized, the columns of missing tiles zero.
template <int BITS, int TILES>
COMPTRUST_AVX2 void dequantize_panel(const Problem& p, int64_t t, int tiles, int64_t g, int64_t kc, int64_t kce,
                                     float* panel) {
  constexpr int width = TILES * kTileCols;
  for (int u = 0; u < TILES; ++u) {
    float* col = panel + u * kTileCols;
    if (u < tiles) {
      dequantize_tile<BITS, float>(p, t + u, g, kc, kce, col, width);
    } else {
      for (int64_t kk = kc; kk < kce; ++kk) _mm256_storeu_ps(col + (kk - kc) * width, _mm256_setzero_ps());
    }
  }
}

// y[R rows, 16 columns] (+)= x[R rows, kb..ke] @ panel, panel[kk - kb][16]; x rows ldx apart, y rows ldy.
template <int R>
COMPTRUST_AVX2 void panel_rows_avx2(const float* x, int64_t ldx, const float* panel, int64_t kb, int64_t ke, float* y,
                                    int64_t ldy, bool first) {
  __m256 c0[R], c1[R];
  COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
    c0[r] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + r * ldy);
    c1[r] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + r * ldy + kTileCols);
  }
  for (int64_t kk = kb; kk < ke; ++kk) {
    const __m256 b0 = _mm256_loadu_ps(panel + (kk - kb) * 16);
    const __m256 b1 = _mm256_loadu_ps(panel + (kk - kb) * 16 + kTileCols);
    COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + kk);
      c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
    }
  }
  COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + r * ldy, c0[r]);
    _mm256_storeu_ps(y + r * ldy + kTileCols, c1[r]);
  }
}

// The same over a 32-column panel, panel[kk - kb][32].
template <int R>
COMPTRUST_AVX512 void panel_rows_avx512(const float* x, int64_t ldx, const float* panel, int64_t kb, int64_t ke,
                                        float* y, int64_t ldy, bool first) {
  __m512 c0[R], c1[R];
  COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
    c0[r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(y + r * ldy);
    c1[r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(y + r * ldy + 16);
  }
  for (int64_t kk = kb; kk < ke; ++kk) {
    const __m512 b0 = _mm512_loadu_ps(panel + (kk - kb) * 32);
    const __m512 b1 = _mm512_loadu_ps(panel + (kk - kb) * 32 + 16);
    COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * ldx + kk]);
      c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
    }
  }
  COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(y + r * ldy, c0[r]);
    _mm512_storeu_ps(y + r * ldy + 16, c1[r]);
  }
}

template <int TILES, int R>
inline void panel_rows(const float* x, int64_t ldx, const float* panel, int64_t kb, int64_t ke, float* y, int64_t ldy,
                       bool first) {
  if constexpr (TILES == 2) panel_rows_avx2<R>(x, ldx, panel, kb, ke, y, ldy, first);
  else panel_rows_avx512<R>(x, ldx, panel, kb, ke, y, ldy, first);
}

// Every row of x[m, k] times a panel of input rows kc..kce of `tiles` (1..TILES) output tiles: y points at
// the tiles' first column in row 0 of y[m, n]. first: overwrite y rather than accumulate. With fewer tiles
// than the panel holds, the microkernel writes a full-width scratch block (spill, kPanelRows x width) and
// the real columns are copied out, so it never branches on the width.
template <int TILES>
void panel_multiply(const float* x, int64_t m, int64_t k, const float* panel, int64_t kc, int64_t kce, float* y,
                    int64_t n, int tiles, float* spill, bool first) {
  constexpr int width = TILES * kTileCols;
  for (int64_t i0 = 0; i0 < m; i0 += kPanelRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kPanelRows, m - i0));
    const float* xr = x + i0 * k;
    float* yr = y + i0 * n;
    int64_t ldy = n;
    const bool partial = tiles < TILES;
    if (partial) {
      ldy = width;
      yr = spill;
      if (!first)
        for (int r = 0; r < rows; ++r) std::copy_n(y + (i0 + r) * n, tiles * kTileCols, spill + r * width);
    }
    switch (rows) {
      case 6: panel_rows<TILES, 6>(xr, k, panel, kc, kce, yr, ldy, first); break;
      case 5: panel_rows<TILES, 5>(xr, k, panel, kc, kce, yr, ldy, first); break;
      case 4: panel_rows<TILES, 4>(xr, k, panel, kc, kce, yr, ldy, first); break;
      case 3: panel_rows<TILES, 3>(xr, k, panel, kc, kce, yr, ldy, first); break;
      case 2: panel_rows<TILES, 2>(xr, k, panel, kc, kce, yr, ldy, first); break;
      default: panel_rows<TILES, 1>(xr, k, panel, kc, kce, yr, ldy, first); break;
    }
    if (partial)
      for (int r = 0; r < rows; ++r) std::copy_n(spill + r * width, tiles * kTileCols, y + (i0 + r) * n);
  }
}

// Tiles t..t+tiles-1 (tiles <= TILES) for every row.
template <int BITS, int TILES>
void panel_run(const Problem& p, int64_t t, int tiles, float* panel, float* spill) {
  for (int64_t g = 0; g < p.groups; ++g) {
    for (int64_t kc = g * p.group_size; kc < p.group_end(g); kc += kPanelChunk<TILES>) {
      const int64_t kce = std::min(p.group_end(g), kc + kPanelChunk<TILES>);
      const bool first = kc == 0;
      dequantize_panel<BITS, TILES>(p, t, tiles, g, kc, kce, panel);
      panel_multiply<TILES>(p.x, p.m, p.k, panel, kc, kce, p.y + t * kTileCols, p.n, tiles, spill, first);
    }
  }
}

// Every tile through panels of TILES tiles, the panels split among threads.
template <int TILES>
void panel_all_tiles(const Problem& p) {
  const int64_t tiles = p.n / kTileCols, panels = (tiles + TILES - 1) / TILES;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(kPanelFloats + 16), spill(kPanelRows * TILES * kTileCols);
    float* panel = align64(buffer.data());  // the microkernel's 64-byte panel rows each in one cache line
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i * TILES;
      const int count = static_cast<int>(std::min<int64_t>(TILES, tiles - t));
      if (p.bits == 4) panel_run<4, TILES>(p, t, count, panel, spill.data());
      else if (p.bits == 8) panel_run<8, TILES>(p, t, count, panel, spill.data());
      else panel_run<3, TILES>(p, t, count, panel, spill.data());
    }
  });
}

// Tile t's weights, every group, out[kk][0..7] rows ld apart.
template <typename Out>
void dequantize_groups(const Problem& p, int64_t t, Out* out, int64_t ld) {
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t kb = g * p.group_size, ke = p.group_end(g);
    if (p.bits == 4) dequantize_tile<4>(p, t, g, kb, ke, out + kb * ld, ld);
    else if (p.bits == 8) dequantize_tile<8>(p, t, g, kb, ke, out + kb * ld, ld);
    else dequantize_tile<3>(p, t, g, kb, ke, out + kb * ld, ld);
  }
}

}  // namespace

void panel_all(const Problem& p, Isa isa) { isa == Isa::kAvx512 ? panel_all_tiles<4>(p) : panel_all_tiles<2>(p); }

void dequantize_tile_avx2(const Problem& p, int64_t t, float* out, int64_t ld) { dequantize_groups(p, t, out, ld); }

void dequantize_tile_avx2(const Problem& p, int64_t t, at::BFloat16* out, int64_t ld) {
  dequantize_groups(p, t, out, ld);
}
}  // namespace comptrust::cpu::tiled

#endif  // COMPTRUST_X86
