// 2:4 x float activations at a few dozen to a few hundred rows (AVX-512): vectorized over x's rows, so that
// only the kept weights are multiplied. Float (fp32/bf16/fp16) and int4 kept values.
//
// Why: the column kernels (sparse24_avx2.cpp, sparse24_avx512.cpp) vectorize over output columns. Each lane's
// kept value needs its own input, picked with vpermps, so 16 useful multiply-adds cost a permute and a fused
// multiply-add, both on the vector ports: no more than dense work. From ~48 rows MKL's dense sgemm, which does twice the
// multiply-adds at full rate, was faster (4096x4096 fp32 values at 64 rows 0.78-0.91x).
// Here x is transposed once per block of up to 96 rows, xt[kk][r] (zero-padded to whole registers), and a
// kept weight w of column c at input kk is one broadcast of w and one fused multiply-add per 16 rows against
// xt[kk] read straight from L1: acc[c][r] += w * xt[kk][16r..16r+15]. The input kk depends on the weight's
// 2-bit index, but as an address, not as a lane shuffle. The loads bound it (the broadcast and 1-6 row
// loads per 1-6 multiply-adds), not the vector ports.
// Inputs are walked in chunks of kRowVectorChunkGroups 2:4 groups (their xt rows stay in L1 across a block
// of tiles); a column's partial sums wait in yt[column][row] between chunks, and a block's outputs are
// gathered back to y's rows at its end.
#pragma once
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "comptrust/sparse24_tiles.h"
#include "simd_common.h"

#ifdef COMPTRUST_X86
namespace comptrust::cpu {

// Where it runs (sparse24_cpu.cpp's run_kind; the tile unit keeps some of these rows for bf16 and int4 values).
// Against dense fp32 F.linear on cold weights, side by side, this kernel / the one it replaced (the column
// kernel below 192 rows, dense blocks for torch's GEMM from 192), on 576x1536, 1536x576, 4096x4096,
// 11008x4096: fp32 values at 16 rows 1.41-2.02 / 1.59-2.09 (the column kernel stays there), 32 rows
// 1.36-1.90 / 1.12-1.58, 64 rows 1.18-1.74 / 0.88-1.47, 128 rows 1.07-1.27 / 0.71-0.96, 256 rows 0.92-1.01 /
// 0.78-0.85, 384 rows 0.86-1.28 / 0.78-0.86, 512 rows 0.78-0.91 / 0.84-1.04; fp16 values at 64 rows 1.23-1.38 /
// 0.88-1.01; int4 values (g128, also 4096x11008) at 64 rows 1.13-1.62 / 0.76-0.97, 192 rows 0.94-1.48 / 0.68-0.87.
// Those figures came from a CPU whose MKL ran sgemm at AVX-512 speed, so dense blocks kept fp32 x from 512 rows
// on. On Zen 5, where MKL's sgemm runs at AVX2 speed, dense blocks ran 0.93-1.03x fp32 F.linear from 512 rows
// and this kernel 2.2-3.2x (fp32 and int4 values, 576x1536, 1536x576, 4096x4096 at 256-1024 rows, warm): float x
// stays here at every batch, as the tiled int GEMM's kernels do (a loss of at most ~15% where MKL is fast, a gain
// of 2-3x where it is not). bf16 x stops at kRowVectorMaxRows: bf16 F.linear (oneDNN, the GEMM the expanded
// blocks run) was 1.5-1.8x as fast as this kernel at 512-1024 rows.
constexpr int64_t kRowVectorMinRows = 32;
constexpr int64_t kRowVectorMaxRows = 512;  // bf16 x
constexpr int kRowVectorMaxRegisters = 6;      // rows per block up to 96: registers of 16
constexpr int64_t kRowVectorChunkGroups = 16;    // 2:4 groups per input chunk: 64 xt rows, 16-24 KB
constexpr int64_t kRowVectorBlockTiles = 32;     // tiles that share a chunk while it is in L1

// xt[kk][0..ld) = x[0..rows)[kk] for kk in [k0, k1), zero past rows: one masked gather per 16 rows. Registers
// wholly past `rows` gather nothing (no read past x's last row, whatever ld the caller pads to).
COMPTRUST_AVX512 inline void transpose_x(const float* x, int64_t k, int64_t rows, int64_t ld, int64_t k0, int64_t k1,
                                         float* xt) {
  const __m512i offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(static_cast<int>(k)));
  for (int64_t r0 = 0; r0 < ld; r0 += 16) {
    const __mmask16 mask = static_cast<__mmask16>((1u << std::clamp<int64_t>(rows - r0, 0, 16)) - 1);
    const float* xr = x + r0 * k;
    for (int64_t kk = k0; kk < k1; ++kk)
      _mm512_store_ps(xt + kk * ld + r0, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, offsets, xr + kk, 4));
  }
}

