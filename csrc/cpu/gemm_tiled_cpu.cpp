// CPU int4/int3/int8 x float GEMM/GEMV over the tiled layout (csrc/include/comptrust/cpu_tiles.h).
//
// Five paths, picked by batch size, activation precision and CPU:
//   * direct (batch < kPanelMinRows, float activations): codes are decoded in registers and feed up to
//     kRowBlock rows at once. Per group we accumulate sum_k x*q and apply zero and scale once:
//       sum_k x*(q - z)*s = s * (sum_k x*q - z * sum_k x),   sum_k x precomputed per (row, group).
//     Batch 1 is memory-bound, so this is the path that must run at DRAM speed. One fp32 row on int4 and int3
//     layers (TiledGemv, also the decode program's bound product) reads each thread's tiles as one stream with x
//     as int8 limbs on VNNI where k <= 4096 and k and the group size fit (stream_vnni_avx512,
//     stream_int3_vnni_avx512).
//   * panel (kPanelMinRows <= batch < kBlasMinRows, float activations): two tiles (four with AVX-512) are
//     dequantized once into an L1-resident fp32 panel, then a 6x16 (6x32) register-blocked microkernel runs
//     every row over it (the decode cost is paid once per weight instead of once per row block).
//   * dequantize + BLAS (batch >= kBlasMinRows, kBlasMinRowsAvx512 with AVX-512; float activations):
//     blocks of tiles dequantized into a scratch and multiplied by torch's GEMM (dense_blocks.h).
//   * AMX-BF16 (bf16 activations, kPanelMinRows <= batch < kAmxMaxRows, where the CPU has AMX): two tiles'
//     codes (or, for int8 and groups that split a 32-input step, dequantized weights) as a bf16 panel in the
//     tile unit's pair layout, multiplied with tdpbf16ps; codes are scaled per group in fp32. Without AMX but
//     with AVX512-BF16 (Zen 4), bf16 activations from kPanelMinRows to kDotMaxRows rows (kAmxMaxRows on large
//     layers) run the same panels on vdpbf16ps (bf16_dot.h). fp32
//     activations take it too for panels of codes (kPanelMinRows <= batch < kBlasMinRowsAvx512), x split into
//     three bf16 planes whose sum is exactly x (run_amx_fp32), in place of the panel path.
//   * a8 (int8 activations, any batch; int4/int3 weights): x is quantized per row and per block of 32
//     inputs, the codes are unpacked into u8 lanes and multiplied with vpdpbusd where the CPU has AVX-512
//     VNNI (64 u8 x s8 products per instruction), else vpmaddubsw/vpmaddwd (16 per pair), the integer
//     block sums scaled once per block. With VNNI, fp32 x runs there too where that is faster (limbs_for:
//     batch 1, and up to 255 rows on larger layers), as three int8 limbs per block that hold x to 2^-23 of the
//     block's largest input (quantize_limbs): fp32 accuracy, in place of the direct and panel kernels.
// Each kernel has an AVX2 path and a portable scalar one (the BLAS path a scalar dequantization); direct,
// a8 and the panel also an AVX-512 one (isa.h picks). The AVX-512 int4/int3 direct and a8 kernels take two
// neighbouring tiles per register (16 output columns for the same inputs).
// int8 weights (w8, for accuracy rather than size) have no a8 path: u8 codes up to 255 times s8
// activations would saturate vpmaddubsw's int16 pairs.
// Work split: tiles (8 output columns) are the tasks of at::parallel_for, so each thread streams a
// contiguous stretch of the weight; at batch 1 on large layers the a8 kernels run four tile pairs at once
// (eight weight streams per thread: more of the memory bandwidth), on more rows two (pairs_per_unit).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "bf16_panels.h"
#include "bound_gemv.h"
#include "comptrust/cpu_tiles.h"
#include "dense_blocks.h"
#include "int8_limbs.h"
#include "simd_common.h"
#include "isa.h"


namespace comptrust::cpu {
namespace {

constexpr int64_t kPanelMinRows = 8;
constexpr int kPanelRows = 6;

// int4: k/8 words per column; int3: 3 words per 32 rows; int8: k/4.
inline int64_t words_per_column(int bits, int64_t k) {
  return bits == 4 ? k / 8 : bits == 8 ? k / 4 : k / kInt3BlockRows * 3;
}

struct Problem {
  int bits;
  const float* x;             // [m, k] fp32 (float activations)
  const int8_t* x8;           // [m * limbs, k] int8 in the layout's lane order (a8 and limbs; quantize_rows)
  const float* x_block_scale; // [m * limbs, groups * blocks_per_group] (a8 and limbs)
  const float* x_group_sum;   // [m, groups]: sum of x (or of dequantized x8) over each group
  const int32_t* w;
  const uint8_t* zeros;
  const at::Half* scales;
  float* y;  // [m, n]
  int64_t m, n, k, group_size, groups, blocks_per_group;
  int limbs = 1;  // kLimbs: fp32 x as int8 limbs (int8_limbs.h, a8_avx512), else 1

  const int32_t* tile_w(int64_t t) const { return w + t * words_per_column(bits, k) * kTileCols; }
  const uint8_t* tile_zeros(int64_t t) const { return zeros + t * groups * kTileCols; }
  const at::Half* tile_scales(int64_t t) const { return scales + t * groups * kTileCols; }
  int64_t group_end(int64_t g) const { return std::min(k, (g + 1) * group_size); }
};

// ------------------------------------------------------------------------------------------- scalar
// code of input row kk in column c of tile t (cpu_tiles.h)
inline int code_at(const Problem& p, int64_t t, int64_t kk, int c) {
  const int32_t* tw = p.tile_w(t);
  if (p.bits == 4) {
    const uint32_t word = static_cast<uint32_t>(tw[(kk / 8) * kTileCols + c]);
    return static_cast<int>((word >> (4 * (kk % 8))) & 0xF);
  }
  if (p.bits == 8) {
    const uint32_t word = static_cast<uint32_t>(tw[(kk / 4) * kTileCols + c]);
    return static_cast<int>((word >> (8 * (kk % 4))) & 0xFF);
  }
  const int64_t block = kk / kInt3BlockRows, row = kk % kInt3BlockRows;
  const int plane = static_cast<int>(row / 16), j = static_cast<int>(row % 16);
  const int32_t* bw = tw + block * kInt3BlockPlanes * kTileCols;
  const uint32_t low = static_cast<uint32_t>(bw[plane * kTileCols + c]);
  const uint32_t high = static_cast<uint32_t>(bw[2 * kTileCols + c]);
  const int high_bit = 8 * (j / 4) + 4 * plane + j % 4;
  return static_cast<int>(((low >> (2 * j)) & 3) | (((high >> high_bit) & 1) << 2));
}

// Position of input kk inside its 8 (int4) or 32 (int3) row unit in the a8 lane order.
inline int64_t a8_lane_position(int bits, int64_t kk) {
  if (bits == 4) {
    const int64_t base = kk - kk % 8, r = kk % 8;  // even rows 0,2,4,6 then odd rows 1,3,5,7
    return base + (r % 2) * 4 + r / 2;
  }
  const int64_t base = kk - kk % kInt3BlockRows, r = kk % kInt3BlockRows;  // row 16p + 4q + i -> 16p + 4i + q
  const int64_t plane = r / 16, q = (r % 16) / 4, i = r % 4;
  return base + plane * 16 + i * 4 + q;
}

// ... and inside its 16 (int4) or 32 (int3) row unit in the one-stream kernels' lane order (stream_vnni_avx512,
// stream_int3_vnni_avx512). int4: inputs 16v..16v+15 as {0,2,4,6}, {8,10,12,14}, {1,3,5,7}, {9,11,13,15}; int3:
// bytes [8i, 8i + 8) of a block are x[16p + 4q + i] at 8i + 4p + q.
inline int64_t stream_lane_position(int bits, int64_t kk) {
  if (bits == 4) {
    const int64_t base = kk - kk % 16, r = kk % 16, half = r / 8, i = r % 8;
    return base + (i % 2) * 8 + half * 4 + i / 2;
  }
  const int64_t base = kk - kk % kInt3BlockRows, r = kk % kInt3BlockRows;
  const int64_t plane = r / 16, q = (r % 16) / 4, i = r % 4;
  return base + i * 8 + plane * 4 + q;
}

// Where a kernel family wants x's int8 codes (quantize_rows): the two-tile kernels' order or the one-stream one.
enum class Lanes { kTwoTile, kOneStream };

inline int64_t lane_position(Lanes lanes, int bits, int64_t kk) {
  return lanes == Lanes::kOneStream ? stream_lane_position(bits, kk) : a8_lane_position(bits, kk);
}

void tile_scalar(const Problem& p, int64_t t, bool a8) {
  const uint8_t* tz = p.tile_zeros(t);
  const at::Half* ts = p.tile_scales(t);
  for (int64_t i = 0; i < p.m; ++i) {
    for (int c = 0; c < kTileCols; ++c) {
      float out = 0.f;
      for (int64_t g = 0; g < p.groups; ++g) {
        const int64_t kb = g * p.group_size, ke = p.group_end(g);
        float acc = 0.f;
        if (a8) {
          for (int64_t b = 0; b * kActBlock < ke - kb; ++b) {
            int32_t dot = 0;
            for (int64_t kk = kb + b * kActBlock; kk < std::min(ke, kb + (b + 1) * kActBlock); ++kk)
              dot += p.x8[i * p.k + a8_lane_position(p.bits, kk)] * code_at(p, t, kk, c);
            acc += p.x_block_scale[(i * p.groups + g) * p.blocks_per_group + b] * static_cast<float>(dot);
          }
        } else if (p.bits == 8) {  // zero subtracted per code (see direct_avx2)
          const float zero = static_cast<float>(tz[g * kTileCols + c] + kInt8ZeroOffset);
          for (int64_t kk = kb; kk < ke; ++kk)
            acc += p.x[i * p.k + kk] * (static_cast<float>(code_at(p, t, kk, c)) - zero);
          out += static_cast<float>(ts[g * kTileCols + c]) * acc;
          continue;
        } else {
          for (int64_t kk = kb; kk < ke; ++kk) acc += p.x[i * p.k + kk] * static_cast<float>(code_at(p, t, kk, c));
        }
        const float zero = tz[g * kTileCols + c];
        const float scale = static_cast<float>(ts[g * kTileCols + c]);
        out += scale * (acc - zero * p.x_group_sum[i * p.groups + g]);
      }
      p.y[i * p.n + t * kTileCols + c] = out;
    }
  }
}

// out[kk - kc][0..7], rows ld elements apart: tile t's weights (q - z) * s of input rows kc..kce of group g.
template <typename Out>
void dequantize_tile_scalar(const Problem& p, int64_t t, int64_t g, int64_t kc, int64_t kce, Out* out, int64_t ld) {
  const uint8_t* tz = p.tile_zeros(t);
  const at::Half* ts = p.tile_scales(t);
  for (int c = 0; c < kTileCols; ++c) {
    const float zero = static_cast<float>(tz[g * kTileCols + c] + (p.bits == 8 ? kInt8ZeroOffset : 0));
    const float scale = static_cast<float>(ts[g * kTileCols + c]);
    for (int64_t kk = kc; kk < kce; ++kk)
      out[(kk - kc) * ld + c] = static_cast<Out>((static_cast<float>(code_at(p, t, kk, c)) - zero) * scale);
  }
}

#ifdef COMPTRUST_X86
// Codes of row b (0..3 within the word) of the 8 columns of an int8 word row, as floats.
COMPTRUST_AVX2 inline __m256 int8_codes(__m256i words, int b) {
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(words, 8 * b), _mm256_set1_epi32(0xFF)));
}

