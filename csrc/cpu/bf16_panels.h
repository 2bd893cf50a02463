// y = x @ W^T for bf16 activations (and, on the tile unit, fp32 ones as three exact bf16 planes) over panels of
// the weight in the tile unit's bf16 pair layout (amx_bf16.h), on whichever engine this CPU has: the AMX tile
// unit (amx_bf16_usable), else AVX512-BF16's vdpbf16ps (bf16_dot.h; the callers check avx512_bf16_usable). The
// kernels (gemm_tiled_*.cpp, sparse24_*.cpp) supply the panels; this file decodes them chunk by chunk and
// runs the passes.
#pragma once
#include "amx_bf16.h"
#include "bf16_dot.h"

#ifdef COMPTRUST_X86
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

namespace comptrust::cpu {

// The per-thread loop over units of P panels (P * 16 columns): each unit's group parameters, its codes decoded
// chunk by chunk (up to 64 rows: double-buffered, a chunk decoded while the one before runs) or whole (more
// rows: decoded once, run once per pass of 64 rows), then pass(r0, rows, params, pass_sums, c, chunk) per pass,
// whose c[rows][P * 16] is stored to y. chunk(kb0, kb1, next0, next1) returns the P panels' B rows for kb0..kb1
// (a panel past the last tile: zeros, never stored). finish() runs once per thread at the end.
template <int P, class Out, class Fill, class FillParams, class Pass, class Finish>
void run_panel_units(Out* y, int64_t m, int64_t n, int64_t k, int64_t group_size, const float* x_group_sum,
                     Fill&& fill, FillParams&& fill_params, Pass&& pass, Finish&& finish) {
  const int64_t tiles = n / kTileCols, panels = (tiles + 1) / 2, units = (panels + P - 1) / P;
  const int64_t groups = (k + group_size - 1) / group_size;
  const bool one_pass = m <= kAmxBlocks * kAmxRows;
  constexpr int64_t ld = P * kAmxCols;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    // Per panel: the whole panel (k * 16 bf16: 128 KB at k = 4096) or two chunks; kept for the next call.
    // Both 64-byte aligned (align64).
    thread_local std::vector<uint16_t> codes;
    thread_local std::vector<float> params;  // per panel and group: 16 scales, then 16 zero * scale
    const int64_t code_size = (one_pass ? 2 * kCodeChunk : k) * kAmxCols, param_size = 2 * groups * kAmxCols;
    if (static_cast<int64_t>(codes.size()) < P * code_size + 32) codes.resize(P * code_size + 32);
    if (static_cast<int64_t>(params.size()) < P * param_size + 16) params.resize(P * param_size + 16);
    uint16_t* aligned_codes = align64(codes.data());
    float* aligned = align64(params.data());
    GroupParams group_params[P];
    alignas(64) float c[kAmxBlocks * kAmxRows * ld];
    for (int64_t u = begin; u < end; ++u) {
      int64_t t[P];
      int count[P];
      uint16_t* buffers[P][2];
      for (int p = 0; p < P; ++p) {
        t[p] = 2 * (u * P + p);
        count[p] = static_cast<int>(std::clamp<int64_t>(tiles - t[p], 0, 2));
        float* scale = aligned + p * param_size;
        group_params[p] = GroupParams{scale, scale + groups * kAmxCols};
        buffers[p][0] = aligned_codes + p * code_size;
        buffers[p][1] = buffers[p][0] + kCodeChunk * kAmxCols;
        if (count[p]) {
          fill_params(t[p], count[p], scale, scale + groups * kAmxCols);
          if (one_pass) fill(t[p], count[p], 0, std::min(k, std::min(group_size, kCodeChunk)), buffers[p][0]);
          else fill(t[p], count[p], 0, k, buffers[p][0]);
        } else {
          std::fill_n(scale, param_size, 0.f);
          std::fill_n(buffers[p][0], code_size, uint16_t{0});
        }
      }
      int current = 0;
      const auto chunk = [&](int64_t kb0, int64_t kb1, int64_t next0, int64_t next1) {
        std::array<const uint16_t*, P> rows{};
        for (int p = 0; p < P; ++p) {
          if (!one_pass) {
            rows[p] = buffers[p][0] + kb0 / 2 * kAmxCols * 2;
            continue;
          }
          if (next0 < next1 && count[p]) fill(t[p], count[p], next0, next1, buffers[p][current ^ 1]);
          rows[p] = buffers[p][current];
        }
        current ^= 1;
        return rows;
      };
      for (int64_t r0 = 0; r0 < m; r0 += kAmxBlocks * kAmxRows) {
        const int64_t rows = std::min<int64_t>(kAmxBlocks * kAmxRows, m - r0);
        pass(r0, rows, group_params, x_group_sum ? x_group_sum + r0 * groups : nullptr, c, chunk);
        for (int p = 0; p < P; ++p)
          if (count[p]) store_rows(c + p * kAmxCols, ld, rows, count[p], y + r0 * n + t[p] * kTileCols, n);
      }
    }
    finish();
  });
}

