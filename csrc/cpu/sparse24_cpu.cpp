// CPU 2:4 sparse x float GEMM/GEMV over the tiled 2:4 layout (csrc/include/comptrust/sparse24_tiles.h): the ops
// sparse24_gemm_tiled and sparse24_int4_gemm_tiled, the choice of path (run_kind, run), x's preparation (int8 codes,
// limbs), the portable scalar kernel and the bound one-row products (Sparse24Gemv, Sparse24Int4A8Gemv). The paths
// and why each wins where it runs: sparse24.h; the SIMD kernels, one family a file: sparse24_avx2.cpp,
// sparse24_avx512.cpp, sparse24_vnni.cpp (int4 values on int8 x), sparse24_bf16.cpp (bf16 panels), and the
// row-vector kernel (sparse24_row_vectors.h).
#include "sparse24.h"

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "bound_gemv.h"
#include "dense_blocks.h"
#include "isa.h"
#include "sparse24_row_vectors.h"

namespace comptrust::cpu {
namespace sparse24 {
namespace {

// ------------------------------------------------------------------------------------------ scalar
// Kept value j of group g in column c of tile t, dequantized.
template <class V>
float kept_value(const Sparse24Problem& p, int64_t t, int64_t g, int j, int c) {
  if constexpr (std::is_same_v<V, Int4Values>) {
    const int64_t kept = kSparse24Kept * g + j;
    const uint32_t word = static_cast<uint32_t>(p.tile_words(t)[(kept / 8) * kTileCols + c]);
    const int code = static_cast<int>((word >> (4 * (kept % 8))) & 0xF);
    const int64_t qg = kept / p.group_size;
    return (static_cast<float>(code) - p.tile_zeros(t)[qg * kTileCols + c]) *
           static_cast<float>(p.tile_scales(t)[qg * kTileCols + c]);
  } else {
    return to_float(p.tile_values<V>(t)[(g * kSparse24Kept + j) * kTileCols + c]);
  }
}

template <class V>
void tile_scalar(const Sparse24Problem& p, int64_t t) {
  const uint32_t* tm = p.tile_meta(t);
  for (int64_t i = 0; i < p.m; ++i) {
    const float* x = p.x + i * p.k;
    for (int c = 0; c < kTileCols; ++c) {
      float out = 0.f;
      for (int64_t g = 0; g < p.sparse_groups(); ++g) {
        const uint32_t nibble = (tm[g] >> (4 * c)) & 0xF;
        out += kept_value<V>(p, t, g, 0, c) * x[kSparse24Group * g + (nibble & 3)] +
               kept_value<V>(p, t, g, 1, c) * x[kSparse24Group * g + (nibble >> 2)];
      }
      p.y[i * p.n + t * kTileCols + c] = out;
    }
  }
}

// Tile t as dense W^T rows: out[kk][0..7] for kk = 0..k-1, rows ld elements apart (zeros where pruned).
template <class V, typename Out>
void expand_tile_scalar(const Sparse24Problem& p, int64_t t, Out* out, int64_t ld) {
  const uint32_t* tm = p.tile_meta(t);
  for (int64_t g = 0; g < p.sparse_groups(); ++g) {
    for (int64_t i = 0; i < kSparse24Group; ++i) std::fill_n(out + (kSparse24Group * g + i) * ld, kTileCols, Out(0.f));
    for (int c = 0; c < kTileCols; ++c) {
      const uint32_t nibble = (tm[g] >> (4 * c)) & 0xF;
      out[(kSparse24Group * g + (nibble & 3)) * ld + c] = static_cast<Out>(kept_value<V>(p, t, g, 0, c));
      out[(kSparse24Group * g + (nibble >> 2)) * ld + c] = static_cast<Out>(kept_value<V>(p, t, g, 1, c));
    }
  }
}

// Rows of x per task of the activation loops below: one task for a few rows of a small layer.
inline int64_t activation_rows_grain(int64_t k) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)); }

