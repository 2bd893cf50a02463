// CPU int4/int3/int8 x float GEMM/GEMV over the tiled layout (csrc/include/comptrust/cpu_tiles.h): the ops
// gemm_tiled and gemm_tiled_many, the choice of path (gemm_tiled_2d, run), x's preparation (group sums, int8 codes,
// limbs), the portable scalar kernel and the bound one-row product (TiledGemv). The paths and why each wins where
// it runs: gemm_tiled.h; the SIMD kernels, one family a file: gemm_tiled_avx2.cpp (AVX2 direct and a8),
// gemm_tiled_panel.cpp (float panels, dequantization for the BLAS path), gemm_tiled_avx512.cpp (two-tile direct and
// VNNI), gemm_tiled_stream.cpp (one-stream VNNI at one row), gemm_tiled_bf16.cpp (bf16 panels).
#include "gemm_tiled.h"

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "bound_gemv.h"
#include "dense_blocks.h"
#include "isa.h"

namespace comptrust::cpu {
namespace tiled {
namespace {

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
  const int64_t row = kk % kInt3BlockRows;
  const int q = static_cast<int>(row % 16 / 4), i = static_cast<int>(row % 4);
  const Int3Words words = int3_words(p.k / kInt3BlockRows, kk / kInt3BlockRows, static_cast<int>(row / 16));
  const uint32_t a = static_cast<uint32_t>(tw[words.a + c]) >> (8 * q);
  const uint32_t nibble = static_cast<uint32_t>(tw[words.nibbles + c]) >> (words.shift + 8 * q);
  const uint32_t codes[4] = {a, a >> 3, (a >> 6 & 3) | (nibble >> 1 & 4), nibble};
  return static_cast<int>(codes[i] & 7);
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
// x[0..n) summed in 16 lanes, then across them: a one-accumulator loop is a chain of dependent adds, 0.6 us at
// k = 576 and 1.7 at 1536 here, serial before every decode-step product's parallel region.
COMPTRUST_AVX512 float sum_avx512(const float* x, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(x + j));
  if (j < n) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (n - j)) - 1), x + j));
  return _mm512_reduce_add_ps(acc);
}
#endif  // COMPTRUST_X86

}  // namespace

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

namespace {

// Tiles per task such that a task has at least kMinTaskMacs multiply-adds: below that, waking a second
// thread costs more than it saves. int4 at batch 1, cold weights, one thread against two: 192x576 (110k
// multiply-adds) 12.2 against 15.0 us; 576x576 (332k) 23.2 against 18.9.
constexpr int64_t kMinTaskMacs = 1 << 17;

void run(const Problem& p, bool a8, Isa isa) {
  const int64_t tiles = p.n / kTileCols;
  const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / (p.m * p.k * kTileCols));
#ifdef COMPTRUST_X86
  if (isa != Isa::kScalar) {
    if (!a8 && p.limbs != kLimbs && p.m >= kPanelMinRows) {
      panel_all(p, isa);
      return;
    }
    if ((a8 || p.limbs == kLimbs) && avx512_vnni_usable()) {
      run_vnni_two_tile(p, grain);
      return;
    }
    if (isa == Isa::kAvx512 && p.bits != 8 && !a8) {
      at::parallel_for(0, (tiles + 1) / 2, (grain + 1) / 2, [&](int64_t begin, int64_t end) {
        for (int64_t u = begin; u < end; ++u) direct_rows_avx512(p, u);
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
      for (int64_t t = begin; t < end; ++t) rows_avx2(p, t, a8);
    });
    return;
  }
#endif
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) tile_scalar(p, t, a8);
  });
}

