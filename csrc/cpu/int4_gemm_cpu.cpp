// CPU int4 x float GEMM/GEMV over the GPTQ v1 layout (csrc/include/comptrust/int4_layout.h).
//
// Work split: output columns are cut into tiles; a tile is one task of at::parallel_for (torch's own
// OpenMP pool and thread count). Inside a tile, rows of x go in blocks of kRowBlock so one decode of
// a weight word feeds kRowBlock fused multiply-adds.
//
// Per group we accumulate sum_k x*q and apply zero and scale once at the end of the group, using
//   sum_k x*(q - z)*s = s * (sum_k x*q - z * sum_k x)
// with sum_k x precomputed per (row, group); that keeps the inner loop at shift/permute/fma.
//
// ISA: per-function target attributes, the path picked at run time (isa.h), so a single build runs on
// any x86-64 (and non-x86 builds take the scalar path).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <string>

#include "../int4_checks.h"
#include "comptrust/int4_layout.h"
#include "isa.h"

#ifdef COMPTRUST_X86
#include <immintrin.h>
#endif

namespace comptrust::cpu {
namespace {

struct Int4GemmProblem {
  const float* x;             // [m, k]
  const float* x_group_sums;  // [m, groups]
  const int32_t* qweight;     // [k/8, n]
  const int32_t* qzeros;      // [groups, n/8]
  const at::Half* scales;     // [groups, n]
  float* y;                   // [m, n]
  int64_t m, n, k, group_size, groups;
};

constexpr int kRowBlock = 4;

// ---------------------------------------------------------------- scalar (portable reference path)
void columns_scalar(const Int4GemmProblem& p, int64_t col_begin, int64_t col_end) {
  for (int64_t j = col_begin; j < col_end; ++j) {
    for (int64_t i = 0; i < p.m; ++i) {
      const float* xi = p.x + i * p.k;
      float out = 0.f;
      for (int64_t g = 0; g < p.groups; ++g) {
        const int64_t kb = g * p.group_size, ke = std::min(p.k, kb + p.group_size);
        float acc = 0.f;
        for (int64_t kk = kb; kk < ke; ++kk) {
          uint32_t word = static_cast<uint32_t>(p.qweight[(kk / kInt4PerWord) * p.n + j]);
          acc += xi[kk] * static_cast<float>(int4_at(word, static_cast<int>(kk % kInt4PerWord)));
        }
        const float zero = static_cast<float>(int4_zero_at(p.qzeros + g * (p.n / kInt4PerWord), static_cast<int>(j)));
        const float scale = static_cast<float>(p.scales[g * p.n + j]);
        out += scale * (acc - zero * p.x_group_sums[i * p.groups + g]);
      }
      p.y[i * p.n + j] = out;
    }
  }
}

#ifdef COMPTRUST_X86
// ---------------------------------------------------------------- AVX-512: 64 columns per tile
constexpr int kAvx512Vectors = 4;  // 4 x 16 lanes
constexpr int64_t kAvx512TileCols = 16 * kAvx512Vectors;

template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c"))) void rows_avx512(const Int4GemmProblem& p, int64_t i0,
                                                                               int64_t j0,
                                                                               const __mmask16* mask) {
  // vpermps reads only the low 4 bits of each index lane, so one permute both masks the nibble and
  // converts it to float (a 16-entry table of 0..15), replacing an and + an int->float convert.
  const __m512 code_to_float = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 out[R][kAvx512Vectors];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kAvx512Vectors; ++v) out[r][v] = _mm512_setzero_ps();