// y[m, n] = x[m, k] @ W^T on panels of two tiles (16 columns), for weights whose group size is a multiple of
// kAmxStep; Out is bf16 (bf16 x) or float (fp32 x split into planes). fill(t, tiles, kb0, kb1, b_rows) writes
// the B rows of tiles t..t+tiles-1 (tiles is 1 or 2) for inputs kb0..kb1 (multiples of kAmxStep) to
// b_rows[(kk - kb0) / 2][16][2]: codes, or weight values with group_size = k; with ROWS kSparse24 (2:4 weights,
// where the CPU has no tile unit: the caller checks amx_bf16_usable), sparse rows instead (bf16_dot.h).
// params(t, tiles, scale, zero_scale) writes the 16 columns' scale and zero * scale per group (a missing second
// tile's zero); zero_points false: every zero_scale is 0 (the sums of x are skipped).
// Chunks decoded while the engine runs the one before stay in L1 (two 8 KB buffers per panel): decoding a
// whole 128 KB panel first sends it to L2 and back (int4 at 16 rows on 4096x4096, AMX: 1.25x the speed of bf16
// F.linear that way and 1.85-2.07x in chunks).
template <PanelRows ROWS = PanelRows::kDense, class Out, class Fill, class FillParams>
void gemm_bf16_panels(const AmxActivations& x, Out* y, int64_t m, int64_t n, int64_t k, int64_t group_size,
                      bool zero_points, Fill&& fill, FillParams&& fill_params) {
  // Internal contracts:
  TORCH_CHECK(x.count == 1 || (x.count == 3 && (x.group_sums || !zero_points)),
              "gemm_bf16_panels: fp32 activations need their fp32 group sums");
  TORCH_CHECK(ROWS == PanelRows::kDense || !amx_bf16_usable(), "gemm_bf16_panels: the tile unit takes dense rows only");
  const int64_t groups = (k + group_size - 1) / group_size;
  std::vector<float> bf16_group_sums;
  const float* x_group_sum = zero_points ? x.group_sums : nullptr;
  if (zero_points && !x_group_sum) {
    bf16_group_sums.resize(m * groups);
    group_sums_bf16(x.planes, m, k, group_size, bf16_group_sums.data());
    x_group_sum = bf16_group_sums.data();
  }
  if (amx_bf16_usable()) {
    run_panel_units<1>(
        y, m, n, k, group_size, x_group_sum, fill, fill_params,
        [&](int64_t r0, int64_t rows, const GroupParams (&params)[1], const float* pass_sums, float* c, auto&& chunk) {
          const auto b_rows = [&](int64_t kb0, int64_t kb1, int64_t next0, int64_t next1) {
            return chunk(kb0, kb1, next0, next1)[0];
          };
          dispatch_pass(rows, [&](auto blocks, auto tail) {
            constexpr int kBlocks = decltype(blocks)::value;
            constexpr bool kTail = decltype(tail)::value;
            if (x.count == 3)
              amx_pass_grouped<kBlocks, kTail, 3>(x.planes + r0 * k, k, m * k, group_size, params[0], pass_sums, rows,
                                                  c, b_rows);
            else
              amx_pass_grouped<kBlocks, kTail, 1>(x.planes + r0 * k, k, m * k, group_size, params[0], pass_sums, rows,
                                                  c, b_rows);
          });
        },
        [] { release_tiles(); });
    return;
  }
  TORCH_CHECK(x.count == 1, "gemm_bf16_panels: fp32 activations (three planes) run on the tile unit only");
  const DotActivations dot_x = dot_activations<ROWS>(x.planes, m, k);
  run_panel_units<kDotPanels>(
      y, m, n, k, group_size, x_group_sum, fill, fill_params,
      [&](int64_t r0, int64_t rows, const GroupParams (&params)[kDotPanels], const float* pass_sums, float* c,
          auto&& chunk) { dot_pass_grouped<ROWS>(dot_x, r0, k, group_size, params, pass_sums, rows, c, chunk); },
      [] {});
}

// Panels of weight values (already scaled): fill(t, tiles, kb0, kb1, b_rows) as for gemm_bf16_panels.
template <PanelRows ROWS = PanelRows::kDense, class Out, class Fill>
void gemm_bf16_panels_values(const AmxActivations& x, Out* y, int64_t m, int64_t n, int64_t k, Fill&& fill) {
  gemm_bf16_panels<ROWS>(x, y, m, n, k, k, false, fill, [](int64_t, int, float* scale, float* zero_scale) {
    std::fill_n(scale, kAmxCols, 1.f);
    std::fill_n(zero_scale, kAmxCols, 0.f);
  });
}

}  // namespace comptrust::cpu
#endif  // COMPTRUST_X86