// x8[i, k] (natural order) and block_scale[i, groups * blocks_per_group] for rows of x [m, k].
void quantize_rows_int8(const float* x, int64_t m, int64_t k, int64_t group_inputs, int8_t* x8, float* block_scale) {
  const int64_t groups = (k + group_inputs - 1) / group_inputs, per_group = (group_inputs + kActBlock - 1) / kActBlock;
#ifdef COMPTRUST_X86
  const bool avx512 = select_isa() == Isa::kAvx512;
#endif
  at::parallel_for(0, m, activation_rows_grain(k), [&](int64_t row_begin, int64_t row_end) {
    for (int64_t i = row_begin; i < row_end; ++i) {
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t b = 0; b < per_group; ++b) {
          const int64_t begin = g * group_inputs + b * kActBlock;
          const int64_t end = std::min({begin + kActBlock, (g + 1) * group_inputs, k});
#ifdef COMPTRUST_X86
          if (avx512 && end - begin == kActBlock) {
            block_scale[(i * groups + g) * per_group + b] = quantize_block_int8(x + i * k + begin, x8 + i * k + begin);
            continue;
          }
#endif
          float amax = 0.f;
          for (int64_t kk = begin; kk < end; ++kk) amax = std::max(amax, std::abs(x[i * k + kk]));
          const float inv = amax > 0.f ? 127.f / amax : 0.f;  // a true division, as the reference
          for (int64_t kk = begin; kk < end; ++kk)
            x8[i * k + kk] = static_cast<int8_t>(round_int8_range(x[i * k + kk] * inv));
          block_scale[(i * groups + g) * per_group + b] = amax / 127.f;
        }
      }
    }
  });
}

// out[m, k] = x8 times its block scales (quantize_rows_int8's layouts): the int8 activations as the float
// kernels take them (the fallback where the CPU lacks VNNI or VBMI).
void dequantize_rows_int8(const int8_t* x8, const float* block_scale, int64_t m, int64_t k, int64_t group_inputs,
                          float* out) {
  const int64_t groups = (k + group_inputs - 1) / group_inputs, per_group = (group_inputs + kActBlock - 1) / kActBlock;
  at::parallel_for(0, m, activation_rows_grain(k), [&](int64_t row_begin, int64_t row_end) {
    for (int64_t i = row_begin; i < row_end; ++i)
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t b = 0; b < per_group; ++b) {
          const int64_t begin = g * group_inputs + b * kActBlock;
          const int64_t end = std::min({begin + kActBlock, (g + 1) * group_inputs, k});
          const float scale = block_scale[(i * groups + g) * per_group + b];
          for (int64_t kk = begin; kk < end; ++kk) out[i * k + kk] = static_cast<float>(x8[i * k + kk]) * scale;
        }
  });
}

#ifdef COMPTRUST_X86
// x8[i * kLimbs + l, k] (natural order) and block_scale[i * kLimbs + l, groups * blocks_per_group]: limb l of
// rows of fp32 x [m, k] (int8_limbs.h), blocks of block_inputs (a multiple of kActBlock) restarting at every
// group, as quantize_rows_int8's with block_inputs = kActBlock.
void quantize_rows_limbs(const float* x, int64_t m, int64_t k, int64_t group_inputs, int64_t block_inputs, int8_t* x8,
                         float* block_scale) {
  static const LimbOrder kNatural = limb_order([](int j) { return j; });
  const int64_t groups = (k + group_inputs - 1) / group_inputs;
  const int64_t per_group = (group_inputs + block_inputs - 1) / block_inputs;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t b = 0; b < per_group; ++b) {
        const int64_t begin = g * group_inputs + b * block_inputs;
        const int64_t end = std::min({begin + block_inputs, (g + 1) * group_inputs, k});
        float steps[kLimbs];
        limb_steps(block_amax(x + i * k + begin, std::max<int64_t>(0, end - begin)), steps);
        for (int l = 0; l < kLimbs; ++l) block_scale[((i * kLimbs + l) * groups + g) * per_group + b] = steps[l];
        for (int64_t sub = begin; sub < end; sub += kActBlock) {
          int8_t* const out[kLimbs] = {x8 + i * kLimbs * k + sub, x8 + (i * kLimbs + 1) * k + sub,
                                       x8 + (i * kLimbs + 2) * k + sub};
          limbs_with_steps(x + i * k + sub, std::min<int64_t>(end - sub, kActBlock), kNatural, out, steps);
        }
      }
}
#endif  // COMPTRUST_X86

// Tiles per task such that a task has at least kMinTaskMacs multiply-adds (as gemm_tiled_cpu.cpp).
constexpr int64_t kMinTaskMacs = 1 << 15;