template <int BITS>
COMPTRUST_AVX2 inline __m256 load_tile_zeros(const uint8_t* z) {
  const __m256 zeros = load_zeros(z);
  return BITS == 8 ? _mm256_add_ps(zeros, _mm256_set1_ps(kInt8ZeroOffset)) : zeros;
}

// Codes of row 16*plane + j of an int3 block (low plane word, high plane word), as floats.
COMPTRUST_AVX2 inline __m256 int3_codes(__m256i low, __m256i high, int plane, int j) {
  const int high_bit = 8 * (j / 4) + 4 * plane + j % 4;
  const __m256i lo = _mm256_and_si256(_mm256_srli_epi32(low, 2 * j), _mm256_set1_epi32(3));
  const __m256i hi_at_2 = high_bit >= 2 ? _mm256_srli_epi32(high, high_bit - 2) : _mm256_slli_epi32(high, 2 - high_bit);
  return _mm256_cvtepi32_ps(_mm256_or_si256(lo, _mm256_and_si256(hi_at_2, _mm256_set1_epi32(4))));
}

// ----------------------------------------------------------------------- AVX2 direct (float x)
// Independent accumulator chains per row: a fused multiply-add waits ~4 cycles for its predecessor, so
// with one row and one chain the loop would run at a quarter of the FMA units' rate.
template <int R>
constexpr int kChains = R == 1 ? 8 : R == 2 ? 4 : 2;

template <int BITS, int R>
COMPTRUST_AVX2 void direct_avx2(const Problem& p, int64_t t, int64_t i0) {
  constexpr int A = kChains<R>;
  const int32_t* tw = p.tile_w(t);
  const float* x = p.x + i0 * p.k;
  __m256 out[R];
  COMPTRUST_UNROLL for (int r = 0; r < R; ++r) out[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t kb = g * p.group_size, ke = p.group_end(g);
    const __m256 zero = load_tile_zeros<BITS>(p.tile_zeros(t) + g * kTileCols);
    __m256 acc[R][A];
    COMPTRUST_UNROLL for (int r = 0; r < R; ++r)
      COMPTRUST_UNROLL for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
    if constexpr (BITS == 4) {
      for (int64_t row = kb / 8; row < ke / 8; ++row) {
        prefetch_ahead(tw + row * kTileCols);
        const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tw + row * kTileCols));
        COMPTRUST_UNROLL for (int b = 0; b < 8; ++b) {
          const __m256 q = int4_codes(words, b);
          COMPTRUST_UNROLL for (int r = 0; r < R; ++r)
            acc[r][b % A] = _mm256_fmadd_ps(q, _mm256_broadcast_ss(x + r * p.k + row * 8 + b), acc[r][b % A]);
        }
      }
    } else if constexpr (BITS == 8) {
      // int8 subtracts the zero point from each code rather than using the group sum of x: with codes and
      // zeros up to 256, s * (sum x*q - z * sum x) would cancel away ~8 bits of the precision int8 is for.
      // Two word rows (8 inputs) per step where the group allows, so one row still fills up to 8 chains.
      int64_t row = kb / 4;
      for (; row + 2 <= ke / 4; row += 2) {
        prefetch_ahead(tw + row * kTileCols);
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tw + row * kTileCols));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tw + (row + 1) * kTileCols));
        COMPTRUST_UNROLL for (int b = 0; b < 8; ++b) {
          const __m256 q = _mm256_sub_ps(int8_codes(b < 4 ? w0 : w1, b % 4), zero);
          COMPTRUST_UNROLL for (int r = 0; r < R; ++r)
            acc[r][b % A] = _mm256_fmadd_ps(q, _mm256_broadcast_ss(x + r * p.k + row * 4 + b), acc[r][b % A]);
        }
      }
      if (row < ke / 4) {  // a group of 4 (mod 8) inputs: its last word row alone
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tw + row * kTileCols));
        COMPTRUST_UNROLL for (int b = 0; b < 4; ++b) {
          const __m256 q = _mm256_sub_ps(int8_codes(w0, b), zero);
          COMPTRUST_UNROLL for (int r = 0; r < R; ++r)
            acc[r][b % A] = _mm256_fmadd_ps(q, _mm256_broadcast_ss(x + r * p.k + row * 4 + b), acc[r][b % A]);
        }
      }
    } else {
      for (int64_t block = kb / kInt3BlockRows; block < ke / kInt3BlockRows; ++block) {
        const int32_t* bw = tw + block * kInt3BlockPlanes * kTileCols;
        prefetch_ahead(bw);
        prefetch_ahead(bw + 16);
        const __m256i high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bw + 2 * kTileCols));
        COMPTRUST_UNROLL for (int plane = 0; plane < 2; ++plane) {
          const __m256i low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bw + plane * kTileCols));
          const float* xb = x + block * kInt3BlockRows + plane * 16;
          _Pragma("GCC unroll 16") for (int j = 0; j < 16; ++j) {
            const __m256 q = int3_codes(low, high, plane, j);
            COMPTRUST_UNROLL for (int r = 0; r < R; ++r)
              acc[r][j % A] = _mm256_fmadd_ps(q, _mm256_broadcast_ss(xb + r * p.k + j), acc[r][j % A]);
          }
        }
      }
    }
    const __m256 scale = load_scales(p.tile_scales(t) + g * kTileCols);
    COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
      __m256 sum = acc[r][0];
      COMPTRUST_UNROLL for (int a = 1; a < A; ++a) sum = _mm256_add_ps(sum, acc[r][a]);
      if constexpr (BITS == 8) {
        out[r] = _mm256_fmadd_ps(scale, sum, out[r]);  // the zero point is already subtracted
      } else {
        const __m256 xsum = _mm256_set1_ps(p.x_group_sum[(i0 + r) * p.groups + g]);
        out[r] = _mm256_fmadd_ps(scale, _mm256_fnmadd_ps(zero, xsum, sum), out[r]);
      }
    }
  }
  COMPTRUST_UNROLL for (int r = 0; r < R; ++r) _mm256_storeu_ps(p.y + (i0 + r) * p.n + t * kTileCols, out[r]);
}

// -------------------------------------------------------------------------- AVX2 a8 (int8 x)
// Products of u8 codes and s8 activations (|x| <= 127) are summed in int16 lanes over a whole block of 32
// inputs, then widened once with vpmaddwd: a lane sums 8 vpmaddubsw pairs at most, 8 * 2 * 15 * 127 = 30480
// for int4 (8 * 2 * 7 * 127 = 14224 for int3), below 2^15, so nothing saturates.
COMPTRUST_AVX2 inline __m256i broadcast4(const int8_t* lanes) {
  int32_t v;
  std::memcpy(&v, lanes, sizeof v);
  return _mm256_set1_epi32(v);
}

// table[i][v] = 4 * (bit i of v & 15): 16 entries, repeated for each 128-bit lane of vpshufb.
struct HighBitTables {
  alignas(32) int8_t table[4][32];
};
constexpr HighBitTables make_high_bit_tables() {
  HighBitTables tables{};
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < 32; ++v) tables.table[i][v] = static_cast<int8_t>((((v & 15) >> i) & 1) * 4);
  return tables;
}
constexpr HighBitTables kHighBitTimes4 = make_high_bit_tables();

