// The bf16 panel product (amx_bf16.h's panels and pass contract) on AVX512-BF16's vdpbf16ps, for CPUs with no
// tile unit (avx512_bf16_usable: AMD Zen 4, Intel Cooper Lake). A B row of a panel (16 columns x 2 inputs, 64
// bytes) is exactly one zmm operand, and one vdpbf16ps adds a row's x pair times it into 16 fp32 sums: 32
// multiply-adds per instruction, against 16 per fp32 FMA. The products of bf16 values are exact and summed in
// fp32 as on the tile unit, so either engine meets the same accuracy bounds. bf16 activations only: fp32 ones as
// three exact bf16 planes (the tile unit's way) would cost 1.5x the fp32 FMA kernels' instructions here.
// Register block: kDotRows rows x kDotPanels panels (48 columns, 24 accumulators): each x pair, broadcast once,
// feeds every panel's B row, and each B row all the block's rows. Against one panel (16 columns) this took
// 4096 x 4096 int4 at 256 rows from 0.79x to 0.90x bf16 F.linear (two panels: 0.91x); 16 rows x one panel ran no
// faster than 8 x one.
// 2:4 panels may instead come as sparse rows (PanelRows::kSparse24), which skip the pruned zeros: per 2:4 group of
// 4 inputs, one row of the 16 columns' kept-value pairs (slot 0, slot 1) and one row of, per bf16 lane, the
// position of the input that value multiplies in its 32-input stretch of x (4 * (group % 8) + its 2-bit index).
// vpermw gathers each column's two inputs from a row's 32 x values, and one vdpbf16ps adds both products: one
// permute and one product per group where the dense rows take two products, half of them zeros. (Alone on one
// core, 24 interleaved vpermw + vdpbf16ps pairs ran 1.0-1.26 G/s against 1.33-1.41 G vdpbf16ps/s.) Both forms
// take two 64-byte rows per 4 inputs, so the panels' sizes and offsets are the same.
#pragma once
#include "amx_bf16.h"

#ifdef COMPTRUST_X86
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

#include "comptrust/sparse24_layout.h"

namespace comptrust::cpu {

constexpr int kDotRows = 8;
constexpr int kDotPanels = 3;

// The B rows a panel holds: dense (every input; either engine) or 2:4 sparse rows (vdpbf16ps only, see above).
enum class PanelRows { kDense, kSparse24 };

// Inputs per stretch of x that sparse rows' positions index (one zmm of bf16).
constexpr int64_t kDotTableInputs = 32;

// bf16 x's rows, made once per call, in blocks of kDotRows rows (rows past m zero). One block's layout:
//   dense rows: pairs[kk / 2][kDotRows] (int32: the bf16 pair kk, kk + 1), so one B row's broadcasts read one
//     cache line. (Read straight from x, whose rows are k * 2 bytes apart, 4096 x 4096 ran ~0.8x bf16 F.linear at
//     64 rows: at k = 4096 a block's rows all fall in one set of the L1.)
//   sparse rows: [kk / 32][kDotRows][32] bf16, each row's 32-input stretch one zmm for vpermw, a block's eight
//     of them in one 512-byte run for the same reason.
// Either way a block is k / 2 * kDotRows int32. The storage is the calling thread's, reused from call to call
// (a fresh allocation is faulted in again every time) and 64-byte aligned (align64).
struct DotActivations {
  int32_t* pairs = nullptr;
  int64_t blocks = 0, pairs_per_row = 0;