template <class V>
void run(const Sparse24Problem& p, Isa isa) {
  const int64_t tiles = p.n / kTileCols;
  const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / (p.m * (p.k / kSparse24Kept) * kTileCols));
#ifdef COMPTRUST_X86
  if (isa == Isa::kAvx512) {
    // Batch 1 with float values on layers of at least kStreamTilesMin tiles: kStreamTiles tiles per task unless the
    // CPU reads one weight stream per thread best (int4 values are bound by their decoding, and ran slower that way).
    if constexpr (!std::is_same_v<V, Int4Values>) {
      if (p.m == 1 && tiles >= kStreamTilesMin && !one_weight_stream()) {
        const int64_t groups = tiles / kStreamTiles;
        at::parallel_for(0, groups + tiles % kStreamTiles, 1, [&](int64_t begin, int64_t end) {
          for (int64_t u = begin; u < end; ++u) {
            if (u < groups) stream_tiles_avx512<V>(p, u * kStreamTiles);
            else one_row_avx512<V>(p, u + groups * (kStreamTiles - 1));
          }
        });
        return;
      }
    }
    at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) rows_avx512<V>(p, t);
    });
    return;
  }
  if (isa == Isa::kAvx2) {
    at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) rows_avx2<V>(p, t);
    });
    return;
  }
#endif
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) tile_scalar<V>(p, t);
  });
}

// ------------------------------------------------------------------------------------ entry points
int64_t check_x_and_meta(const char* op, const at::Tensor& x, const at::Tensor& meta) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [m, k], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  const int64_t k = x.size(1);
  TORCH_CHECK(k > 0 && k % 8 == 0, op, ": k=", k, " must be a positive multiple of 8");
  TORCH_CHECK(meta.scalar_type() == at::kInt, op, ": meta must be int32 (tiled), got ", meta.scalar_type());
  TORCH_CHECK(meta.dim() == 2 && meta.size(0) > 0 && meta.size(1) == k / kSparse24Group, op, ": meta is ",
              meta.sizes(), ", expected [n/8, k/4=", k / kSparse24Group, "] for k=", k);
  return meta.size(0);
}

void check_cpu(const char* op, std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors)
    TORCH_CHECK(t->device().is_cpu(), op, " (CPU): every tensor must be on the CPU, got one on ", t->device());
}

// From kDenseMinRows rows on, blocks of tiles are expanded to dense rows and run through torch's GEMM
// (dense_blocks.h): multiplying the pruned zeros at BLAS speed beats skipping them in the column kernels
// there. Measured against dense fp32 F.linear, side by side on SmolLM2 and 4096x4096 shapes (direct /
// expanded): 256 rows 1.3-1.6x / 1.1-1.25x, 3072 rows 2.0-2.9x / 0.9-1.25x; 128 rows about even (direct
// ahead for fp32 values, behind for int4 ones); 64 rows 0.7-1.3x / 1.5-1.9x. On AVX-512 the row-vector kernel
// takes float x from 32 rows on, bf16 x from 32 to 511, so there this path serves bf16 x from kRowVectorMaxRows.
// (kDenseMinRows: sparse24.h.)
template <class V, typename Out>
void run_expanded(const Sparse24Problem& p, const at::Tensor& x, at::Tensor& y, Isa isa) {
  gemm_by_dense_blocks<Out>(x, y, [&](int64_t t, Out* out, int64_t ld) {
#ifdef COMPTRUST_X86
    if (isa != Isa::kScalar) return expand_tile_avx2<V>(p, t, out, ld);
#endif
    expand_tile_scalar<V>(p, t, out, ld);
  });
}

at::Tensor run_int4_int8(Sparse24Problem& p, const at::Tensor& x, bool limbs);
constexpr int64_t kLimbsMinWeights = int64_t{1} << 22;