template <int BITS, int R>
COMPTRUST_AVX2 void a8_avx2(const Problem& p, int64_t t, int64_t i0) {
  const int32_t* tw = p.tile_w(t);
  const __m256i ones16 = _mm256_set1_epi16(1);
  const __m256i nibbles = _mm256_set1_epi8(0x0F);
  __m256 out[R];
  COMPTRUST_UNROLL for (int r = 0; r < R; ++r) out[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t kb = g * p.group_size, ke = p.group_end(g);
    __m256 acc[R];
    COMPTRUST_UNROLL for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0, bk = kb; bk < ke; ++b, bk += kActBlock) {
      const int64_t bend = std::min(ke, bk + kActBlock);
      __m256i pairs[R];  // int16 partial sums of the block (bounds: see above)
      COMPTRUST_UNROLL for (int r = 0; r < R; ++r) pairs[r] = _mm256_setzero_si256();
      if constexpr (BITS == 4) {
        for (int64_t row = bk / 8; row < bend / 8; ++row) {
          prefetch_ahead(tw + row * kTileCols);
          const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tw + row * kTileCols));
          const __m256i even = _mm256_and_si256(words, nibbles);
          const __m256i odd = _mm256_and_si256(_mm256_srli_epi16(words, 4), nibbles);
          COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
            const int8_t* xr = p.x8 + (i0 + r) * p.k + row * 8;
            pairs[r] = _mm256_add_epi16(pairs[r], _mm256_add_epi16(_mm256_maddubs_epi16(even, broadcast4(xr)),
                                                                   _mm256_maddubs_epi16(odd, broadcast4(xr + 4))));
          }
        }
      } else {
        const int32_t* bw = tw + (bk / kInt3BlockRows) * kInt3BlockPlanes * kTileCols;
        prefetch_ahead(bw);
        prefetch_ahead(bw + 16);
        const __m256i high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bw + 2 * kTileCols));
        COMPTRUST_UNROLL for (int plane = 0; plane < 2; ++plane) {
          const __m256i low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bw + plane * kTileCols));
          // Byte q of the high plane holds this plane's 4 high bits in nibble `plane` (bit i: row 4q + i).
          const __m256i high_nibbles = _mm256_and_si256(plane ? _mm256_srli_epi16(high, 4) : high, nibbles);
          COMPTRUST_UNROLL for (int i = 0; i < 4; ++i) {
            const __m256i lo = _mm256_and_si256(i ? _mm256_srli_epi16(low, 2 * i) : low, _mm256_set1_epi8(3));
            // vpshufb with a 16-entry byte table: "bit i of the nibble, times 4" in one instruction.
            const __m256i bit_i_times_4 = _mm256_load_si256(reinterpret_cast<const __m256i*>(kHighBitTimes4.table[i]));
            const __m256i codes = _mm256_or_si256(lo, _mm256_shuffle_epi8(bit_i_times_4, high_nibbles));
            COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
              const int8_t* xr = p.x8 + (i0 + r) * p.k + bk + plane * 16 + i * 4;
              pairs[r] = _mm256_add_epi16(pairs[r], _mm256_maddubs_epi16(codes, broadcast4(xr)));
            }
          }
        }
      }
      __m256i dot[R];
      COMPTRUST_UNROLL for (int r = 0; r < R; ++r) dot[r] = _mm256_madd_epi16(pairs[r], ones16);
      COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
        const __m256 sx = _mm256_set1_ps(p.x_block_scale[((i0 + r) * p.groups + g) * p.blocks_per_group + b]);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), sx, acc[r]);
      }
    }
    const __m256 zero = load_zeros(p.tile_zeros(t) + g * kTileCols);
    const __m256 scale = load_scales(p.tile_scales(t) + g * kTileCols);
    COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
      const __m256 xsum = _mm256_set1_ps(p.x_group_sum[(i0 + r) * p.groups + g]);
      out[r] = _mm256_fmadd_ps(scale, _mm256_fnmadd_ps(zero, xsum, acc[r]), out[r]);
    }
  }
  COMPTRUST_UNROLL for (int r = 0; r < R; ++r) _mm256_storeu_ps(p.y + (i0 + r) * p.n + t * kTileCols, out[r]);
}

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
//   int3: 2-bit fields i of each byte are one plane's rows 4q + i; the high bits come from a vpshufb table
//         as in a8_avx2, merged with one vpternlogd.
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
    for (int64_t b = 0, bk = kb; bk < ke; ++b, bk += kActBlock) {
      const int64_t bend = std::min(ke, bk + kActBlock);
      // Two accumulator chains per pair and row (int4: even and odd inputs; int3: the two planes): vpdpbusd
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
        const int64_t offset = (bk / kInt3BlockRows) * kInt3BlockPlanes * kTileCols;
        __m512i high[P];
        COMPTRUST_UNROLL for (int q = 0; q < P; ++q) {
          tiles[q].prefetch(offset, 2);  // a block is 96 bytes
          high[q] = tiles[q].words(offset + 2 * kTileCols);
        }
        COMPTRUST_UNROLL for (int plane = 0; plane < 2; ++plane) {
          __m512i low[P], high_nibbles[P];
          COMPTRUST_UNROLL for (int q = 0; q < P; ++q) {
            low[q] = tiles[q].words(offset + plane * kTileCols);
            high_nibbles[q] = _mm512_and_si512(plane ? _mm512_srli_epi16(high[q], 4) : high[q], nibbles);
          }
          COMPTRUST_UNROLL for (int i = 0; i < 4; ++i) {
            const __m512i bit_i_times_4 = _mm512_broadcast_i64x4(
                _mm256_load_si256(reinterpret_cast<const __m256i*>(kHighBitTimes4.table[i])));
            __m512i codes[P];
            // (low >> 2i) & 3 | table bits: vpternlogd truth table of A & B | C is 0xEA (A, B, C = 0xF0, 0xCC, 0xAA).
            COMPTRUST_UNROLL for (int q = 0; q < P; ++q)
              codes[q] = _mm512_ternarylogic_epi32(i ? _mm512_srli_epi16(low[q], 2 * i) : low[q], _mm512_set1_epi8(3),
                                                   _mm512_shuffle_epi8(bit_i_times_4, high_nibbles[q]), 0xEA);
            // Each row's broadcast inputs feed every pair, one x register live.
            COMPTRUST_UNROLL for (int v = 0; v < V; ++v) {
              const __m512i xv = x8_lanes4(x8 + v * p.k + bk + plane * 16 + i * 4);
              COMPTRUST_UNROLL for (int q = 0; q < P; ++q)
                dot[q][v][plane % C] = dpbusd(dot[q][v][plane % C], codes[q], xv);
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
      const int32_t* bw = tw + block * kInt3BlockPlanes * kTileCols;
      const __m256i high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bw + 2 * kTileCols));
      for (int plane = 0; plane < 2; ++plane) {
        const __m256i low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bw + plane * kTileCols));
        for (int j = 0; j < 16; ++j)
          store8(out + (block * kInt3BlockRows + plane * 16 + j - kc) * ld,
                           _mm256_mul_ps(_mm256_sub_ps(int3_codes(low, high, plane, j), zero), scale));
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
void panel_all(const Problem& p) {
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

template <int BITS, bool A8>
COMPTRUST_AVX2 void rows_avx2(const Problem& p, int64_t t) {
  static_assert(!(A8 && BITS == 8), "no a8 path for int8 weights");
  for_each_row_block(p.m, [&](auto rows, int64_t i0) {
    constexpr int R = decltype(rows)::value;
    if constexpr (A8) a8_avx2<BITS, R>(p, t, i0);
    else direct_avx2<BITS, R>(p, t, i0);
  });
}

// ------------------------------------------------------------- AVX-512 direct (float x, int4 / int3)
// One zmm takes the same word row of two neighbouring tiles (lanes 0..7 tile t, lanes 8..15 tile t + 1:
// 16 output columns, all for the same inputs). Codes are looked up with vpermps in a table of their float
// values (vpermps reads only an index's low 4 bits, so no mask and no convert is needed), and the
// multiply-add takes x as an embedded broadcast from L1.
//   int4: one shift puts code j of the words in the low nibble: 3 instructions per 16 multiply-adds (the
//         AVX2 kernel needs 5 per 8: shift, mask, convert, broadcast, fma).
//   int3: code j of a plane's 16 rows is 2-bit field j of the low word plus one bit of the high word
//         (cpu_tiles.h). One vpternlogd takes bits 0..1 from the shifted low word and bit 2 up from the
//         shifted high word; bit 3 is then the high word's next bit, so the table repeats 0..7. 5 per 16.
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
        const int64_t offset = block * kInt3BlockPlanes * kTileCols;
        tiles.prefetch(offset, 2);  // a block is 96 bytes
        const __m512i high = tiles.words(offset + 2 * kTileCols);
        COMPTRUST_UNROLL for (int plane = 0; plane < 2; ++plane) {
          const __m512i low = tiles.words(offset + plane * kTileCols);
          const float* xb = x + block * kInt3BlockRows + plane * 16;
          _Pragma("GCC unroll 16") for (int j = 0; j < 16; ++j) {
            const int high_bit = 8 * (j / 4) + 4 * plane + j % 4;
            const __m512i hi_at_2 = high_bit >= 2 ? _mm512_srli_epi32(high, high_bit - 2) : _mm512_slli_epi32(high, 2 - high_bit);
            // A & C | B & ~C (A, B, C = 0xF0, 0xCC, 0xAA): 0xE4, with C the mask of bits 0..1.
            const __m512i index = _mm512_ternarylogic_epi32(j ? _mm512_srli_epi32(low, 2 * j) : low, hi_at_2, low_bits, 0xE4);
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
COMPTRUST_AVX512 void direct_rows_avx512(const Problem& p, int64_t u) {
  for_each_row_block(p.m, [&](auto rows, int64_t i0) { direct_avx512<BITS, decltype(rows)::value>(p, 2 * u, i0); });
}

// ------------------------------------------ AVX-512 VNNI, int4 / int3, one row of x, one weight stream
// The two-tile kernels (direct_avx512, a8_avx512) read tiles t and t + 1 side by side: two streams of 32-byte
// rows (2.3 KB apart at k = 576), more with P > 1. At batch 1 on the embedded model's layers, cold, that read
// pattern and the fp32 kernel's decoding (a shift, a vpermps and a multiply-add per 16 products) held them to
// 12-14 GB/s in place, where the dense rows (one stream per thread) read 25-30. This kernel reads one tile at
// a time, two word rows (16 inputs of its 8 columns) per 64-byte load, so a thread's stretch of tiles is one
// sequential stream; fp32 x is three int8 limbs per block of 32 inputs (int8_limbs.h: fp32 accuracy), multiplied
// with vpdpbusd: per 64 bytes of weights one vpermd, three mask/shift instructions and six vpdpbusd. With int8
// activations (act_bits 8) x is one limb, its a8 codes, and two vpdpbusd: then the kernels run at the memory's
// pace. Against the two-tile a8 kernel it replaced at one row (cold, alternated in one process): 4096 x 4096 and
// 11008 x 4096 1.20-1.29x (int4 and int3), 4096 x 11008 1.12x / 1.03x, SmolLM2's layers even to 1.08x; the embedded
// model's w4a8 and w3a8 decode 105 -> 282 and 113 -> 305 tokens/s (the program now binds those layers too).
// The vpermd puts word row 2v's column c in lane 2c and row 2v + 1's in lane 2c + 1 (inputs 16v..16v+7 and
// 16v+8..16v+15); a lane's low nibbles are its even inputs, the high nibbles its odd ones. So the activation
// operand of the low nibbles is 4 int8 of inputs 16v + {0,2,4,6} in even lanes and 16v + {8,10,12,14} in odd
// ones: one 8-byte broadcast (vpbroadcastq, a plain load), as is the high nibbles' ({1,3,5,7}, {9,11,13,15}).
// Each block's integer sums are scaled by its limb steps; per group the lane pairs are added before the zero
// point and scale are applied. Needs k and the group size to be multiples of 16 (stream_fits).
// Its vpdpbusd count bounds it about as much as the memory does: in the embedded model's decode step, the q/k/v
// product run a second time with its weights hot in L2 took 9.4 us per layer against 12.5 cold (Zen 4 issues a zmm
// vpdpbusd every two cycles: 12 cycles per 128 weights). Fewer limbs would halve that and lose fp32 accuracy.
constexpr int kStreamInputs = 16;

// Layers of fp32 x take it up to this k, where x's limbs (3k bytes) stay well inside L1, at any size (int8
// activations, k bytes, at any k): 4096 x 4096 and
// 11008 x 4096 read 3-10% and 14-17% faster than on the two-tile limb kernel (a8_avx512), 4096 x 11008 20% slower
// (cold, alternated in one process); SmolLM2's layers (k = 576, 1536) 20-50% faster than on the two-tile fp32 one.
// int3, against the two-tile limb kernel: 11008 x 4096 and 4096 x 4096 1.10x, SmolLM2's 576 x 576, 576 x 1536 and
// 1536 x 576 1.12x, 1.20x and 1.43x.
constexpr int64_t kStreamMaxInputs = 4096;

inline bool stream_fits(int bits, int64_t k, int64_t group_size) {
  if (bits == 3) return group_size % kInt3BlockRows == 0;  // k is a multiple of 32 in the int3 layout
  return bits == 4 && k % kStreamInputs == 0 && group_size % kStreamInputs == 0;
}

// x's int8 codes in a kernel family's lane order (lane_position), as LimbOrder for limbs_of_block and
// quantize_block_int8.
const LimbOrder& lane_order(Lanes lanes, int bits) {
  static const LimbOrder kOrders[2][2] = {
      {limb_order([](int j) { return a8_lane_position(4, j); }), limb_order([](int j) { return a8_lane_position(3, j); })},
      {limb_order([](int j) { return stream_lane_position(4, j); }),
       limb_order([](int j) { return stream_lane_position(3, j); })}};
  return kOrders[lanes == Lanes::kOneStream][bits == 3];
}

// The activations of one row for the one-stream kernels, as `limbs` int8 rows in their lane order
// (stream_lane_position): codes[l * k + kk] limb l of input kk's position, steps[(l * groups + g) *
// blocks_per_group + b] the step of limb l in block b of group g. fp32 x: kLimbs limbs (stream_limbs, fp32
// accuracy); int8 activations (act_bits 8): one, x's a8 codes (stream_int8).
struct StreamLimbs {
  int limbs = kLimbs;
  std::vector<int8_t> codes;
  std::vector<float> steps;
};

COMPTRUST_AVX512 void stream_limbs(const Problem& p, const float* x, StreamLimbs& out) {
  const LimbOrder& order = lane_order(Lanes::kOneStream, p.bits);
  out.limbs = kLimbs;
  out.codes.resize(kLimbs * p.k);
  out.steps.resize(kLimbs * p.groups * p.blocks_per_group);
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t ke = p.group_end(g);
    for (int64_t b = 0, bk = g * p.group_size; bk < ke; ++b, bk += kActBlock) {
      int8_t* const limbs[kLimbs] = {out.codes.data() + bk, out.codes.data() + p.k + bk,
                                     out.codes.data() + 2 * p.k + bk};
      float steps[kLimbs];
      limbs_of_block(x + bk, std::min<int64_t>(ke - bk, kActBlock), order, limbs, steps);
      for (int l = 0; l < kLimbs; ++l) out.steps[(l * p.groups + g) * p.blocks_per_group + b] = steps[l];
    }
  }
}

// The one-stream kernels' lanes hold a column's sums in lane pairs (2c, 2c + 1). A group's block sums scaled by
// their limb steps (L limbs: x.limbs), added into `sum`:
template <int L>
COMPTRUST_AVX512 inline __m512 add_limb_blocks(const Problem& p, const StreamLimbs& x, int64_t g, int64_t b,
                                               const __m512i (&acc)[L], __m512 sum) {
  for (int l = 0; l < L; ++l)
    sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[l]), _mm512_set1_ps(x.steps[(l * p.groups + g) * p.blocks_per_group + b]),
                          sum);
  return sum;
}

// ... a group's pairs added, its zero point and scale applied, into `out` ...
COMPTRUST_AVX512 inline __m512 add_group(const Problem& p, int64_t t, int64_t g, __m512 sum, __m512 out) {
  const __m512i swap_pairs = _mm512_setr_epi32(1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  const __m512i twice = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  sum = _mm512_add_ps(sum, _mm512_permutexvar_ps(swap_pairs, sum));  // both lanes of a pair: the column's sum
  const __m512 zero = _mm512_permutexvar_ps(twice, _mm512_castps256_ps512(load_zeros(p.tile_zeros(t) + g * kTileCols)));
  const __m512 scale = _mm512_permutexvar_ps(twice, _mm512_castps256_ps512(load_scales(p.tile_scales(t) + g * kTileCols)));
  return _mm512_fmadd_ps(scale, _mm512_fnmadd_ps(zero, _mm512_set1_ps(p.x_group_sum[g]), sum), out);
}

// ... and the tile's 8 outputs, one per pair, stored.
COMPTRUST_AVX512 inline void store_pairs(const Problem& p, int64_t t, __m512 out) {
  const __m512i even_lanes = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14);
  _mm256_storeu_ps(p.y + t * kTileCols, _mm512_castps512_ps256(_mm512_permutexvar_ps(even_lanes, out)));
}

template <int L>
COMPTRUST_AVX512_VNNI void stream_vnni_avx512(const Problem& p, const StreamLimbs& x, int64_t t) {
  const int32_t* tw = p.tile_w(t);
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i interleave = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  __m512 out = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t v_end = p.group_end(g) / kStreamInputs;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t b = 0, v = g * p.group_size / kStreamInputs; v < v_end; ++b) {
      __m512i acc[L];
      for (__m512i& a : acc) a = _mm512_setzero_si512();
      for (const int64_t block_end = std::min(v_end, v + kActBlock / kStreamInputs); v < block_end; ++v) {
        const int32_t* rows = tw + v * 2 * kTileCols;
        prefetch_to_l2(rows, 2 * kPrefetchBytes);
        const __m512i words = _mm512_permutexvar_epi32(interleave, _mm512_loadu_si512(rows));
        const __m512i even = _mm512_and_si512(words, nibble), odd = _mm512_and_si512(_mm512_srli_epi32(words, 4), nibble);
        for (int l = 0; l < L; ++l) {
          const int8_t* codes = x.codes.data() + l * p.k + v * kStreamInputs;
          int64_t low, high;
          std::memcpy(&low, codes, sizeof low);
          std::memcpy(&high, codes + 8, sizeof high);
          acc[l] = dpbusd(acc[l], even, _mm512_set1_epi64(low));
          acc[l] = dpbusd(acc[l], odd, _mm512_set1_epi64(high));
        }
      }
      sum = add_limb_blocks(p, x, g, b, acc, sum);
    }
    out = add_group(p, t, g, sum, out);
  }
  store_pairs(p, t, out);
}