  alignas(64) float zeros[kAvx512TileCols];
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t kb = g * p.group_size, ke = std::min(p.k, kb + p.group_size);
    __m512 acc[R][kAvx512Vectors];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < kAvx512Vectors; ++v) acc[r][v] = _mm512_setzero_ps();

    for (int64_t word_row = kb / kInt4PerWord; word_row < ke / kInt4PerWord; ++word_row) {
      const int32_t* wrow = p.qweight + word_row * p.n + j0;
      __m512i w[kAvx512Vectors];
      for (int v = 0; v < kAvx512Vectors; ++v) w[v] = _mm512_maskz_loadu_epi32(mask[v], wrow + 16 * v);
      const float* xcol = p.x + i0 * p.k + word_row * kInt4PerWord;
#pragma GCC unroll 8
      for (int b = 0; b < kInt4PerWord; ++b) {
        __m512 q[kAvx512Vectors];
        for (int v = 0; v < kAvx512Vectors; ++v)
          q[v] = _mm512_permutexvar_ps(b == 0 ? w[v] : _mm512_srli_epi32(w[v], kInt4Bits * b), code_to_float);
        for (int r = 0; r < R; ++r) {
          const __m512 xb = _mm512_set1_ps(xcol[r * p.k + b]);
          for (int v = 0; v < kAvx512Vectors; ++v) acc[r][v] = _mm512_fmadd_ps(q[v], xb, acc[r][v]);
        }
      }
    }

    const int32_t* zrow = p.qzeros + g * (p.n / kInt4PerWord);
    for (int64_t t = 0; t < kAvx512TileCols && j0 + t < p.n; ++t)
      zeros[t] = static_cast<float>(int4_zero_at(zrow, static_cast<int>(j0 + t)));
    for (int v = 0; v < kAvx512Vectors; ++v) {
      const __m512 scale =
          _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask[v], p.scales + g * p.n + j0 + 16 * v));
      const __m512 zero = _mm512_maskz_loadu_ps(mask[v], zeros + 16 * v);
      for (int r = 0; r < R; ++r) {
        const __m512 xsum = _mm512_set1_ps(p.x_group_sums[(i0 + r) * p.groups + g]);
        out[r][v] = _mm512_fmadd_ps(scale, _mm512_fnmadd_ps(zero, xsum, acc[r][v]), out[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kAvx512Vectors; ++v)
      _mm512_mask_storeu_ps(p.y + (i0 + r) * p.n + j0 + 16 * v, mask[v], out[r][v]);
}

__attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c"))) void columns_avx512(const Int4GemmProblem& p,
                                                                                  int64_t tile) {
  const int64_t j0 = tile * kAvx512TileCols;
  __mmask16 mask[kAvx512Vectors];
  for (int v = 0; v < kAvx512Vectors; ++v) {
    const int64_t lanes = std::clamp<int64_t>(p.n - j0 - 16 * v, 0, 16);
    mask[v] = static_cast<__mmask16>((1u << lanes) - 1u);
  }
  int64_t i0 = 0;
  for (; i0 + kRowBlock <= p.m; i0 += kRowBlock) rows_avx512<kRowBlock>(p, i0, j0, mask);
  switch (p.m - i0) {
    case 3: rows_avx512<3>(p, i0, j0, mask); break;
    case 2: rows_avx512<2>(p, i0, j0, mask); break;
    case 1: rows_avx512<1>(p, i0, j0, mask); break;
    default: break;
  }
}

// ---------------------------------------------------------------- AVX2: 8 columns per tile
template <int R>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2(const Int4GemmProblem& p, int64_t i0, int64_t j0) {
  const __m256i nibble = _mm256_set1_epi32(0xF);
  __m256 out[R];
  for (int r = 0; r < R; ++r) out[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t kb = g * p.group_size, ke = std::min(p.k, kb + p.group_size);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t word_row = kb / kInt4PerWord; word_row < ke / kInt4PerWord; ++word_row) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.qweight + word_row * p.n + j0));
      const float* xcol = p.x + i0 * p.k + word_row * kInt4PerWord;