template <class V>
at::Tensor run_kind(Sparse24Problem& p, const at::Tensor& x) {
  const Isa isa = select_isa();
#ifdef COMPTRUST_X86
  // fp32 x at batch 1 with int4 values on layers of at least kLimbsMinWeights: as int8 limbs on the VNNI kernel
  // (int8_limbs.h), fp32-accurate. Against dense fp32 F.linear, side by side on cold weights, limbs / float
  // kernel: 4096x4096 5.78x / 4.79x, 11008x4096 5.68x / 5.01x, 4096x11008 6.17x / 4.53x; on the SmolLM2 shapes
  // 0.77-1.16x the float kernel's speed, which stays there.
  if constexpr (std::is_same_v<V, Int4Values>)
    if (p.m == 1 && p.n * p.k >= kLimbsMinWeights && isa == Isa::kAvx512 && avx512_vnni_vbmi_usable())
      return run_int4_int8(p, x, true);
#endif
#ifdef COMPTRUST_X86
  if (x.scalar_type() == at::kBFloat16 && bf16_panels_for(p)) {
    const at::Tensor xb = x.contiguous();
    at::Tensor y = at::empty({p.m, p.n}, x.options());
    run_bf16_panels<V>(p, AmxActivations{xb.data_ptr<at::BFloat16>(), 1, nullptr}, y.data_ptr<at::BFloat16>());
    return y;
  }
  if (x.scalar_type() != at::kBFloat16 && amx_fp32_for<V>(p, isa)) {
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    const at::Tensor planes = at::empty({3, p.m, p.k}, at::kBFloat16);
    split_fp32_rows(xf.data_ptr<float>(), p.m, p.k, planes.data_ptr<at::BFloat16>());
    at::Tensor y = at::empty({p.m, p.n}, xf.options());
    run_bf16_panels<V>(p, AmxActivations{planes.data_ptr<at::BFloat16>(), 3, nullptr}, y.data_ptr<float>());
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  // From kRowVectorMinRows rows (bf16 x: up to kRowVectorMaxRows, where oneDNN's bf16 GEMM on expanded blocks
  // takes over): vectorized over x's rows (sparse24_row_vectors.h), multiplying only the kept weights.
  if (isa == Isa::kAvx512 && p.m >= kRowVectorMinRows &&
      (p.m < kRowVectorMaxRows || x.scalar_type() != at::kBFloat16)) {
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    at::Tensor y;
    if constexpr (std::is_same_v<V, Int4Values>)
      y = sparse24_row_vectors(
          xf, Int4KeptValues{p.tile_words(0), p.zeros, p.scales, p.sparse_groups(), p.groups, p.group_size}, p.meta, p.n);
    else
      y = sparse24_row_vectors(xf, FloatKeptValues<V>{static_cast<const V*>(p.values), p.sparse_groups()}, p.meta, p.n);
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
#endif
  if (p.m >= kDenseMinRows) {
    if (x.scalar_type() == at::kBFloat16) {
      at::Tensor y = at::empty({p.m, p.n}, x.options());
      run_expanded<V, at::BFloat16>(p, x.contiguous(), y, isa);
      return y;
    }
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    at::Tensor y = at::empty({p.m, p.n}, xf.options());
    run_expanded<V, float>(p, xf, y, isa);
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({p.m, p.n}, xf.options());
  p.x = xf.data_ptr<float>();
  p.y = y.data_ptr<float>();
  if (p.m > 0) run<V>(p, isa);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// int4 values on the VNNI kernel (a8_int4_avx512): int8 activations (act_bits = 8), or at batch 1 fp32 ones as
// int8 limbs (limbs, where avx512_vnni_vbmi_usable()). Without VNNI + VBMI, int8 activations run the float
// kernels on the dequantized int8 x (the same product, as the reference computes it).
at::Tensor run_int4_int8(Sparse24Problem& p, const at::Tensor& x, bool limbs) {
  if (p.m == 0) return at::empty({0, p.n}, x.options());
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  TORCH_INTERNAL_ASSERT(!limbs || p.m == 1, "sparse24_int4_gemm_tiled: int8 limbs at batch 1 only");
#ifdef COMPTRUST_X86
  const bool one_tile = p.m == 1 && stream_int4_fits(p, limbs);  // stream_int4_tile, tile by tile
  const int64_t block_inputs = one_tile ? stream_int4_block_inputs(p, limbs) : kActBlock;
#else
  const int64_t block_inputs = kActBlock;
#endif
  const int64_t group_inputs = 2 * p.group_size, per_group = (group_inputs + block_inputs - 1) / block_inputs;
  const int64_t rows = p.m * (limbs ? kLimbs : 1);
  at::Tensor x8 = at::empty({rows, p.k}, xf.options().dtype(at::kChar));
  at::Tensor block_scale = at::empty({rows, p.groups * per_group}, xf.options());
#ifdef COMPTRUST_X86
  if (limbs)
    quantize_rows_limbs(xf.data_ptr<float>(), p.m, p.k, group_inputs, block_inputs, x8.data_ptr<int8_t>(),
                        block_scale.data_ptr<float>());
  else
#endif
    quantize_rows_int8(xf.data_ptr<float>(), p.m, p.k, group_inputs, x8.data_ptr<int8_t>(), block_scale.data_ptr<float>());
#ifdef COMPTRUST_X86
  if (avx512_vnni_vbmi_usable()) {
    at::Tensor y = at::empty({p.m, p.n}, xf.options());
    p.y = y.data_ptr<float>();
    const int64_t pairs = (p.n / kTileCols + 1) / 2;
    const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / (p.m * p.k * kTileCols));  // pairs per task
    const int8_t* x8_data = x8.data_ptr<int8_t>();
    const float* x_scales = block_scale.data_ptr<float>();
    // One row, tile by tile where it fits: against the pair units below, cold, alternated in one process (old
    // time / new), fp32 x as limbs 4096 x 4096 1.43x, 11008 x 4096 1.62x, 4096 x 11008 1.81x (then 1.13-1.37x as
    // fast as dense int4's one-stream kernel, which it trailed at 0.75-0.79x); int8 x 1.49-1.52x, SmolLM2's 576 x
    // 1536 and 1536 x 576 2.0-2.1x.
    if (one_tile) {
      to_stream_int4_order(x8.data_ptr<int8_t>(), rows, p.k);
      const int64_t tiles_per_task = std::max<int64_t>(1, kMinTaskMacs / (p.k * kTileCols));
      at::parallel_for(0, p.n / kTileCols, tiles_per_task, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) stream_int4_tile(p, x8_data, x_scales, t, limbs);
      });
      return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
    }
    const int64_t units = p.m == 1 ? a8_row_units(p) : 0;
    at::parallel_for(0, units + pairs - units * kStreamA8Pairs, units ? 1 : grain, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        if (p.m == 1) a8_int4_row_unit(p, x8_data, x_scales, u, units, limbs);
        else a8_int4_rows(p, x8_data, x_scales, u);
      }
    });
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
#endif
  TORCH_CHECK(!limbs, "sparse24_int4_gemm_tiled: int8 limbs need AVX-512 VNNI and VBMI");  // callers check
  at::Tensor dequantized = at::empty({p.m, p.k}, xf.options());
  dequantize_rows_int8(x8.data_ptr<int8_t>(), block_scale.data_ptr<float>(), p.m, p.k, group_inputs,
                       dequantized.data_ptr<float>());
  const at::Tensor y = run_kind<Int4Values>(p, dequantized);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor run_problem(Sparse24Problem& p, const at::Tensor& x, at::ScalarType kind) {
  switch (kind) {
    case at::kFloat: return run_kind<float>(p, x);
    case at::kBFloat16: return run_kind<at::BFloat16>(p, x);
    case at::kHalf: return run_kind<at::Half>(p, x);
    default: return run_kind<Int4Values>(p, x);  // kInt: int4 words
  }
}

// x [..., k] -> y [..., n], as F.linear (and gemm_tiled_cpu).
template <class Op>
at::Tensor on_rows(const char* op, const at::Tensor& x, Op&& run_2d) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., k], got a 0-D tensor");
  const at::Tensor y = run_2d(x.dim() == 1 ? x.unsqueeze(0) : x.flatten(0, -2));
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = y.size(1);
  return y.view(sizes);
}