// int3, one tile at a time as the int4 kernel above: a block (32 inputs of the tile's 8 columns) is 96 contiguous
// bytes, planes 0 and 1 in one 64-byte load, the high-bit plane in a 32-byte one. vpermd puts plane 0's column c
// (rows 0-15) in lane 2c and plane 1's (rows 16-31) in lane 2c + 1, the high plane's word c in both; shifting lane
// 2c + 1's high word right by 4 lines its rows' bits up with lane 2c's. Then code operand i = 0..3 holds, per lane,
// rows 16p + 4q + i in byte q: the low plane's 2-bit field i, and the high bit moved to bit 2 and merged in by one
// vpternlogd, ready for vpdpbusd against x's 8 bytes {x[4q + i]}, {x[16 + 4q + i]} (stream_lane_position):
// per 96 bytes of weights two vpermd, ~14 shift/mask/merge instructions and twelve vpdpbusd (four with int8
// activations). Needs the group size to be a multiple of 32 (stream_fits), so a limb block is one int3 block.
// With fp32 x it is compute-bound: warm in cache, 0.76-0.87x the int4 kernel's weights per second (per 256
// weights ~35 vector instructions against int4's ~26, Zen 4 issuing about two zmm ones per cycle), so cold it
// ran 0.81-1.22x as fast as int4 in quick benchmark runs where its bytes would allow 1.3x; with int8 activations
// it reads at the memory's pace (4096 x 4096 cold: 1.30x as fast as int4 a8).
// Its prefetch: both cache lines a 96-byte block can start 4 KB ahead, into L2. Cold, alternated in one process
// against int4 (int4 time / int3 time, before -> after; one prefetch into L1 per block, 2 KB ahead, before): int8
// activations 4096 x 4096 1.04 -> 1.11, 11008 x 4096 0.96 -> 1.04, 4096 x 11008 1.12 -> 1.25, SmolLM2's 576 x 1536
// and 1536 x 576 1.02 -> 1.12 and 0.92 -> 1.04; fp32 x 1-4% faster. (A GFNI decode of the high bits, three
// instructions fewer per block, measured no faster on top of it.)
constexpr int64_t kInt3PrefetchBytes = 4096;