#pragma GCC unroll 8
      for (int b = 0; b < kInt4PerWord; ++b) {
        const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w, kInt4Bits * b), nibble));
        for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(q, _mm256_set1_ps(xcol[r * p.k + b]), acc[r]);
      }
    }
    // One qzeros word holds exactly this tile's 8 zero points (j0 is a multiple of 8).
    const __m256i zword = _mm256_set1_epi32(p.qzeros[g * (p.n / kInt4PerWord) + j0 / kInt4PerWord]);
    const __m256i zshift = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256 zero = _mm256_cvtepi32_ps(_mm256_add_epi32(
        _mm256_and_si256(_mm256_srlv_epi32(zword, zshift), nibble), _mm256_set1_epi32(kGptqV1ZeroOffset)));
    const __m256 scale =
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.scales + g * p.n + j0)));
    for (int r = 0; r < R; ++r) {
      const __m256 xsum = _mm256_set1_ps(p.x_group_sums[(i0 + r) * p.groups + g]);
      out[r] = _mm256_fmadd_ps(scale, _mm256_fnmadd_ps(zero, xsum, acc[r]), out[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(p.y + (i0 + r) * p.n + j0, out[r]);
}

__attribute__((target("avx2,fma,f16c"))) void columns_avx2(const Int4GemmProblem& p, int64_t tile) {
  const int64_t j0 = tile * kInt4PerWord;
  int64_t i0 = 0;
  for (; i0 + kRowBlock <= p.m; i0 += kRowBlock) rows_avx2<kRowBlock>(p, i0, j0);
  switch (p.m - i0) {
    case 3: rows_avx2<3>(p, i0, j0); break;
    case 2: rows_avx2<2>(p, i0, j0); break;
    case 1: rows_avx2<1>(p, i0, j0); break;
    default: break;
  }
}
#endif  // COMPTRUST_X86

void run(const Int4GemmProblem& p, Isa isa) {
  int64_t tile_cols = 64;  // scalar tiles: enough columns per task to amortize scheduling
#ifdef COMPTRUST_X86
  if (isa == Isa::kAvx512) tile_cols = kAvx512TileCols;
  if (isa == Isa::kAvx2) tile_cols = kInt4PerWord;
#endif
  const int64_t tiles = (p.n + tile_cols - 1) / tile_cols;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
#ifdef COMPTRUST_X86
      if (isa == Isa::kAvx512) { columns_avx512(p, tile); continue; }
      if (isa == Isa::kAvx2) { columns_avx2(p, tile); continue; }
#endif
      columns_scalar(p, tile * tile_cols, std::min(p.n, (tile + 1) * tile_cols));
    }
  });
}

at::Tensor int4_gemm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                         const at::Tensor& scales, int64_t group_size) {
  check_int4_gemm_args(x, qweight, qzeros, scales, group_size);
  TORCH_CHECK(x.device().is_cpu(), "int4_gemm (CPU): x is on ", x.device());
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(1);
  const int64_t groups = (k + group_size - 1) / group_size;
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor qw = qweight.contiguous(), qz = qzeros.contiguous(), sc = scales.contiguous();
  // The last group may be partial (k not a multiple of group_size): pad with zeros before summing.
  const at::Tensor x_group_sums =
      at::constant_pad_nd(xf, {0, groups * group_size - k}).view({m, groups, group_size}).sum(-1).contiguous();
  at::Tensor y = at::empty({m, n}, xf.options());
  if (m == 0) return y.to(x.scalar_type());

  Int4GemmProblem p{xf.data_ptr<float>(), x_group_sums.data_ptr<float>(), qw.data_ptr<int32_t>(),
                    qz.data_ptr<int32_t>(), sc.data_ptr<at::Half>(), y.data_ptr<float>(),
                    m, n, k, group_size, groups};
  run(p, select_isa());
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace
}  // namespace comptrust::cpu

TORCH_LIBRARY_IMPL(comptrust, CPU, m) { m.impl("int4_gemm", &comptrust::cpu::int4_gemm_cpu); }
