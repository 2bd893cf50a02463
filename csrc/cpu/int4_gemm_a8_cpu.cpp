// CPU int4-weight x int8-activation GEMV/GEMM (w4a8) over the GPTQ v1 layout.
//
// Why: with float activations every int4 weight costs a shift, a convert and an FMA, so batch-1 decoding
// is compute-bound at about half the memory bandwidth. With x quantized to int8, AVX-512 VNNI's vpdpbusd
// multiplies 4 weight bytes by 4 activation bytes and sums them in one instruction: 128 weights cost
// 2 ands, 1 shift and 2 vpdpbusd, and the kernel reads weights as fast as memory delivers them.
//
// Activation quantization (the reference, comptrust.reference.int4_gemm_a8, does the same in torch):
// per row, per block of up to 32 inputs (blocks restart at each weight group, so a block never spans two
// groups), inv = 127 / max|x|, x8 = round_half_even(x * inv), sx = max|x| / 127; an all-zero block has
// sx = 0 and x8 = 0. Then y = sum_groups s_g * sum_blocks sx_b * (sum q*x8 - z * sum x8), with the inner
// sums exact in int32 (|q*x8| <= 15*127, 32 terms).
//
// vpdpbusd layout: an int32 weight word holds inputs 8r..8r+7 of one output as nibbles. Masking with
// 0x0F0F0F0F leaves bytes = inputs 8r, 8r+2, 8r+4, 8r+6 (the even nibbles); shifting right by 4 first gives
// the odd ones. So activations are pre-arranged per word row as two int32s: even bytes and odd bytes.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../int4_checks.h"
#include "comptrust/int4_layout.h"
#include "isa.h"

#ifdef COMPTRUST_X86
#include <immintrin.h>
#endif

namespace comptrust::cpu {
namespace {

constexpr int64_t kActBlock = 32;  // inputs per activation scale
constexpr int kRowBlock = 4;

struct A8Problem {
  const int32_t* x_even;    // [m, k/8] packed bytes x8[8r], x8[8r+2], x8[8r+4], x8[8r+6]
  const int32_t* x_odd;     // [m, k/8] packed bytes x8[8r+1], ..., x8[8r+7]
  const float* x_scale;     // [m, blocks]
  const int32_t* x_sum;     // [m, blocks] sum of x8 over the block
  const int64_t* block_begin;  // [blocks + 1] first word row of each block
  const int64_t* group_first_block;  // [groups + 1]
  const int32_t* qweight;   // [k/8, n]
  const int32_t* qzeros;    // [groups, n/8]
  const at::Half* scales;   // [groups, n]
  float* y;                 // [m, n]
  int64_t m, n, k, groups, blocks;
};

// Block boundaries in word rows: blocks of kActBlock inputs, restarting at each group.
void make_blocks(int64_t k, int64_t group_size, std::vector<int64_t>& block_begin,
                 std::vector<int64_t>& group_first_block) {
  for (int64_t g0 = 0; g0 < k; g0 += group_size) {
    group_first_block.push_back(static_cast<int64_t>(block_begin.size()));
    const int64_t g1 = std::min(k, g0 + group_size);
    for (int64_t b0 = g0; b0 < g1; b0 += kActBlock) block_begin.push_back(b0 / kInt4PerWord);
  }
  group_first_block.push_back(static_cast<int64_t>(block_begin.size()));
  block_begin.push_back(k / kInt4PerWord);
}

// Quantizes one row of x per block and packs the even/odd bytes for vpdpbusd.
void quantize_row(const float* x, int64_t row, const std::vector<int64_t>& block_begin, int64_t k,
                  int32_t* x_even, int32_t* x_odd, float* x_scale, int32_t* x_sum) {
  const int64_t blocks = static_cast<int64_t>(block_begin.size()) - 1;
  const float* xr = x + row * k;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i0 = block_begin[b] * kInt4PerWord, i1 = block_begin[b + 1] * kInt4PerWord;
    float amax = 0.f;
    for (int64_t i = i0; i < i1; ++i) amax = std::max(amax, std::fabs(xr[i]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    x_scale[row * blocks + b] = amax / 127.f;
    int32_t sum = 0;
    for (int64_t r = i0 / kInt4PerWord; r < i1 / kInt4PerWord; ++r) {
      uint32_t even = 0, odd = 0;
      for (int j = 0; j < 4; ++j) {
        // nearbyint rounds half to even in the default rounding mode, like torch.round.
        const int e = static_cast<int>(std::nearbyint(xr[8 * r + 2 * j] * inv));
        const int o = static_cast<int>(std::nearbyint(xr[8 * r + 2 * j + 1] * inv));
        sum += e + o;
        even |= static_cast<uint32_t>(static_cast<uint8_t>(static_cast<int8_t>(e))) << (8 * j);
        odd |= static_cast<uint32_t>(static_cast<uint8_t>(static_cast<int8_t>(o))) << (8 * j);
      }
      x_even[row * (k / kInt4PerWord) + r] = static_cast<int32_t>(even);
      x_odd[row * (k / kInt4PerWord) + r] = static_cast<int32_t>(odd);
    }
    x_sum[row * blocks + b] = sum;
  }
}

int8_t byte_at(int32_t word, int j) { return static_cast<int8_t>((static_cast<uint32_t>(word) >> (8 * j)) & 0xFF); }

void columns_scalar(const A8Problem& p, int64_t col_begin, int64_t col_end) {
  const int64_t words = p.k / kInt4PerWord;
  for (int64_t j = col_begin; j < col_end; ++j) {
    for (int64_t i = 0; i < p.m; ++i) {
      float out = 0.f;
      for (int64_t g = 0; g < p.groups; ++g) {
        const float zero = static_cast<float>(int4_zero_at(p.qzeros + g * (p.n / kInt4PerWord), static_cast<int>(j)));
        float group_acc = 0.f;
        for (int64_t b = p.group_first_block[g]; b < p.group_first_block[g + 1]; ++b) {
          int32_t acc = 0;
          for (int64_t r = p.block_begin[b]; r < p.block_begin[b + 1]; ++r) {
            const uint32_t w = static_cast<uint32_t>(p.qweight[r * p.n + j]);
            for (int jj = 0; jj < 4; ++jj) {
              acc += int4_at(w, 2 * jj) * byte_at(p.x_even[i * words + r], jj);
              acc += int4_at(w, 2 * jj + 1) * byte_at(p.x_odd[i * words + r], jj);
            }
          }
          group_acc += p.x_scale[i * p.blocks + b] *
                       (static_cast<float>(acc) - zero * static_cast<float>(p.x_sum[i * p.blocks + b]));
        }
        out += static_cast<float>(p.scales[g * p.n + j]) * group_acc;
      }
      p.y[i * p.n + j] = out;
    }
  }
}

#ifdef COMPTRUST_X86
constexpr int kVnniVectors = 4;  // 64 output columns per tile
constexpr int64_t kVnniTileCols = 16 * kVnniVectors;

template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c"))) void rows_vnni(
    const A8Problem& p, int64_t i0, int64_t j0, const __mmask16* mask) {
  const __m512i low_nibbles = _mm512_set1_epi32(0x0F0F0F0F);
  const int64_t words = p.k / kInt4PerWord;
  __m512 out[R][kVnniVectors];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVnniVectors; ++v) out[r][v] = _mm512_setzero_ps();
  alignas(64) float zeros[kVnniTileCols];