template <int L>
COMPTRUST_AVX512_VNNI void stream_int3_vnni_avx512(const Problem& p, const StreamLimbs& x, int64_t t) {
  const int32_t* tw = p.tile_w(t);
  const __m512i interleave = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  const __m512i twice = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i odd_lanes_by_4 = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  const __m512i bit2 = _mm512_set1_epi8(0x04), low2 = _mm512_set1_epi8(0x03);
  __m512 out = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t b = 0, block = g * p.group_size / kInt3BlockRows; block < p.group_end(g) / kInt3BlockRows; ++b, ++block) {
      const int32_t* bw = tw + block * kInt3BlockPlanes * kTileCols;
      // Every cache line of the stream (a block is 1.5 lines: one prefetch per block skipped every third line).
      prefetch_to_l2(bw, kInt3PrefetchBytes);
      prefetch_to_l2(bw + 16, kInt3PrefetchBytes);
      const __m512i low = _mm512_permutexvar_epi32(interleave, _mm512_loadu_si512(bw));
      const __m512i high = _mm512_srlv_epi32(
          _mm512_permutexvar_epi32(twice, _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bw + 2 * kTileCols)))),
          odd_lanes_by_4);
      __m512i acc[L];
      for (__m512i& a : acc) a = _mm512_setzero_si512();
      COMPTRUST_UNROLL for (int i = 0; i < 4; ++i) {
        const __m512i low_i = i ? _mm512_srli_epi32(low, 2 * i) : low;
        const __m512i high_i = _mm512_and_si512(i < 2 ? _mm512_slli_epi32(high, 2 - i) : i == 2 ? high : _mm512_srli_epi32(high, 1), bit2);
        const __m512i codes = _mm512_ternarylogic_epi32(low2, low_i, high_i, 0xCA);  // low2 ? low_i : high_i, bitwise
        for (int l = 0; l < L; ++l) {
          int64_t inputs;
          std::memcpy(&inputs, x.codes.data() + l * p.k + block * kInt3BlockRows + 8 * i, sizeof inputs);
          acc[l] = dpbusd(acc[l], codes, _mm512_set1_epi64(inputs));
        }
      }
      sum = add_limb_blocks(p, x, g, b, acc, sum);
    }
    out = add_group(p, t, g, sum, out);
  }
  store_pairs(p, t, out);
}

// Tiles 2u and 2u + 1 (the work units of the two-tile kernels), one after the other.
template <int L>
COMPTRUST_AVX512_VNNI void stream_vnni_pair(const Problem& p, const StreamLimbs& x, int64_t u) {
  for (int64_t t = 2 * u, last = std::min(2 * u + 2, p.n / kTileCols); t < last; ++t) {
    if (p.bits == 3) stream_int3_vnni_avx512<L>(p, x, t);
    else stream_vnni_avx512<L>(p, x, t);
  }
}

COMPTRUST_AVX512_VNNI void stream_vnni_pair(const Problem& p, const StreamLimbs& x, int64_t u) {
  x.limbs == 1 ? stream_vnni_pair<1>(p, x, u) : stream_vnni_pair<kLimbs>(p, x, u);
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

COMPTRUST_AVX512 void int8_rows_avx512(const Problem& p, int64_t t) {
  for_each_row_block(p.m, [&](auto rows, int64_t i0) { direct_int8_avx512<decltype(rows)::value>(p, t, i0); });
}
#ifdef COMPTRUST_X86
// x[0..n) summed in 16 lanes, then across them: a one-accumulator loop is a chain of dependent adds, 0.6 us at
// k = 576 and 1.7 at 1536 here, serial before every decode-step product's parallel region.
COMPTRUST_AVX512 float sum_avx512(const float* x, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(x + j));
  if (j < n) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (n - j)) - 1), x + j));
  return _mm512_reduce_add_ps(acc);
}
#endif

// sums[i][g] = the sum of x's row i over group g, in fp32 (the zero-point term of every float-x kernel). A plain
// loop, not ATen ops: at batch 1 on a 576-wide layer, pad + view + sum cost as much as the product.
void group_sums_fp32(const Problem& p, const float* x, float* sums) {
#ifdef COMPTRUST_X86
  const bool avx512 = select_isa() == Isa::kAvx512;
#endif
  for (int64_t i = 0; i < p.m; ++i)
    for (int64_t g = 0; g < p.groups; ++g) {
      const float* first = x + i * p.k + g * p.group_size;
      const int64_t count = p.group_end(g) - g * p.group_size;
#ifdef COMPTRUST_X86
      if (avx512) {
        sums[i * p.groups + g] = sum_avx512(first, count);
        continue;
      }
#endif
      sums[i * p.groups + g] = std::accumulate(first, first + count, 0.f);
    }
}

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
        const int32_t* b0 = w0 + block * kInt3BlockPlanes * kTileCols;
        const int32_t* b1 = w1 + block * kInt3BlockPlanes * kTileCols;
        const __m256i high0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + 2 * kTileCols));
        const __m256i high1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b1 + 2 * kTileCols));
        for (int plane = 0; plane < 2; ++plane) {
          const __m256i low0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + plane * kTileCols));
          const __m256i low1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b1 + plane * kTileCols));
          for (int j = 0; j < 16; j += 2)
            store_pair_row(panel + (block * kInt3BlockRows - kb0 + plane * 16 + j) / 2 * kAmxCols * 2,
                           panel_weights(int3_codes(low0, high0, plane, j), int3_codes(low1, high1, plane, j), zero, scale),
                           panel_weights(int3_codes(low0, high0, plane, j + 1), int3_codes(low1, high1, plane, j + 1),
                                         zero, scale));
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