  const int32_t* block(int64_t b) const { return pairs + b * pairs_per_row * kDotRows; }
};

template <PanelRows ROWS>
DotActivations dot_activations(const at::BFloat16* x_rows, int64_t m, int64_t k) {
  thread_local std::vector<int32_t> storage;
  DotActivations x;
  x.blocks = (m + kDotRows - 1) / kDotRows;
  x.pairs_per_row = k / 2;
  const int64_t size = x.blocks * x.pairs_per_row * kDotRows;
  if (static_cast<int64_t>(storage.size()) < size + 16) storage.resize(size + 16);
  x.pairs = align64(storage.data());
  std::fill_n(x.pairs, size, 0);
  for (int64_t r = 0; r < m; ++r) {
    const auto* row = reinterpret_cast<const uint16_t*>(x_rows + r * k);
    int32_t* block = x.pairs + r / kDotRows * x.pairs_per_row * kDotRows;
    if constexpr (ROWS == PanelRows::kSparse24) {
      constexpr int64_t pairs_per_table = kDotTableInputs / 2;
      for (int64_t t = 0; t < k / kDotTableInputs; ++t)
        std::memcpy(block + (t * kDotRows + r % kDotRows) * pairs_per_table, row + t * kDotTableInputs,
                    kDotTableInputs * sizeof(uint16_t));
    } else {
      for (int64_t j = 0; j < x.pairs_per_row; ++j)
        block[j * kDotRows + r % kDotRows] =
            static_cast<int32_t>(row[2 * j] | static_cast<uint32_t>(row[2 * j + 1]) << 16);
    }
  }
  return x;
}

// Where a chunk ends its group, dot_rows adds the group's sums into the outputs in registers,
//   c[r] += scale_g * sum[r] - zero_g * scale_g * (x[r] summed over group g)
// (the formula amx_pass_grouped applies, amx_bf16.h), instead of storing them: at g128 that saves storing,
// zeroing and reloading every sum once per group (int4 at 64 rows: 1.00-1.07x -> 1.10-1.15x bf16 F.linear).
struct DotGroupEnd {
  std::array<const float*, kDotPanels> scale, zero_scale;  // group g's 16 columns, per panel
  const float* x_sums;   // the block's row 0 sum of x over group g, rows x_stride apart; nullptr: no zero points
  int64_t x_stride;
  float* c;              // the block's row 0 outputs, rows kDotPanels * 16 floats apart
};

// acc[p][r] += the first R rows of a block of x (DotActivations) . panel p's B rows over inputs kb0..kb1.
template <PanelRows ROWS, int R>
COMPTRUST_AVX512_BF16 inline void dot_products(const int32_t* x_block,
                                               const std::array<const uint16_t*, kDotPanels>& b_rows, int64_t kb0,
                                               int64_t kb1, __m512 (&acc)[kDotPanels][R]) {
  if constexpr (ROWS == PanelRows::kSparse24) {
    constexpr int64_t kGroupLanes = 2 * 2 * kAmxCols;  // a 2:4 group's two rows
    for (int64_t j = 0; j < (kb1 - kb0) / kSparse24Group; ++j) {
      __m512bh values[kDotPanels];
      __m512i positions[kDotPanels];
      COMPTRUST_UNROLL for (int p = 0; p < kDotPanels; ++p) {
        values[p] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b_rows[p] + j * kGroupLanes));
        positions[p] = _mm512_loadu_si512(b_rows[p] + j * kGroupLanes + 2 * kAmxCols);
      }
      const int64_t kk = kb0 + kSparse24Group * j;
      const int32_t* tables = x_block + kk / kDotTableInputs * kDotRows * (kDotTableInputs / 2);
      COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
        const __m512i table = _mm512_load_si512(tables + r * (kDotTableInputs / 2));
        COMPTRUST_UNROLL for (int p = 0; p < kDotPanels; ++p) {
          const __m512bh inputs = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(positions[p], table));
          acc[p][r] = _mm512_dpbf16_ps(acc[p][r], inputs, values[p]);
        }
      }
    }
  } else {
    for (int64_t j = 0; j < (kb1 - kb0) / 2; ++j) {
      __m512bh b[kDotPanels];
      COMPTRUST_UNROLL for (int p = 0; p < kDotPanels; ++p)
        b[p] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b_rows[p] + j * 2 * kAmxCols));
      const int32_t* x = x_block + (kb0 / 2 + j) * kDotRows;
      COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
        const __m512bh xr = reinterpret_cast<__m512bh>(_mm512_set1_epi32(x[r]));
        COMPTRUST_UNROLL for (int p = 0; p < kDotPanels; ++p) acc[p][r] = _mm512_dpbf16_ps(acc[p][r], xr, b[p]);
      }
    }
  }
}