// y[r][0..cols) = yt[0..cols)[r] for r < rows (y rows n apart, yt columns ld apart).
COMPTRUST_AVX512 inline void store_transposed(const float* yt, int64_t ld, int64_t cols, int64_t rows, float* y,
                                              int64_t n) {
  const __m512i offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(static_cast<int>(ld)));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, cols - c0)) - 1);
      _mm512_mask_storeu_ps(y + r * n + c0, mask,
                            _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, offsets, yt + c0 * ld + r, 4));
    }
}

// yt[c][0..16*RV) for columns C0..C0+C-1 of one tile over `groups` 2:4 groups: their meta words, their kept
// values as fp32 (values[g][j][0..7], the tiled layout, comptrust/sparse24_tiles.h) and xt from their first
// input on. The accumulators start at zero on the first chunk.
template <int RV, int C, int C0>
COMPTRUST_AVX512 void row_vector_columns(const uint32_t* meta, const float* values, int64_t groups, const float* xt,
                                         float* yt, bool first, const char* next_values, int64_t next_group_bytes) {
  constexpr int64_t ld = 16 * RV;
  __m512 acc[C][RV];
  COMPTRUST_UNROLL for (int c = 0; c < C; ++c)
    COMPTRUST_UNROLL for (int r = 0; r < RV; ++r)
      acc[c][r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(yt + c * ld + 16 * r);
  for (int64_t g = 0; g < groups; ++g) {
    // The next tile's values for this chunk, a line per fp32 group: tiles lie k/4 groups apart, a stride the
    // hardware prefetcher does not follow, and the first loads of each chunk stalled on DRAM.
    _mm_prefetch(next_values + g * next_group_bytes, _MM_HINT_T0);
    const uint32_t word = meta[g];
    const float* xg = xt + kSparse24Group * g * ld;
    const float* v = values + g * kSparse24Kept * kTileCols;
    COMPTRUST_UNROLL for (int c = 0; c < C; ++c) {
      COMPTRUST_UNROLL for (int j = 0; j < kSparse24Kept; ++j) {
        const float* xr = xg + ((word >> (4 * (C0 + c) + 2 * j)) & 3) * ld;
        const __m512 w = _mm512_set1_ps(v[j * kTileCols + C0 + c]);
        COMPTRUST_UNROLL for (int r = 0; r < RV; ++r)
          acc[c][r] = _mm512_fmadd_ps(w, _mm512_load_ps(xr + 16 * r), acc[c][r]);
      }
    }
  }
  COMPTRUST_UNROLL for (int c = 0; c < C; ++c)
    COMPTRUST_UNROLL for (int r = 0; r < RV; ++r) _mm512_storeu_ps(yt + c * ld + 16 * r, acc[c][r]);
}

// Where a tile's kept values come from, as fp32 [group][slot][column] a chunk at a time (row_vector_tiles).
// Float values are read in place; bf16/fp16 values are widened and int4 ones dequantized into a chunk buffer
// first: converting each value before its broadcast made the kernel slower than dense.
template <class V>
struct FloatKeptValues {
  const V* values;  // [n/8, k/4, 2, 8]
  int64_t groups;   // 2:4 groups per column, k/4
  static constexpr int64_t kGroupBytes = kSparse24Kept * kTileCols * sizeof(V);

  const V* at(int64_t t, int64_t g) const { return values + (t * groups + g) * kSparse24Kept * kTileCols; }
  const char* stream(int64_t t, int64_t g) const { return reinterpret_cast<const char*>(at(t, g)); }
  COMPTRUST_AVX512 const float* chunk(int64_t t, int64_t g0, int64_t count, float* buffer) const {
    const V* v = at(t, g0);
    if constexpr (std::is_same_v<V, float>) {
      return v;
    } else {
      for (int64_t i = 0; i < count * kSparse24Kept * kTileCols; i += 16) {
        const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + i));
        if constexpr (std::is_same_v<V, at::Half>) _mm512_store_ps(buffer + i, _mm512_cvtph_ps(bits));
        else _mm512_store_ps(buffer + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)));
      }
      return buffer;
    }
  }
};