// int3 (cpu_tiles.h planes): the low two bits from plane p and bit 2 from the high plane, merged by vpternlogd.
COMPTRUST_AVX512_BF16 void int3_code_pairs(const Problem& p, int64_t t, int tiles, int64_t kb0, int64_t kb1,
                                           uint16_t* codes) {
  const int32_t* w0 = p.tile_w(t);
  const int32_t* w1 = tiles > 1 ? p.tile_w(t + 1) : w0;
  const __m512i table = bf16_code_table(7), bit2 = _mm512_set1_epi16(4);
  for (int64_t block = kb0 / kInt3BlockRows; block < kb1 / kInt3BlockRows; ++block) {
    const int32_t* b0 = w0 + block * kInt3BlockPlanes * kTileCols;
    const int32_t* b1 = w1 + block * kInt3BlockPlanes * kTileCols;
    prefetch_ahead(b0);
    prefetch_ahead(b1);
    const __m512i high = two_tiles(b0 + 2 * kTileCols, b1 + 2 * kTileCols);
    for (int plane = 0; plane < 2; ++plane) {
      const __m512i low = two_tiles(b0 + plane * kTileCols, b1 + plane * kTileCols);
      COMPTRUST_UNROLL for (int jp = 0; jp < 8; ++jp) {  // rows j = 2 jp, 2 jp + 1 of the plane
        const int high_bit = 8 * (jp / 2) + 4 * plane + 2 * (jp % 2);  // of row 2 jp; row 2 jp + 1 the next bit
        const __m512i lows = _mm512_multishift_epi64_epi8(pair_offsets(4 * jp, 4 * jp + 2), low);
        const __m512i highs = _mm512_multishift_epi64_epi8(pair_offsets(high_bit - 2, high_bit - 1), high);
        const __m512i pair = _mm512_ternarylogic_epi32(bit2, highs, lows, 0xCA);  // bit2 ? highs : lows
        _mm512_storeu_si512(codes + (block * kInt3BlockRows - kb0 + plane * 16 + 2 * jp) / 2 * kAmxCols * 2,
                            _mm512_permutexvar_epi16(pair, table));
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

// y[m, n] (fp32) = x[m, k] (fp32) @ W^T on the tile unit, x split into three exact bf16 planes
// (amx_bf16.h AmxActivations): as accurate as the fp32 kernels (max error against the float64 product
// 0.3-1.2e-6 of the largest output, fp32 F.linear 0.5-1.7e-6). Where the CPU has AMX it replaces the AVX-512
// fp32 panel from kPanelMinRows rows up to the BLAS path (kBlasMinRowsAvx512). Int4 side by side on cold
// SmolLM2 and 4096x4096 weights, against the panel: 1.6-2.5x at 8 rows, 1.4-2.1x at 32, 1.6-1.8x at 64,
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

#endif  // COMPTRUST_X86

// Tiles per task such that a task has at least kMinTaskMacs multiply-adds: below that, waking a second
// thread costs more than it saves. int4 at batch 1, cold weights, one thread against two: 192x576 (110k
// multiply-adds) 12.2 against 15.0 us; 576x576 (332k) 23.2 against 18.9.
constexpr int64_t kMinTaskMacs = 1 << 17;

#ifdef COMPTRUST_X86
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
#endif

void run(const Problem& p, bool a8, Isa isa) {
  const int64_t tiles = p.n / kTileCols;
  const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / (p.m * p.k * kTileCols));
#ifdef COMPTRUST_X86
  if (isa != Isa::kScalar) {
    if (!a8 && p.limbs != kLimbs && p.m >= kPanelMinRows) {
      isa == Isa::kAvx512 ? panel_all<4>(p) : panel_all<2>(p);
      return;
    }
    if ((a8 || p.limbs == kLimbs) && avx512_vnni_usable()) {
      for_each_pair_unit(
          p, grain,
          [&](int64_t first) { p.bits == 4 ? a8_pair_unit_avx512<4>(p, first) : a8_pair_unit_avx512<3>(p, first); },
          [&](int64_t u) { p.bits == 4 ? a8_rows_avx512<4>(p, u) : a8_rows_avx512<3>(p, u); });
      return;
    }
    if (isa == Isa::kAvx512 && p.bits != 8 && !a8) {
      at::parallel_for(0, (tiles + 1) / 2, (grain + 1) / 2, [&](int64_t begin, int64_t end) {
        for (int64_t u = begin; u < end; ++u) p.bits == 4 ? direct_rows_avx512<4>(p, u) : direct_rows_avx512<3>(p, u);
      });
      return;
    }
    if (isa == Isa::kAvx512 && p.bits == 8 && !a8) {
      at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) int8_rows_avx512(p, t);
      });
      return;
    }
    at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        if (p.bits == 4) a8 ? rows_avx2<4, true>(p, t) : rows_avx2<4, false>(p, t);
        else if (p.bits == 8) rows_avx2<8, false>(p, t);  // check_args refuses a8 for int8 weights
        else a8 ? rows_avx2<3, true>(p, t) : rows_avx2<3, false>(p, t);
      }
    });
    return;
  }
#endif
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) tile_scalar(p, t, a8);
  });
}

// ------------------------------------------------------------ dequantize + BLAS (float x, large batch)
// From kBlasMinRows rows on, the weight is dequantized block by block and run through torch's GEMM
// (dense_blocks.h). fp32 x: MKL's sgemm. Against fp32 F.linear, side by side on SmolLM2 and 4096x4096
// shapes, the AVX2 panel kernel ran 1.5-1.8x at 64 rows and 1.9-2.6x at 128, the BLAS path 1.2-1.7x and
// 1.0-1.3x at 3072; so from 64 rows with AVX2. The AVX-512 panel is twice as fast (0.9-1.3x at 64 rows,
// 1.1-1.5x at 256 against the BLAS path's 1.6-1.8x and 1.2-1.3x), so there the switch waits for 256 rows,
// where writing the dequantized scratch (4 bytes per weight) stops mattering. bf16 x: a bf16 scratch
// through oneDNN, rounding the weights to bf16 as a bf16 dense model would; from 64 rows with any ISA
// (against bf16 F.linear, AVX-512 panel / BLAS path: 2.1-2.6x / 2.6-4.4x at 32 rows, 2.8-3.5x / 2.3-2.9x at 64).
// Where the CPU has AMX, bf16 x from 8 to 1023 rows takes the AMX-BF16 tile path instead, and without AMX but
// with AVX512-BF16 the same panels on vdpbf16ps (run_bf16_panels, bf16_panels_for).
constexpr int64_t kBlasMinRows = 64;
constexpr int64_t kBlasMinRowsAvx512 = 256;

template <typename Out>
void run_dequantized(const Problem& p, const at::Tensor& x, at::Tensor& y, Isa isa) {
  gemm_by_dense_blocks<Out>(x, y, [&](int64_t t, Out* out, int64_t ld) {
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t kb = g * p.group_size, ke = p.group_end(g);
#ifdef COMPTRUST_X86
      if (isa != Isa::kScalar) {
        if (p.bits == 4) dequantize_tile<4>(p, t, g, kb, ke, out + kb * ld, ld);
        else if (p.bits == 8) dequantize_tile<8>(p, t, g, kb, ke, out + kb * ld, ld);
        else dequantize_tile<3>(p, t, g, kb, ke, out + kb * ld, ld);
        continue;
      }
#endif
      dequantize_tile_scalar(p, t, g, kb, ke, out + kb * ld, ld);
    }
  });
}

// ------------------------------------------------------------------------- activation preparation
// Quantize each row to int8 per block of kActBlock inputs, blocks restarting at every group (the
// definition in comptrust.reference.quantize_activations_int8), store the codes in the weight
// layout's lane order, and sum the dequantized inputs of each group for the zero-point term.
void quantize_rows(const Problem& p, const float* x, int8_t* x8, float* block_scale, float* group_sum, Lanes lanes) {
#ifdef COMPTRUST_X86
  const bool avx512 = select_isa() == Isa::kAvx512;
  const int32_t* lane_from = avx512 ? lane_order(lanes, p.bits).from.data() : nullptr;  // a whole block's lane order
#endif
  at::parallel_for(0, p.m, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* xi = x + i * p.k;
      for (int64_t g = 0; g < p.groups; ++g) {
        const int64_t kb = g * p.group_size, ke = p.group_end(g);
        float sum = 0.f;
        for (int64_t b = 0, bk = kb; bk < ke; ++b, bk += kActBlock) {
          const int64_t bend = std::min(ke, bk + kActBlock);
#ifdef COMPTRUST_X86
          // A block starts at a multiple of 8 or 16 (int4's two-tile and one-stream units) or 32 (int3) inputs, as
          // groups are multiples of those units (check_args, stream_fits): a whole block's lane order is always
          // lane_from.
          if (avx512 && bend - bk == kActBlock) {
            int32_t isum = 0;
            const float scale = quantize_block_int8(xi + bk, x8 + i * p.k + bk, lane_from, &isum);
            block_scale[(i * p.groups + g) * p.blocks_per_group + b] = scale;
            sum += scale * static_cast<float>(isum);
            continue;
          }
#endif
          float amax = 0.f;
          for (int64_t kk = bk; kk < bend; ++kk) amax = std::max(amax, std::fabs(xi[kk]));
          // A true division (not 127 * (1 / amax)): it decides which integer rounding ties go to.
          const float inv = amax > 0.f ? 127.f / amax : 0.f;
          const float scale = amax / 127.f;
          int32_t isum = 0;
          for (int64_t kk = bk; kk < bend; ++kk) {
            const int32_t q = static_cast<int32_t>(round_int8_range(xi[kk] * inv));
            x8[i * p.k + lane_position(lanes, p.bits, kk)] = static_cast<int8_t>(q);
            isum += q;
          }
          block_scale[(i * p.groups + g) * p.blocks_per_group + b] = scale;
          sum += scale * static_cast<float>(isum);
        }
        group_sum[i * p.groups + g] = sum;
      }
    }
  });
}

#ifdef COMPTRUST_X86
// fp32 x on the VNNI kernels (a8_avx512 with LIMBS = 3): each row as three int8 limbs per block of kActBlock
// inputs (int8_limbs.h), blocks restarting at every group as in quantize_rows; x8 rows (3 per row of x) in the
// layout's lane order, block_scale [m * 3][groups * blocks_per_group]. Three vpdpbusd of 64 products each do
// the work of 12 fp32 FMAs, so where the CPU has VNNI this beats the fp32 kernels wherever they are
// compute-bound. Side by side (warm, against bf16 F.linear; limbs / the fp32 path they replace):
//   * batch 1, cold weights, against the fp32 direct kernel: int3 1.1-1.25x on the SmolLM2 shapes and 1.6-1.8x
//     on 4096x4096, 11008x4096 and 4096x11008; int4 1.1-1.35x on those three, but 0.83-0.9x on the SmolLM2
//     shapes, where the int4 direct kernel (cheaper to decode than int3's) stays;
//   * layers of 2^22+ weights, 2 to 255 rows (then the BLAS path): int4 4096x4096 5.1 / 3.3 at 2 rows,
//     1.76 / 0.94 at 8, 1.11 / 0.75 at 16, 0.65 / 0.51 at 64, 0.61 / 0.48 at 128; 11008x4096 alike;
//   * smaller layers of 2^18+ weights: from kPanelMinRows (int3: 2) to 63 rows, where the fp32 panel is weakest
//     (1536x576 int4 at 8 rows 1.20 / 0.79, at 32 0.68 / 0.60; int3 at 2 rows 2.40 / 1.69). Below 8 rows int4's
//     direct kernel keeps up (576x576 at 4 rows 1.70 / 1.79), from 64 rows the panel (576x1536 even), and on
//     the smallest layers (192x576) the fixed cost of the limbs loses (1.72 / 2.09 at 4 rows).
constexpr int64_t kLimbsMinInt4Weights = int64_t{1} << 22;
constexpr int64_t kLimbsMinWeights = int64_t{1} << 18;
constexpr int64_t kLimbsMaxSmallRows = 64;