// Both ops' checks of (x, tensors) and their problem over x's rows, pointing into the tensors (which the caller
// keeps alive: the ops pass contiguous copies, bind_sparse24_* require contiguous tensors).
Sparse24Problem float_problem(const char* op, const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta) {
  check_cpu(op, {&x, &values, &meta});
  const int64_t tiles = check_x_and_meta(op, x, meta), k = x.size(1);
  const auto kind = values.scalar_type();
  TORCH_CHECK(kind == at::kFloat || kind == at::kBFloat16 || kind == at::kHalf, op,
              ": values must be float32, bfloat16 or float16, got ", kind);
  TORCH_CHECK(values.dim() == 4 && values.size(0) == tiles && values.size(1) == k / kSparse24Group &&
                  values.size(2) == kSparse24Kept && values.size(3) == kTileCols,
              op, ": values is ", values.sizes(), ", expected [", tiles, ", ", k / kSparse24Group, ", 2, 8] for n=",
              tiles * kTileCols, ", k=", k);
  return Sparse24Problem{nullptr, values.data_ptr(), reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>()),
                         nullptr, nullptr, nullptr, x.size(0), tiles * kTileCols, k, k / kSparse24Kept, 1};
}

Sparse24Problem int4_problem(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& meta,
                             const at::Tensor& zeros, const at::Tensor& scales, int64_t group_size) {
  check_cpu(op, {&x, &weight, &meta, &zeros, &scales});
  const int64_t tiles = check_x_and_meta(op, x, meta), k = x.size(1);
  TORCH_CHECK(k % 16 == 0, op, ": k=", k, " must be a multiple of 16 (k/2 kept values, 8 per int32 word)");
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0, op, ": group_size=", group_size,
              " (kept values) must be a positive multiple of 8");
  TORCH_CHECK(weight.scalar_type() == at::kInt, op, ": weight must be int32, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == tiles && weight.size(1) == k / 16 && weight.size(2) == kTileCols,
              op, ": weight is ", weight.sizes(), ", expected [", tiles, ", ", k / 16, ", 8] for k=", k);
  TORCH_CHECK(zeros.scalar_type() == at::kByte, op, ": zeros must be uint8, got ", zeros.scalar_type());
  TORCH_CHECK(scales.scalar_type() == at::kHalf, op, ": scales must be float16, got ", scales.scalar_type());
  const int64_t kept = k / kSparse24Kept, groups = (kept + group_size - 1) / group_size;
  for (const at::Tensor* t : {&zeros, &scales})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == tiles && t->size(1) == groups && t->size(2) == kTileCols, op, ": ",
                (t == &zeros ? "zeros" : "scales"), " is ", t->sizes(), ", expected [", tiles, ", ", groups,
                ", 8] for k=", k, ", group_size=", group_size);
  return Sparse24Problem{nullptr, weight.data_ptr(), reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>()),
                         zeros.data_ptr<uint8_t>(), scales.data_ptr<at::Half>(), nullptr, x.size(0), tiles * kTileCols,
                         k, group_size, groups};
}