// int4 kept values in the tiled layout (comptrust/sparse24_tiles.h): word (t, w, c) holds kept values 8w..8w+7
// of column 8t+c (kept value 8w+i is slot i%2 of group 4w+i/2), each (code - zero) * scale of its quantization
// group, the reference's dequantization. group_size is a multiple of 8, so a word lies in one group; chunks
// start at multiples of 16 groups and hold whole words (k % 16 == 0).
struct Int4KeptValues {
  const int32_t* words;     // [n/8, k/16, 8]
  const uint8_t* zeros;     // [n/8, quant_groups, 8]
  const at::Half* scales;   // [n/8, quant_groups, 8]
  int64_t groups, quant_groups, group_size;
  static constexpr int64_t kGroupBytes = kSparse24Kept * kTileCols / 2;

  const char* stream(int64_t t, int64_t g) const {
    return reinterpret_cast<const char*>(words + (t * groups / kSparseInt4WordGroups) * kTileCols) + g * kGroupBytes;
  }
  COMPTRUST_AVX512 const float* chunk(int64_t t, int64_t g0, int64_t count, float* buffer) const {
    const int32_t* tw = words + (t * groups / kSparseInt4WordGroups) * kTileCols;
    const __m256i nibble = _mm256_set1_epi32(0xF);
    for (int64_t w = g0 / kSparseInt4WordGroups; w < (g0 + count) / kSparseInt4WordGroups; ++w) {
      const int64_t q = (t * quant_groups + 8 * w / group_size) * kTileCols;
      const __m256 zero = load_zeros(zeros + q), scale = load_scales(scales + q);
      const __m256i word = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tw + w * kTileCols));
      float* out = buffer + (w * kSparseInt4WordGroups - g0) * kSparse24Kept * kTileCols;
      COMPTRUST_UNROLL for (int i = 0; i < 8; ++i) {
        const __m256 code = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(word, 4 * i), nibble));
        _mm256_store_ps(out + i * kTileCols, _mm256_mul_ps(_mm256_sub_ps(code, zero), scale));
      }
    }
    return buffer;
  }
};

// y[0..rows)[8*t0 .. 8*t1) (rows n apart) = xt^T @ W^T for tiles [t0, t1), W in the tiled 2:4 layout with k
// inputs. Partial sums wait between chunks in a block's yt[column][row].
template <class Kept, int RV>
COMPTRUST_AVX512 void row_vector_tiles(const Kept& kept, const uint32_t* meta, int64_t k, int64_t t0, int64_t t1,
                                       const float* xt, int64_t rows, float* y, int64_t n) {
  constexpr int C = RV <= 3 ? kTileCols : kTileCols / 2;  // at most 24 accumulators
  constexpr int64_t ld = 16 * RV;
  const int64_t groups = k / kSparse24Group;
  std::vector<float> yt_buffer(kRowVectorBlockTiles * kTileCols * ld + 16);
  float* yt = align64(yt_buffer.data());
  alignas(64) float chunk_values[kRowVectorChunkGroups * kSparse24Kept * kTileCols];
  for (int64_t tb = t0; tb < t1; tb += kRowVectorBlockTiles) {
    const int64_t tb_end = std::min(t1, tb + kRowVectorBlockTiles);
    for (int64_t g0 = 0; g0 < groups; g0 += kRowVectorChunkGroups) {
      const int64_t count = std::min(groups, g0 + kRowVectorChunkGroups) - g0;
      for (int64_t t = tb; t < tb_end; ++t) {
        const uint32_t* tm = meta + t * groups + g0;
        const float* values = kept.chunk(t, g0, count, chunk_values);
        const char* next = kept.stream(t + 1, g0);  // a prefetch address: past the end on the last tile is harmless
        _mm_prefetch(reinterpret_cast<const char*>(tm + groups), _MM_HINT_T0);
        const float* xc = xt + kSparse24Group * g0 * ld;
        float* out = yt + (t - tb) * kTileCols * ld;
        row_vector_columns<RV, C, 0>(tm, values, count, xc, out, g0 == 0, next, Kept::kGroupBytes);
        if constexpr (C < kTileCols)
          row_vector_columns<RV, C, C>(tm, values, count, xc, out + C * ld, g0 == 0, next, Kept::kGroupBytes);
      }
    }
    store_transposed(yt, ld, (tb_end - tb) * kTileCols, rows, y + tb * kTileCols, n);
  }
}