bool limbs_for(int bits, int64_t m, int64_t n, int64_t k, Isa isa) {
  if (bits == 8 || isa != Isa::kAvx512 || !avx512_vnni_usable()) return false;
  const int64_t weights = n * k;
  if (m == 1) return bits == 3 || weights >= kLimbsMinInt4Weights;
  if (weights >= kLimbsMinInt4Weights) return m < kBlasMinRowsAvx512;
  return weights >= kLimbsMinWeights && m < kLimbsMaxSmallRows && (bits == 3 || m >= kPanelMinRows);
}

void quantize_limbs(const Problem& p, const float* x, int8_t* x8, float* block_scale) {
  const LimbOrder& order = lane_order(Lanes::kTwoTile, p.bits);
  at::parallel_for(0, p.m, 1, [&](int64_t row_begin, int64_t row_end) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    const float* xi = x + i * p.k;
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t kb = g * p.group_size, ke = p.group_end(g);
      for (int64_t b = 0, bk = kb; bk < ke; ++b, bk += kActBlock) {
        int8_t* const out[kLimbs] = {x8 + i * kLimbs * p.k + bk, x8 + (i * kLimbs + 1) * p.k + bk,
                                     x8 + (i * kLimbs + 2) * p.k + bk};
        float steps[kLimbs];
        limbs_of_block(xi + bk, std::min(ke, bk + kActBlock) - bk, order, out, steps);
        for (int l = 0; l < kLimbs; ++l) block_scale[((i * kLimbs + l) * p.groups + g) * p.blocks_per_group + b] = steps[l];
      }
    }
  }
  });
}
#endif  // COMPTRUST_X86

void check_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& zeros, const at::Tensor& scales,
                int64_t bits, int64_t group_size, int64_t act_bits) {
  TORCH_CHECK(bits == 3 || bits == 4 || bits == 8, "gemm_tiled: bits=", bits, " must be 3, 4 or 8");
  TORCH_CHECK(act_bits == 0 || act_bits == 8, "gemm_tiled: act_bits=", act_bits, " must be 0 (float) or 8");
  TORCH_CHECK(!(bits == 8 && act_bits == 8), "gemm_tiled: int8 weights run with float activations only "
              "(act_bits=0); u8 x s8 products of 8-bit codes would overflow the a8 kernel's int16 sums");
  TORCH_CHECK(x.dim() == 2, "gemm_tiled: x must be 2-D [m, k], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "gemm_tiled: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  for (const at::Tensor* t : {&x, &weight, &zeros, &scales})
    TORCH_CHECK(t->device().is_cpu(), "gemm_tiled (CPU): every tensor must be on the CPU, got one on ", t->device());
  TORCH_CHECK(weight.scalar_type() == at::kInt, "gemm_tiled: weight must be int32, got ", weight.scalar_type());
  TORCH_CHECK(zeros.scalar_type() == at::kByte, "gemm_tiled: zeros must be uint8, got ", zeros.scalar_type());
  TORCH_CHECK(scales.scalar_type() == at::kHalf, "gemm_tiled: scales must be float16, got ", scales.scalar_type());
  const int64_t k = x.size(1);
  const int64_t unit = bits == 4 ? 8 : bits == 8 ? 4 : kInt3BlockRows;
  TORCH_CHECK(k > 0 && k % unit == 0, "gemm_tiled: k=", k, " must be a positive multiple of ", unit, " for int",
              bits);
  TORCH_CHECK(group_size > 0 && group_size % unit == 0, "gemm_tiled: group_size=", group_size,
              " must be a positive multiple of ", unit, " for int", bits, " (k=", k, ")");
  const int64_t tiles = weight.dim() > 0 ? weight.size(0) : 0;
  const int64_t groups = (k + group_size - 1) / group_size;
  if (bits == 4 || bits == 8) {
    const int64_t per_word = bits == 4 ? 8 : 4;
    TORCH_CHECK(weight.dim() == 3 && weight.size(1) == k / per_word && weight.size(2) == kTileCols,
                "gemm_tiled: int", bits, " weight is ", weight.sizes(), ", expected [n/8, ", k / per_word,
                ", 8] for k=", k);
  } else {
    TORCH_CHECK(weight.dim() == 4 && weight.size(1) == k / kInt3BlockRows && weight.size(2) == kInt3BlockPlanes &&
                    weight.size(3) == kTileCols,
                "gemm_tiled: int3 weight is ", weight.sizes(), ", expected [n/8, ", k / kInt3BlockRows, ", 3, 8] for k=",
                k);
  }
  TORCH_CHECK(tiles > 0, "gemm_tiled: weight has no output columns");
  for (const at::Tensor* t : {&zeros, &scales})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == tiles && t->size(1) == groups && t->size(2) == kTileCols,
                "gemm_tiled: ", (t == &zeros ? "zeros" : "scales"), " is ", t->sizes(), ", expected [", tiles, ", ",
                groups, ", 8] for n=", tiles * kTileCols, ", k=", k, ", group_size=", group_size);
}

#ifdef COMPTRUST_X86
// The one fp32 row of int8 activations (act_bits 8) for the one-stream kernels: one limb, x's a8 codes (as
// quantize_rows makes them for the two-tile kernels, in the one-stream lane order), and the group sums of the
// dequantized codes.
void stream_int8(const Problem& p, const float* x, StreamLimbs& out, float* group_sum) {
  out.limbs = 1;
  out.codes.resize(p.k);
  out.steps.resize(p.groups * p.blocks_per_group);
  quantize_rows(p, x, out.codes.data(), out.steps.data(), group_sum, Lanes::kOneStream);
}

// Several layers' products of one fp32 row (a decoder's q/k/v, gate/up at a decode step) in one parallel region,
// the layers' tile pairs shared out together (SmolLM2's layers at batch 1, side by side: q, k, v 61-78 us as
// three calls and 31-39 us as one; gate, up 91-118 us as two and 71-95 us as one), on the one-stream kernels
// (stream_vnni_pair) where they fit, else the two-tile direct kernel. With int8 activations (act_bits 8) always
// on the one-stream kernels, x as one limb of a8 codes (stream_int8).
// Bound once (BoundGemv) by DecodeProgram; per call by gemm_tiled_many, and by gemm_tiled at one row.
class TiledGemv final : public BoundGemv {
 public:
  // Layers already checked (check_args) and fit for the direct kernel (direct_many_fits with these act_bits).
  TiledGemv(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& zeros,
            const std::vector<at::Tensor>& scales, int bits, int64_t k, int64_t group_size, int64_t act_bits) {
    k_ = k;
    a8_ = act_bits == 8;
    const int64_t groups = (k + group_size - 1) / group_size;
    first_pair_.push_back(0);
    for (size_t i = 0; i < weights.size(); ++i) {
      kept_.insert(kept_.end(), {weights[i].contiguous(), zeros[i].contiguous(), scales[i].contiguous()});
      const at::Tensor* t = &kept_[kept_.size() - 3];
      Problem p{bits, nullptr, nullptr, nullptr, nullptr, t[0].data_ptr<int32_t>(), t[1].data_ptr<uint8_t>(),
                t[2].data_ptr<at::Half>(), nullptr, 1, weights[i].size(0) * kTileCols, k, group_size, groups,
                (group_size + kActBlock - 1) / kActBlock};
      problems_.push_back(p);
      widths_.push_back(p.n);
      first_pair_.push_back(first_pair_.back() + (weights[i].size(0) + 1) / 2);
    }
    grain_ = std::max<int64_t>(1, (kMinTaskMacs / (k * kTileCols) + 1) / 2);
    stream_ = stream_fits(bits, k, group_size) && avx512_vnni_usable();
    TORCH_INTERNAL_ASSERT(stream_ || !a8_, "TiledGemv: int8 activations need the one-stream kernels");
  }

  void run(const float* x, float* const* y) const override {
    const Problem& first = problems_[0];
    c10::SmallVector<float, 64> group_sum(first.groups);
    StreamLimbs limbs;
    if (a8_) {
      stream_int8(first, x, limbs, group_sum.data());
    } else {
      group_sums_fp32(first, x, group_sum.data());
      if (stream_) stream_limbs(first, x, limbs);
    }
    c10::SmallVector<Problem, 4> problems(problems_.begin(), problems_.end());
    for (size_t i = 0; i < problems.size(); ++i) {
      problems[i].x = x;
      problems[i].x_group_sum = group_sum.data();
      problems[i].y = y[i];
    }
    at::parallel_for(0, first_pair_.back(), grain_, [&](int64_t begin, int64_t end) {
      size_t layer = 0;
      for (int64_t u = begin; u < end; ++u) {
        while (u >= first_pair_[layer + 1]) ++layer;
        const int64_t pair = u - first_pair_[layer];
        if (stream_) stream_vnni_pair(problems[layer], limbs, pair);
        else first.bits == 4 ? direct_rows_avx512<4>(problems[layer], pair) : direct_rows_avx512<3>(problems[layer], pair);
      }
    });
  }

 private:
  std::vector<at::Tensor> kept_;  // contiguous weights, zeros and scales, alive as long as the problems
  std::vector<Problem> problems_;
  std::vector<int64_t> first_pair_;  // pair units (direct_rows_avx512: tiles 2u, 2u + 1) before each layer
  int64_t grain_ = 1;
  bool stream_ = false;  // stream_vnni_pair's one-stream kernels, else the two-tile direct kernel
  bool a8_ = false;      // int8 activations (act_bits 8)
};