at::Tensor sparse24_gemm_tiled_2d(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta) {
  const at::Tensor v = values.contiguous(), mt = meta.contiguous();
  Sparse24Problem p = float_problem("sparse24_gemm_tiled", x, v, mt);
  return run_problem(p, x, v.scalar_type());
}

at::Tensor sparse24_int4_gemm_tiled_2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& meta,
                                       const at::Tensor& zeros, const at::Tensor& scales, int64_t group_size,
                                       int64_t act_bits) {
  TORCH_CHECK(act_bits == 0 || act_bits == 8, "sparse24_int4_gemm_tiled: act_bits=", act_bits,
              " must be 0 (float activations) or 8");
  const at::Tensor w = weight.contiguous(), mt = meta.contiguous(), z = zeros.contiguous(), s = scales.contiguous();
  Sparse24Problem p = int4_problem("sparse24_int4_gemm_tiled", x, w, mt, z, s, group_size);
  if (act_bits == 8) return run_int4_int8(p, x, false);
  return run_problem(p, x, at::kInt);
}

at::Tensor sparse24_gemm_tiled_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta) {
  return on_rows("sparse24_gemm_tiled", x, [&](const at::Tensor& x2d) { return sparse24_gemm_tiled_2d(x2d, values, meta); });
}

at::Tensor sparse24_int4_gemm_tiled_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& meta,
                                        const at::Tensor& zeros, const at::Tensor& scales, int64_t group_size,
                                        int64_t act_bits) {
  return on_rows("sparse24_int4_gemm_tiled", x, [&](const at::Tensor& x2d) {
    return sparse24_int4_gemm_tiled_2d(x2d, weight, meta, zeros, scales, group_size, act_bits);
  });
}

#ifdef COMPTRUST_X86
// What the two bound 2:4 products share: the layers' problems (checked when bound) and the tensors they point into.
class BoundSparse24 : public BoundGemv {
 protected:
  BoundSparse24(std::vector<at::Tensor> tensors, std::vector<Sparse24Problem> problems)
      : tensors_(std::move(tensors)), problems_(std::move(problems)) {
    k_ = problems_[0].k;
    for (const Sparse24Problem& p : problems_) widths_.push_back(p.n);
  }

  std::vector<at::Tensor> tensors_;  // what the problems point into
  std::vector<Sparse24Problem> problems_;
};