// y[m, n] (fp32) = x[m, k] (fp32, contiguous) @ W^T, W: n/8 tiles of kept values (a *KeptValues) and meta words.
template <class Kept>
at::Tensor sparse24_row_vectors(const at::Tensor& x, const Kept& kept, const uint32_t* meta, int64_t n) {
  const int64_t m = x.size(0), k = x.size(1), tiles = n / kTileCols;
  at::Tensor y = at::empty({m, n}, x.options());
  const int64_t max_rows = 16 * kRowVectorMaxRegisters, blocks = (m + max_rows - 1) / max_rows;
  const int64_t max_ld = 16 * (((m + blocks - 1) / blocks + 15) / 16);  // the largest block's xt row
  // xt is kept per calling thread and reused: a fresh allocation of megabytes goes back to the OS when freed,
  // and faulting its pages in again cost as much as the transpose (see dense_blocks.h). 64-byte aligned rows.
  thread_local std::vector<float> xt_buffer;
  if (static_cast<int64_t>(xt_buffer.size()) < k * max_ld + 16) xt_buffer.resize(k * max_ld + 16);
  float* xtp = align64(xt_buffer.data());  // not xt_buffer inside the workers
  // Tasks of kRowVectorBlockTiles tiles, fewer where the layer has fewer tiles than that per thread: with 32,
  // 192x576 (24 tiles) ran on one thread, 1.00x dense fp32 F.linear at 64 rows.
  const int64_t threads = at::get_num_threads();
  const int64_t grain = std::clamp<int64_t>((tiles + threads - 1) / threads, 1, kRowVectorBlockTiles);
  // Even blocks, a row apart at most: 100 rows as 50 + 50, not 96 + 4; 4944 as 52 blocks of 95 or 96, not 51 of
  // 96 and one of 48 padded to 96. Each block pads its rows to whole registers only.
  for (int64_t b = 0, i0 = 0; b < blocks; ++b) {
    const int64_t rows = (m - i0 + (blocks - b) - 1) / (blocks - b);
    const int64_t rv = (rows + 15) / 16, ld = 16 * rv;
    const float* xb = x.data_ptr<float>() + i0 * k;
    float* yb = y.data_ptr<float>() + i0 * n;
    at::parallel_for(0, k, 256, [&](int64_t k0, int64_t k1) { transpose_x(xb, k, rows, ld, k0, k1, xtp); });
    at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
      switch (rv) {
        case 1: row_vector_tiles<Kept, 1>(kept, meta, k, t0, t1, xtp, rows, yb, n); break;
        case 2: row_vector_tiles<Kept, 2>(kept, meta, k, t0, t1, xtp, rows, yb, n); break;
        case 3: row_vector_tiles<Kept, 3>(kept, meta, k, t0, t1, xtp, rows, yb, n); break;
        case 4: row_vector_tiles<Kept, 4>(kept, meta, k, t0, t1, xtp, rows, yb, n); break;
        case 5: row_vector_tiles<Kept, 5>(kept, meta, k, t0, t1, xtp, rows, yb, n); break;
        default: row_vector_tiles<Kept, 6>(kept, meta, k, t0, t1, xtp, rows, yb, n); break;
      }
    });
    i0 += rows;
  }
  return y;
}

}  // namespace comptrust::cpu
#endif  // COMPTRUST_X86