// Whether layers of `bits` with these weights' widths and input width k take TiledGemv at one fp32 row: int4 and
// int3 layers on the one-stream kernels up to k = kStreamMaxInputs whatever their size (with int8 activations at
// any k), others on the two-tile direct kernel where they are too small for the int8-limb kernel (limbs_for).
bool direct_many_fits(at::TensorList weights, int64_t bits, int64_t k, Isa isa, int64_t group_size, int64_t act_bits) {
  if (isa != Isa::kAvx512 || bits == 8) return false;
  const bool stream = stream_fits(bits, k, group_size) && avx512_vnni_usable();
  if (act_bits == 8) return stream;
  if (stream && k <= kStreamMaxInputs) return true;
  bool fits = true;
  for (const at::Tensor& w : weights) fits = fits && !limbs_for(bits, 1, w.size(0) * kTileCols, k, isa);
  return fits;
}
#endif

at::Tensor gemm_tiled_2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& zeros,
                         const at::Tensor& scales, int64_t bits, int64_t group_size, int64_t act_bits) {
  check_args(x, weight, zeros, scales, bits, group_size, act_bits);
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0) * kTileCols;
  const int64_t groups = (k + group_size - 1) / group_size;
  const int64_t blocks_per_group = (group_size + kActBlock - 1) / kActBlock;
  const at::Tensor w = weight.contiguous(), z = zeros.contiguous(), s = scales.contiguous();
  const Isa isa = select_isa();
  Problem p{static_cast<int>(bits), nullptr, nullptr, nullptr, nullptr, w.data_ptr<int32_t>(), z.data_ptr<uint8_t>(),
            s.data_ptr<at::Half>(), nullptr, m, n, k, group_size, groups, blocks_per_group};
#ifdef COMPTRUST_X86
  if (act_bits == 0 && x.scalar_type() == at::kBFloat16 && bf16_panels_for(m, n, k)) {
    const at::Tensor xb = x.contiguous();
    at::Tensor y = at::empty({m, n}, x.options());
    run_bf16_panels(p, xb.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>());
    return y;
  }
#endif
  if (act_bits == 0 && x.scalar_type() == at::kBFloat16 && m >= kBlasMinRows) {
    at::Tensor y = at::empty({m, n}, x.options());
    run_dequantized<at::BFloat16>(p, x.contiguous(), y, isa);
    return y;
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({m, n}, xf.options());
  if (m == 0) return y.to(x.scalar_type());
#ifdef COMPTRUST_X86
  if (act_bits == 0 && m >= kPanelMinRows && m < kBlasMinRowsAvx512 && k % kAmxStep == 0 && amx_code_panels(p) &&
      amx_bf16_usable()) {
    run_amx_fp32(p, xf.data_ptr<float>(), y.data_ptr<float>());
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
#endif
  if (act_bits == 0 && m >= (isa == Isa::kAvx512 ? kBlasMinRowsAvx512 : kBlasMinRows)) {
    run_dequantized<float>(p, xf, y, isa);
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  p.x = xf.data_ptr<float>();
  p.y = y.data_ptr<float>();
#ifdef COMPTRUST_X86
  if (m == 1 && direct_many_fits(weight, bits, k, isa, group_size, act_bits)) {  // as gemm_tiled_many
    TiledGemv(std::vector<at::Tensor>{w}, {z}, {s}, p.bits, k, group_size, act_bits).run(p.x, &p.y);
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
#endif
  at::Tensor group_sum;
#ifdef COMPTRUST_X86
  const bool limbs = act_bits == 0 && limbs_for(p.bits, m, n, k, isa);
#else
  constexpr bool limbs = false;
#endif
  if (act_bits == 8 || limbs) {
    // One allocation for the int8 codes, block scales and group sums (three would cost more than a
    // 576-wide layer's product at batch 1).
    p.limbs = limbs ? kLimbs : 1;
    const int64_t scale_floats = m * p.limbs * groups * blocks_per_group, sum_floats = m * groups;
    const int64_t code_floats = (m * p.limbs * k + sizeof(float) - 1) / sizeof(float);
    group_sum = at::empty({scale_floats + sum_floats + code_floats}, xf.options());
    float* block_scale = group_sum.data_ptr<float>();
    float* sums = block_scale + scale_floats;
    auto* x8 = reinterpret_cast<int8_t*>(sums + sum_floats);
    p.x8 = x8;
    p.x_block_scale = block_scale;
    p.x_group_sum = sums;
#ifdef COMPTRUST_X86
    if (limbs) {
      quantize_limbs(p, p.x, x8, block_scale);
      group_sums_fp32(p, p.x, sums);
    } else {
      quantize_rows(p, p.x, x8, block_scale, sums, Lanes::kTwoTile);
    }
#else
    quantize_rows(p, p.x, x8, block_scale, sums, Lanes::kTwoTile);
#endif
  } else {
    group_sum = at::empty({m, groups}, xf.options());
    group_sums_fp32(p, p.x, group_sum.data_ptr<float>());
    p.x_group_sum = group_sum.data_ptr<float>();
  }
  run(p, act_bits == 8, isa);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// x [..., k] -> y [..., n], as F.linear: the layers pass their 3-D activations straight in (two reshapes in
// Python cost more than a 576-wide layer's product at batch 1).
at::Tensor gemm_tiled_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& zeros,
                          const at::Tensor& scales, int64_t bits, int64_t group_size, int64_t act_bits) {
  TORCH_CHECK(x.dim() >= 1, "gemm_tiled: x must be [..., k], got a 0-D tensor");
  const at::Tensor y = gemm_tiled_2d(x.dim() == 1 ? x.unsqueeze(0) : x.flatten(0, -2), weight, zeros, scales, bits, group_size, act_bits);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = y.size(1);
  return y.view(sizes);
}

// Several layers' products of one x: at one fp32 row on AVX-512 (act_bits 0) a TiledGemv's one parallel region;
// otherwise (other batch sizes, int8 activations, the limbs path, no AVX-512) one gemm_tiled after another.
std::vector<at::Tensor> gemm_tiled_many_cpu(const at::Tensor& x, at::TensorList weights, at::TensorList zeros,
                                            at::TensorList scales, int64_t bits, int64_t group_size,
                                            int64_t act_bits) {
  TORCH_CHECK(!weights.empty() && zeros.size() == weights.size() && scales.size() == weights.size(),
              "gemm_tiled_many: needs one or more weights and as many zeros and scales, got ", weights.size(), ", ",
              zeros.size(), " and ", scales.size());
  TORCH_CHECK(x.dim() >= 1, "gemm_tiled_many: x must be [..., k], got a 0-D tensor");
  const at::Tensor x2 = x.dim() == 1 ? x.unsqueeze(0) : x.flatten(0, -2);
  for (size_t i = 0; i < weights.size(); ++i) check_args(x2, weights[i], zeros[i], scales[i], bits, group_size, act_bits);
  const int64_t k = x2.size(1);
  std::vector<at::Tensor> outputs;
#ifdef COMPTRUST_X86
  if (x2.size(0) == 1 && x2.scalar_type() == at::kFloat &&
      direct_many_fits(weights, bits, k, select_isa(), group_size, act_bits)) {
    const TiledGemv bound(weights.vec(), zeros.vec(), scales.vec(), static_cast<int>(bits), k, group_size, act_bits);
    const at::Tensor xf = x2.contiguous();
    std::vector<float*> y;
    for (int64_t n : bound.widths()) {
      std::vector<int64_t> sizes = x.sizes().vec();
      sizes.back() = n;
      outputs.push_back(at::empty(sizes, xf.options()));
      y.push_back(outputs.back().data_ptr<float>());
    }
    bound.run(xf.data_ptr<float>(), y.data());
    return outputs;
  }
#endif
  for (size_t i = 0; i < weights.size(); ++i)
    outputs.push_back(gemm_tiled_cpu(x, weights[i], zeros[i], scales[i], bits, group_size, act_bits));
  return outputs;
}

}  // namespace

std::shared_ptr<const BoundGemv> bind_tiled_gemv(const std::vector<at::Tensor>& weights,
                                                 const std::vector<at::Tensor>& zeros,
                                                 const std::vector<at::Tensor>& scales, int64_t bits,
                                                 int64_t group_size, int64_t act_bits) {
  TORCH_CHECK(!weights.empty() && zeros.size() == weights.size() && scales.size() == weights.size(),
              "bind_tiled_gemv: needs one or more weights and as many zeros and scales");
#ifdef COMPTRUST_X86
  if (bits != 3 && bits != 4) return nullptr;
  const int64_t k = weights[0].dim() > 1 ? weights[0].size(1) * (bits == 4 ? 8 : kInt3BlockRows) : 0;
  const at::Tensor x = at::empty({1, k});  // what check_args reads of x: its shape, dtype and device
  for (size_t i = 0; i < weights.size(); ++i) check_args(x, weights[i], zeros[i], scales[i], bits, group_size, act_bits);
  if (!direct_many_fits(weights, bits, k, select_isa(), group_size, act_bits)) return nullptr;
  return std::make_shared<TiledGemv>(weights, zeros, scales, static_cast<int>(bits), k, group_size, act_bits);
#else
  return nullptr;
#endif
}

}  // namespace comptrust::cpu

TORCH_LIBRARY_IMPL(comptrust, CPU, m) {
  m.impl("gemm_tiled", &comptrust::cpu::gemm_tiled_cpu);
  m.impl("gemm_tiled_many", &comptrust::cpu::gemm_tiled_many_cpu);
}