// One fp32 row through 2:4 layers of one input, bound once (bound_gemv.h): all the layers' tiles shared out in one
// parallel region, each tile on the kernel the ops run it on at m == 1 (the float values' kStreamTiles kernel
// computes each of its tiles exactly as the one-tile kernel does), so the outputs are bit-identical to the ops'.
// V: the kept values' storage (float kinds or Int4Values).
template <class V>
class Sparse24Gemv final : public BoundSparse24 {
 public:
  Sparse24Gemv(std::vector<at::Tensor> tensors, std::vector<Sparse24Problem> problems)
      : BoundSparse24(std::move(tensors), std::move(problems)) {
    first_tile_.push_back(0);
    for (const Sparse24Problem& p : problems_) first_tile_.push_back(first_tile_.back() + p.n / kTileCols);
  }

  void run(const float* x, float* const* y) const override {
    const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / ((k_ / kSparse24Kept) * kTileCols));
    at::parallel_for(0, first_tile_.back(), grain, [&](int64_t begin, int64_t end) {
      for (size_t i = 0; i < problems_.size(); ++i) {
        const int64_t first = std::max(begin, first_tile_[i]), last = std::min(end, first_tile_[i + 1]);
        Sparse24Problem p = problems_[i];
        p.x = x;
        p.y = y[i];
        for (int64_t t = first - first_tile_[i]; t < last - first_tile_[i]; ++t) one_row_avx512<V>(p, t);
      }
    });
  }

 private:
  std::vector<int64_t> first_tile_;  // the layers' tiles numbered one after another
};

// One fp32 row of int8 activations (act_bits 8) through 2:4 int4 layers of one input and group size, bound once:
// x quantized once for all of them (quantize_rows_int8), their work units shared out in one parallel region as the
// op splits a layer at m == 1 (tiles on stream_int4_tile where it fits, else a8_int4_row_unit's units), so the
// outputs are bit-identical to the op's.
class Sparse24Int4A8Gemv final : public BoundSparse24 {
 public:
  Sparse24Int4A8Gemv(std::vector<at::Tensor> tensors, std::vector<Sparse24Problem> problems)
      : BoundSparse24(std::move(tensors), std::move(problems)) {
    stream_ = stream_int4_fits(problems_[0], false);  // the layers share k and the group size
    first_unit_.push_back(0);
    for (const Sparse24Problem& p : problems_) {
      const int64_t tiles = p.n / kTileCols, pairs = (tiles + 1) / 2;
      pair_units_.push_back(stream_ ? 0 : a8_row_units(p));
      first_unit_.push_back(first_unit_.back() +
                            (stream_ ? tiles : pair_units_.back() + pairs - pair_units_.back() * kStreamA8Pairs));
    }
  }

  void run(const float* x, float* const* y) const override {
    const Sparse24Problem& first = problems_[0];
    const int64_t group_inputs = 2 * first.group_size, per_group = (group_inputs + kActBlock - 1) / kActBlock;
    std::vector<int8_t> x8(k_);
    std::vector<float> block_scale(first.groups * per_group);
    quantize_rows_int8(x, 1, k_, group_inputs, x8.data(), block_scale.data());
    if (stream_) to_stream_int4_order(x8.data(), 1, k_);
    at::parallel_for(0, first_unit_.back(), 1, [&](int64_t begin, int64_t end) {
      size_t layer = 0;
      for (int64_t u = begin; u < end; ++u) {
        while (u >= first_unit_[layer + 1]) ++layer;
        Sparse24Problem p = problems_[layer];
        p.y = y[layer];
        if (stream_) stream_int4_tile(p, x8.data(), block_scale.data(), u - first_unit_[layer], false);
        else a8_int4_row_unit(p, x8.data(), block_scale.data(), u - first_unit_[layer], pair_units_[layer], false);
      }
    });
  }

 private:
  bool stream_ = false;              // tile by tile on stream_int4_tile, else on a8_int4_row_unit's units
  std::vector<int64_t> first_unit_;  // the layers' work units numbered one after another
  std::vector<int64_t> pair_units_;  // each layer's units of kStreamA8Pairs pairs (a8_row_units)
};
#endif