// The sums over inputs kb0..kb1 of x . panel p's B rows, for the first R rows of a block of x,
// added to sums[r][p * 16 + c] (rows kDotPanels * 16 floats apart; first: the group's first chunk,
// start from zero instead), or, where end is given, into its outputs.
template <PanelRows ROWS, int R>
COMPTRUST_AVX512_BF16 inline void dot_rows(const int32_t* x_block,
                                           const std::array<const uint16_t*, kDotPanels>& b_rows, int64_t kb0,
                                           int64_t kb1, bool first, float* sums, const DotGroupEnd* end) {
  constexpr int64_t ld = kDotPanels * kAmxCols;
  __m512 acc[kDotPanels][R];
  COMPTRUST_UNROLL for (int p = 0; p < kDotPanels; ++p)
    COMPTRUST_UNROLL for (int r = 0; r < R; ++r)
      acc[p][r] = first ? _mm512_setzero_ps() : _mm512_load_ps(sums + r * ld + p * kAmxCols);
  dot_products<ROWS, R>(x_block, b_rows, kb0, kb1, acc);
  if (!end) {
    COMPTRUST_UNROLL for (int p = 0; p < kDotPanels; ++p)
      COMPTRUST_UNROLL for (int r = 0; r < R; ++r) _mm512_store_ps(sums + r * ld + p * kAmxCols, acc[p][r]);
    return;
  }
  COMPTRUST_UNROLL for (int p = 0; p < kDotPanels; ++p) {
    const __m512 scale = _mm512_load_ps(end->scale[p]), zero_scale = _mm512_load_ps(end->zero_scale[p]);
    COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
      float* out = end->c + r * ld + p * kAmxCols;
      const __m512 sum = _mm512_fmadd_ps(acc[p][r], scale, _mm512_load_ps(out));
      const float* x_sum = end->x_sums ? end->x_sums + r * end->x_stride : nullptr;
      _mm512_store_ps(out, x_sum ? _mm512_fnmadd_ps(zero_scale, _mm512_set1_ps(*x_sum), sum) : sum);
    }
  }
}

// dot_rows for the block's first `rows` (1..R) rows, R a compile-time bound.
template <PanelRows ROWS, int R = kDotRows>
COMPTRUST_AVX512_BF16 inline void dot_block(int64_t rows, const int32_t* x_block,
                                            const std::array<const uint16_t*, kDotPanels>& b_rows, int64_t kb0,
                                            int64_t kb1, bool first, float* sums, const DotGroupEnd* end) {
  if constexpr (R > 1)
    if (rows < R) return dot_block<ROWS, R - 1>(rows, x_block, b_rows, kb0, kb1, first, sums, end);
  dot_rows<ROWS, R>(x_block, b_rows, kb0, kb1, first, sums, end);
}

// amx_pass_grouped's contract for kDotPanels panels at once and the rows r0..r0 + rows of x (r0 a multiple of
// kDotRows, rows <= kAmxBlocks * kAmxRows): c[rows][kDotPanels * 16]; codes(kb0, kb1, next0, next1) gives each
// panel's B rows for the chunk. Each chunk runs past every block of rows; a group of several chunks keeps its
// sums in L1 between them.
template <PanelRows ROWS, class Codes>
COMPTRUST_AVX512_BF16 void dot_pass_grouped(const DotActivations& x, int64_t r0, int64_t k, int64_t group_size,
                                            const GroupParams (&params)[kDotPanels], const float* x_group_sum,
                                            int64_t rows, float* c, Codes&& codes) {
  constexpr int64_t ld = kDotPanels * kAmxCols;
  const int64_t groups = (k + group_size - 1) / group_size;
  alignas(64) float sums[kAmxBlocks * kAmxRows * ld];
  std::fill_n(c, rows * ld, 0.f);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t group_begin = g * group_size, group_end = std::min(k, (g + 1) * group_size);
    for (int64_t kb0 = group_begin; kb0 < group_end; kb0 += kCodeChunk) {
      const int64_t kb1 = std::min(group_end, kb0 + kCodeChunk);
      const auto [next0, next1] = next_chunk(kb1, k, group_size);
      const std::array<const uint16_t*, kDotPanels> b_rows = codes(kb0, kb1, next0, next1);
      for (int64_t rb = 0; rb < rows; rb += kDotRows) {
        DotGroupEnd end{{}, {}, x_group_sum ? x_group_sum + rb * groups + g : nullptr, groups, c + rb * ld};
        for (int p = 0; p < kDotPanels; ++p) {
          end.scale[p] = params[p].scale + g * kAmxCols;
          end.zero_scale[p] = params[p].zero_scale + g * kAmxCols;
        }
        dot_block<ROWS>(std::min<int64_t>(kDotRows, rows - rb), x.block((r0 + rb) / kDotRows), b_rows, kb0, kb1,
                  kb0 == group_begin, sums + rb * ld, kb1 == group_end ? &end : nullptr);
      }
    }
  }
}

}  // namespace comptrust::cpu
#endif  // COMPTRUST_X86