// ------------------------------------------------------------ dequantize + BLAS (float x, large batch)
// The weight dequantized block by block and run through torch's GEMM (dense_blocks.h). bf16 x: a bf16 scratch
// through oneDNN, rounding the weights to bf16 as a bf16 dense model would, from kBlasMinRows rows where no bf16
// panel takes them (against bf16 F.linear, AVX-512 panel / BLAS path: 2.1-2.6x / 2.6-4.4x at 32 rows, 2.8-3.5x /
// 2.3-2.9x at 64). Where the CPU has AMX, bf16 x from 8 to 1023 rows takes the AMX-BF16 tile path instead, and
// without AMX but with AVX512-BF16 the same panels on vdpbf16ps (run_bf16_panels, bf16_panels_for).
// fp32 x: MKL's sgemm, only on the scalar ISA (from kBlasMinRows rows). The SIMD kernels take every batch: at
// 256-1024 rows they run at 85-93% of the FMA peak of their ISA (AVX2 panel, 4096x4096 at 1024 rows: 225 of 242
// GFLOP/s on 2 Zen 5 cores; AVX-512 panel, 1536x576 at 512 rows: 440 of 485), so no sgemm behind a dequantized
// scratch can gain much on them anywhere, and here, where MKL's sgemm runs at AVX2 speed on this AMD CPU, the BLAS
// path ran 0.80-1.02x fp32 F.linear against the SIMD kernels' 1.9-2.7x (int4 and int3, 576x1536, 1536x576 and
// 4096x4096 at 256 to 4096 rows, warm; AVX2 forced: 1.05-1.6x against the BLAS path's 0.55-1.0x from 64 rows).
template <typename Out>
void run_dequantized(const Problem& p, const at::Tensor& x, at::Tensor& y, Isa isa) {
  gemm_by_dense_blocks<Out>(x, y, [&](int64_t t, Out* out, int64_t ld) {
#ifdef COMPTRUST_X86
    if (isa != Isa::kScalar) return dequantize_tile_avx2(p, t, out, ld);
#endif
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t kb = g * p.group_size;
      dequantize_tile_scalar(p, t, g, kb, p.group_end(g), out + kb * ld, ld);
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
// fp32 x on the VNNI kernels (a8_avx512 with LIMBS = 3): each row as three int8 limbs per block of p.block_inputs
// (a group's inputs up to kLimbBlock; int8_limbs.h), blocks restarting at every group as in quantize_rows; x8 rows
// (3 per row of x) in the layout's lane order, block_scale [m * 3][groups * blocks_per_group]. Blocks of 128
// against 32, cold, alternated in one process on Zen 5 (old time / new), 4096 x 4096 and 1536 x 576 at 4 to 32
// rows: int3 1.14-1.19x, int4 1.01-1.09x. Three vpdpbusd of 64 products each do
// the work of 12 fp32 FMAs, so where the CPU has VNNI this beats the fp32 kernels wherever they are
// compute-bound. Side by side (warm, against bf16 F.linear; limbs / the fp32 path they replace):
//   * batch 1, cold weights, against the fp32 direct kernel: int3 1.1-1.25x on the SmolLM2 shapes and 1.6-1.8x
//     on 4096x4096, 11008x4096 and 4096x11008; int4 1.1-1.35x on those three, but 0.83-0.9x on the SmolLM2
//     shapes, where the int4 direct kernel (cheaper to decode than int3's) stays;
//   * layers of 2^22+ weights, 2 rows on: int4 4096x4096 5.1 / 3.3 at 2 rows, 1.76 / 0.94 at 8, 1.11 / 0.75 at
//     16, 0.65 / 0.51 at 64, 0.61 / 0.48 at 128; 11008x4096 alike; against fp32 F.linear 2.2-2.7x at 256 to 4096
//     rows in passes of kRowsPerPass (4096 rows in one pass: 1.86x);
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
  if (weights >= kLimbsMinInt4Weights) return true;
  return weights >= kLimbsMinWeights && m < kLimbsMaxSmallRows && (bits == 3 || m >= kPanelMinRows);
}

void quantize_limbs(const Problem& p, const float* x, int8_t* x8, float* block_scale) {
  const LimbOrder& order = lane_order(Lanes::kTwoTile, p.bits);
  at::parallel_for(0, p.m, 1, [&](int64_t row_begin, int64_t row_end) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    const float* xi = x + i * p.k;
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t kb = g * p.group_size, ke = p.group_end(g);
      for (int64_t b = 0, bk = kb; bk < ke; ++b, bk += p.block_inputs) {
        const int64_t be = std::min(ke, bk + p.block_inputs);
        float steps[kLimbs];
        limb_steps(block_amax(xi + bk, be - bk), steps);
        for (int l = 0; l < kLimbs; ++l) block_scale[((i * kLimbs + l) * p.groups + g) * p.blocks_per_group + b] = steps[l];
        for (int64_t sk = bk; sk < be; sk += kActBlock) {  // lane orders permute within 32 inputs
          int8_t* const out[kLimbs] = {x8 + i * kLimbs * p.k + sk, x8 + (i * kLimbs + 1) * p.k + sk,
                                       x8 + (i * kLimbs + 2) * p.k + sk};
          limbs_with_steps(xi + sk, std::min<int64_t>(be - sk, kActBlock), order, out, steps);
        }
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
  out.block_inputs = kActBlock;
  out.blocks_per_group = p.blocks_per_group;
  out.codes.resize(p.k);
  out.steps.resize(p.groups * p.blocks_per_group);
  quantize_rows(p, x, out.codes.data(), out.steps.data(), group_sum, Lanes::kOneStream);
}

// Whether one row of x on these layers takes the one-stream kernels: int8 activations wherever they fit (x is k
// bytes), fp32 x also while its limbs stay in L1 (limbs_fit_l1).
bool one_stream_for(int64_t bits, int64_t k, int64_t group_size, int64_t act_bits) {
  if (!stream_fits(bits, k, group_size) || !avx512_vnni_usable()) return false;
  return act_bits == 8 || limbs_fit_l1(k);
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
    stream_ = one_stream_for(bits, k, group_size, act_bits);
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
        else direct_rows_avx512(problems[layer], pair);
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
// int3 layers on the one-stream kernels where one_stream_for, whatever their size, others on the two-tile direct
// kernel where they are too small for the int8-limb kernel (limbs_for).
bool direct_many_fits(at::TensorList weights, int64_t bits, int64_t k, Isa isa, int64_t group_size, int64_t act_bits) {
  if (isa != Isa::kAvx512 || bits == 8) return false;
  if (one_stream_for(bits, k, group_size, act_bits)) return true;
  if (act_bits == 8) return false;
  bool fits = true;
  for (const at::Tensor& w : weights) fits = fits && !limbs_for(bits, 1, w.size(0) * kTileCols, k, isa);
  return fits;
}
#endif

// y's p.m rows (at most kRowsPerPass) on the tile kernels: float x on the direct, panel or limb kernels (or the
// tile unit), int8 x (a8) on the a8 kernels, with x's int8 codes or limbs and group sums made for these rows.
void run_rows(Problem p, bool a8, Isa isa) {
#ifdef COMPTRUST_X86
  if (!a8 && amx_fp32_for(p)) return run_amx_fp32(p, p.x, p.y);
  const bool limbs = !a8 && limbs_for(p.bits, p.m, p.n, p.k, isa);
#else
  constexpr bool limbs = false;
#endif
  at::Tensor group_sum;
  if (a8 || limbs) {
    // One allocation for the int8 codes, block scales and group sums (three would cost more than a
    // 576-wide layer's product at batch 1).
    p.limbs = limbs ? kLimbs : 1;
    if (limbs) {
      p.block_inputs = std::min(p.group_size, kLimbBlock);
      p.blocks_per_group = (p.group_size + p.block_inputs - 1) / p.block_inputs;
    }
    const int64_t scale_floats = p.m * p.limbs * p.groups * p.blocks_per_group, sum_floats = p.m * p.groups;
    const int64_t code_floats = (p.m * p.limbs * p.k + sizeof(float) - 1) / sizeof(float);
    group_sum = at::empty({scale_floats + sum_floats + code_floats}, at::kFloat);
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
    group_sum = at::empty({p.m, p.groups}, at::kFloat);
    group_sums_fp32(p, p.x, group_sum.data_ptr<float>());
    p.x_group_sum = group_sum.data_ptr<float>();
  }
  run(p, a8, isa);
}

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
  if (act_bits == 0 && isa == Isa::kScalar && m >= kBlasMinRows) {
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
  // Passes of at most kRowsPerPass rows, as even as they go (300 rows: two of 150), so x's codes or limbs and a
  // pass's rows stay in cache while the tiles stream past them. Rows are independent on every path.
  const int64_t passes = (m + kRowsPerPass - 1) / kRowsPerPass;
  for (int64_t pass = 0, row = 0; pass < passes; ++pass) {
    const int64_t rows = (m - row + (passes - pass) - 1) / (passes - pass);
    Problem part = p;
    part.m = rows;
    part.x = p.x + row * k;
    part.y = p.y + row * n;
    run_rows(part, act_bits == 8, isa);
    row += rows;
  }
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
  std::vector<at::Tensor> outputs;
#ifdef COMPTRUST_X86
  const int64_t k = x2.size(1);
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
}  // namespace tiled

std::shared_ptr<const BoundGemv> bind_tiled_gemv(const std::vector<at::Tensor>& weights,
                                                 const std::vector<at::Tensor>& zeros,
                                                 const std::vector<at::Tensor>& scales, int64_t bits,
                                                 int64_t group_size, int64_t act_bits) {
  TORCH_CHECK(!weights.empty() && zeros.size() == weights.size() && scales.size() == weights.size(),
              "bind_tiled_gemv: needs one or more weights and as many zeros and scales");
  if (bits != 3 && bits != 4) return nullptr;
  // Checked on every build, so a malformed layer is refused when the program is built, not at its first token.
  const int64_t k = weights[0].dim() > 1 ? weights[0].size(1) * (bits == 4 ? 8 : kInt3BlockRows) : 0;
  const at::Tensor x = at::empty({1, k});  // what check_args reads of x: its shape, dtype and device
  for (size_t i = 0; i < weights.size(); ++i)
    tiled::check_args(x, weights[i], zeros[i], scales[i], bits, group_size, act_bits);
#ifdef COMPTRUST_X86
  if (!tiled::direct_many_fits(weights, bits, k, select_isa(), group_size, act_bits)) return nullptr;
  return std::make_shared<tiled::TiledGemv>(weights, zeros, scales, static_cast<int>(bits), k, group_size, act_bits);
#else
  return nullptr;  // the one-row kernels it binds are x86's
#endif
}

}  // namespace comptrust::cpu

TORCH_LIBRARY_IMPL(comptrust, CPU, m) {
  m.impl("gemm_tiled", &comptrust::cpu::tiled::gemm_tiled_cpu);
  m.impl("gemm_tiled_many", &comptrust::cpu::tiled::gemm_tiled_many_cpu);
}