// Whether every tensor is a contiguous CPU one (what a bound product reads without copying).
bool bindable(const std::vector<at::Tensor>& tensors) {
  return std::all_of(tensors.begin(), tensors.end(),
                     [](const at::Tensor& t) { return t.device().is_cpu() && t.is_contiguous(); });
}

}  // namespace
}  // namespace sparse24

std::shared_ptr<const BoundGemv> bind_sparse24_gemv(const std::vector<at::Tensor>& values,
                                                    const std::vector<at::Tensor>& meta) {
  TORCH_CHECK(!values.empty() && meta.size() == values.size(),
              "bind_sparse24_gemv: needs one or more values and as many meta");
  using namespace sparse24;
#ifdef COMPTRUST_X86
  if (select_isa() != Isa::kAvx512 || !bindable(values) || !bindable(meta)) return nullptr;
  const auto kind = values[0].scalar_type();
  const int64_t k = meta[0].dim() == 2 ? meta[0].size(1) * kSparse24Group : 0;
  const at::Tensor x = at::empty({1, k});  // what the checks read of x: its shape, dtype and device
  std::vector<Sparse24Problem> problems;
  for (size_t i = 0; i < values.size(); ++i) {
    problems.push_back(float_problem("sparse24_gemm_tiled", x, values[i], meta[i]));
    if (values[i].scalar_type() != kind) return nullptr;
  }
  std::vector<at::Tensor> tensors(values);
  tensors.insert(tensors.end(), meta.begin(), meta.end());
  switch (kind) {
    case at::kFloat: return std::make_shared<Sparse24Gemv<float>>(std::move(tensors), std::move(problems));
    case at::kBFloat16: return std::make_shared<Sparse24Gemv<at::BFloat16>>(std::move(tensors), std::move(problems));
    default: return std::make_shared<Sparse24Gemv<at::Half>>(std::move(tensors), std::move(problems));
  }
#else
  return nullptr;
#endif
}

std::shared_ptr<const BoundGemv> bind_sparse24_int4_gemv(const std::vector<at::Tensor>& weights,
                                                         const std::vector<at::Tensor>& meta,
                                                         const std::vector<at::Tensor>& zeros,
                                                         const std::vector<at::Tensor>& scales, int64_t group_size,
                                                         int64_t act_bits) {
  TORCH_CHECK(!weights.empty() && meta.size() == weights.size() && zeros.size() == weights.size() &&
                  scales.size() == weights.size(),
              "bind_sparse24_int4_gemv: needs one or more weights and as many meta, zeros and scales");
  TORCH_CHECK(act_bits == 0 || act_bits == 8, "bind_sparse24_int4_gemv: act_bits=", act_bits, " must be 0 or 8");
  using namespace sparse24;
#ifdef COMPTRUST_X86
  if (select_isa() != Isa::kAvx512 || (act_bits == 8 && !avx512_vnni_vbmi_usable())) return nullptr;
  for (const auto* tensors : {&weights, &meta, &zeros, &scales})
    if (!bindable(*tensors)) return nullptr;
  const int64_t k = meta[0].dim() == 2 ? meta[0].size(1) * kSparse24Group : 0;
  const at::Tensor x = at::empty({1, k});
  std::vector<Sparse24Problem> problems;
  for (size_t i = 0; i < weights.size(); ++i) {
    problems.push_back(int4_problem("sparse24_int4_gemm_tiled", x, weights[i], meta[i], zeros[i], scales[i], group_size));
    // fp32 x where run_kind takes int8 limbs instead (large layers)
    if (act_bits == 0 && problems.back().n * k >= kLimbsMinWeights && avx512_vnni_vbmi_usable()) return nullptr;
  }
  std::vector<at::Tensor> tensors;
  for (const auto* list : {&weights, &meta, &zeros, &scales}) tensors.insert(tensors.end(), list->begin(), list->end());
  if (act_bits == 8) return std::make_shared<Sparse24Int4A8Gemv>(std::move(tensors), std::move(problems));
  return std::make_shared<Sparse24Gemv<Int4Values>>(std::move(tensors), std::move(problems));
#else
  return nullptr;
#endif
}

}  // namespace comptrust::cpu

TORCH_LIBRARY_IMPL(comptrust, CPU, m) {
  m.impl("sparse24_gemm_tiled", &comptrust::cpu::sparse24::sparse24_gemm_tiled_cpu);
  m.impl("sparse24_int4_gemm_tiled", &comptrust::cpu::sparse24::sparse24_int4_gemm_tiled_cpu);
}