  for (int64_t g = 0; g < p.groups; ++g) {
    const int32_t* zrow = p.qzeros + g * (p.n / kInt4PerWord);
    for (int64_t t = 0; t < kVnniTileCols && j0 + t < p.n; ++t)
      zeros[t] = static_cast<float>(int4_zero_at(zrow, static_cast<int>(j0 + t)));
    __m512 zero[kVnniVectors], group_acc[R][kVnniVectors];
    for (int v = 0; v < kVnniVectors; ++v) zero[v] = _mm512_maskz_loadu_ps(mask[v], zeros + 16 * v);
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < kVnniVectors; ++v) group_acc[r][v] = _mm512_setzero_ps();

    for (int64_t b = p.group_first_block[g]; b < p.group_first_block[g + 1]; ++b) {
      __m512i acc[R][kVnniVectors];
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < kVnniVectors; ++v) acc[r][v] = _mm512_setzero_si512();
      for (int64_t word_row = p.block_begin[b]; word_row < p.block_begin[b + 1]; ++word_row) {
        const int32_t* wrow = p.qweight + word_row * p.n + j0;
        __m512i even[kVnniVectors], odd[kVnniVectors];
        for (int v = 0; v < kVnniVectors; ++v) {
          const __m512i w = _mm512_maskz_loadu_epi32(mask[v], wrow + 16 * v);
          even[v] = _mm512_and_si512(w, low_nibbles);
          odd[v] = _mm512_and_si512(_mm512_srli_epi32(w, kInt4Bits), low_nibbles);
        }
        for (int r = 0; r < R; ++r) {
          const __m512i xe = _mm512_set1_epi32(p.x_even[(i0 + r) * words + word_row]);
          const __m512i xo = _mm512_set1_epi32(p.x_odd[(i0 + r) * words + word_row]);
          for (int v = 0; v < kVnniVectors; ++v) {
            acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], even[v], xe);
            acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], odd[v], xo);
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512 sx = _mm512_set1_ps(p.x_scale[(i0 + r) * p.blocks + b]);
        const __m512 xsum = _mm512_set1_ps(static_cast<float>(p.x_sum[(i0 + r) * p.blocks + b]));
        for (int v = 0; v < kVnniVectors; ++v)
          group_acc[r][v] =
              _mm512_fmadd_ps(sx, _mm512_fnmadd_ps(zero[v], xsum, _mm512_cvtepi32_ps(acc[r][v])), group_acc[r][v]);
      }
    }
    for (int v = 0; v < kVnniVectors; ++v) {
      const __m512 scale = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask[v], p.scales + g * p.n + j0 + 16 * v));
      for (int r = 0; r < R; ++r) out[r][v] = _mm512_fmadd_ps(scale, group_acc[r][v], out[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVnniVectors; ++v)
      _mm512_mask_storeu_ps(p.y + (i0 + r) * p.n + j0 + 16 * v, mask[v], out[r][v]);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c"))) void columns_vnni(const A8Problem& p,
                                                                                           int64_t tile) {
  const int64_t j0 = tile * kVnniTileCols;
  __mmask16 mask[kVnniVectors];
  for (int v = 0; v < kVnniVectors; ++v) {
    const int64_t lanes = std::clamp<int64_t>(p.n - j0 - 16 * v, 0, 16);
    mask[v] = static_cast<__mmask16>((1u << lanes) - 1u);
  }
  int64_t i0 = 0;
  for (; i0 + kRowBlock <= p.m; i0 += kRowBlock) rows_vnni<kRowBlock>(p, i0, j0, mask);
  switch (p.m - i0) {
    case 3: rows_vnni<3>(p, i0, j0, mask); break;
    case 2: rows_vnni<2>(p, i0, j0, mask); break;
    case 1: rows_vnni<1>(p, i0, j0, mask); break;
    default: break;
  }
}
#endif  // COMPTRUST_X86

