// The AVX2 kernels of the tiled GEMM (gemm_tiled.h): float x decoded in registers (direct) and int8 x on
// vpmaddubsw (a8), up to kRowBlock rows of x at once. The AVX-512 CPUs take gemm_tiled_avx512.cpp's kernels.
#include "gemm_tiled.h"

#ifdef COMPTRUST_X86
#include <algorithm>
#include <cstring>

namespace comptrust::cpu::tiled {
namespace {

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
        COMPTRUST_UNROLL for (int half = 0; half < 2; ++half) {
          __m256i a, nibbles;
          load_int3_half(tw, p.k / kInt3BlockRows, block, half, a, nibbles);
          const float* xb = x + block * kInt3BlockRows + half * 16;
          _Pragma("GCC unroll 16") for (int j = 0; j < 16; ++j) {
            const __m256 q = int3_codes(a, nibbles, j);
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
        const int64_t block = bk / kInt3BlockRows;
        const int32_t* bw = tw + block * kInt3BlockPlanes * kTileCols;
        prefetch_ahead(bw);
        prefetch_ahead(bw + 16);
        COMPTRUST_UNROLL for (int half = 0; half < 2; ++half) {
          __m256i a, half_nibbles;
          load_int3_half(tw, p.k / kInt3BlockRows, block, half, a, half_nibbles);
          COMPTRUST_UNROLL for (int i = 0; i < 4; ++i) {
            const __m256i codes = int3_code_bytes(a, half_nibbles, i);  // byte q: row 4q + i of the half
            COMPTRUST_UNROLL for (int r = 0; r < R; ++r) {
              const int8_t* xr = p.x8 + (i0 + r) * p.k + bk + half * 16 + i * 4;
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


template <int BITS, bool A8>
COMPTRUST_AVX2 void row_blocks_avx2(const Problem& p, int64_t t) {
  static_assert(!(A8 && BITS == 8), "no a8 path for int8 weights");
  for_each_row_block(p.m, [&](auto rows, int64_t i0) {
    constexpr int R = decltype(rows)::value;
    if constexpr (A8) a8_avx2<BITS, R>(p, t, i0);
    else direct_avx2<BITS, R>(p, t, i0);
  });
}

}  // namespace

void rows_avx2(const Problem& p, int64_t t, bool a8) {
  if (p.bits == 4) a8 ? row_blocks_avx2<4, true>(p, t) : row_blocks_avx2<4, false>(p, t);
  else if (p.bits == 8) row_blocks_avx2<8, false>(p, t);  // check_args refuses a8 for int8 weights
  else a8 ? row_blocks_avx2<3, true>(p, t) : row_blocks_avx2<3, false>(p, t);
}
}  // namespace comptrust::cpu::tiled

#endif  // COMPTRUST_X86