at::Tensor int4_gemm_a8_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                            const at::Tensor& scales, int64_t group_size) {
  check_int4_gemm_args(x, qweight, qzeros, scales, group_size);
  TORCH_CHECK(x.device().is_cpu(), "int4_gemm_a8 (CPU): x is on ", x.device());
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(1);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor qw = qweight.contiguous(), qz = qzeros.contiguous(), sc = scales.contiguous();
  at::Tensor y = at::empty({m, n}, xf.options());
  if (m == 0) return y.to(x.scalar_type());

  std::vector<int64_t> block_begin, group_first_block;
  make_blocks(k, group_size, block_begin, group_first_block);
  const int64_t blocks = static_cast<int64_t>(block_begin.size()) - 1;
  const auto int_options = xf.options().dtype(at::kInt);
  at::Tensor x_even = at::empty({m, k / kInt4PerWord}, int_options), x_odd = at::empty_like(x_even);
  at::Tensor x_scale = at::empty({m, blocks}, xf.options()), x_sum = at::empty({m, blocks}, int_options);
  const float* xp = xf.data_ptr<float>();
  at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      quantize_row(xp, row, block_begin, k, x_even.data_ptr<int32_t>(), x_odd.data_ptr<int32_t>(),
                   x_scale.data_ptr<float>(), x_sum.data_ptr<int32_t>());
  });

  const A8Problem p{x_even.data_ptr<int32_t>(), x_odd.data_ptr<int32_t>(), x_scale.data_ptr<float>(),
                    x_sum.data_ptr<int32_t>(), block_begin.data(), group_first_block.data(),
                    qw.data_ptr<int32_t>(), qz.data_ptr<int32_t>(), sc.data_ptr<at::Half>(),
                    y.data_ptr<float>(), m, n, k, static_cast<int64_t>(group_first_block.size()) - 1, blocks};
  bool vnni = false;
#ifdef COMPTRUST_X86
  vnni = select_isa() == Isa::kAvx512 && cpu_has_avx512_vnni();
  const int64_t tile_cols = vnni ? kVnniTileCols : 64;
#else
  const int64_t tile_cols = 64;
#endif
  const int64_t tiles = (n + tile_cols - 1) / tile_cols;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
#ifdef COMPTRUST_X86
      if (vnni) { columns_vnni(p, tile); continue; }
#endif
      columns_scalar(p, tile * tile_cols, std::min(n, (tile + 1) * tile_cols));
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace
}  // namespace comptrust::cpu

TORCH_LIBRARY_IMPL(comptrust, CPU, m) { m.impl("int4_gemm_a8", &comptrust::cpu::int4_gemm_a8_cpu); }
