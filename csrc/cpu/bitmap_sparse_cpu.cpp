// CPU product of an unstructured sparse fp32 weight in the bitmap layout (comptrust/formats/bitmap_sparse.py):
// the kept values row by row, a 16-bit mask word per 16 inputs, each row's first value.
//
// Why: magnitude / Wanda / SparseGPT pruning at 50% unstructured (the setting the trust studies measure most) left
// dense nn.Linear layers full of zeros, read and multiplied at dense cost. Batch 1 is memory-bound, and the bitmap
// reads 4 x density + 1/8 bytes per weight (2.13 at 50%) against 4.
//
// Batch 1 (and below kRowVectorMinRows rows; below kDenseMinRows without AVX-512): per row and 16 inputs, AVX-512's
// vexpandps loads the word's popcount values from the stream into the lanes its mask bits name (zeros elsewhere),
// and one FMA adds their products. The sums go in dense_gemv's order (four accumulators over 64-input blocks,
// leftover 16-blocks into the first, then the horizontal sum, then the inputs past the last 16 one by one), and a
// pruned weight's lane adds 0 * x = 0 exactly, so for finite x and k a multiple of 16 one row's result is
// bit-identical to dense_gemv on the dense weight (tested; the last k % 16 inputs' sums are ordered as the compiler
// picks), and the same in any batch this kernel runs as alone. No software prefetch (dense_gemv's rows prefetch 8 KB
// ahead into L2): alternated in one process it cost 12-21% here (50% pruned: 4096x4096 1.51x of dense_gemv with it,
// 1.65-1.76x without; 576x576 1.02-1.24x, 1.27-1.46x).
// From kRowVectorMinRows to kRowVectorMaxRows rows on AVX-512, the row-vector kernel (sparse24_row_vectors.h's
// idea): x transposed, each kept weight one broadcast and a fused multiply-add per 16 rows of x, so only the kept
// weights are multiplied. Beyond (and from kDenseMinRows without AVX-512), blocks of rows expand into a dense scratch
// and torch's GEMM runs (dense_blocks.h's idea): there BLAS multiplies faster than these kernels skip.
// Without AVX-512 the first kernel has an AVX2 twin (a masked load and vpermps in place of vexpandps, in dense_gemv's
// AVX2 order, bit-identical to it as above) and a portable scalar one (dense_gemv's scalar order). The AVX2 twin is
// slower than dense_gemv's AVX2 rows (forced to AVX2 here, 50% pruned: 0.48-0.74x at one row; 1.4-1.9x F.linear at 4
// rows, 0.7-0.97x from 16 on dense blocks), so pruning keeps layers dense on such CPUs (bitmap_unsuited); it serves
// direct calls of the op there.
//
// Safety: every row's count of mask bits is compared with row_start (after reading it, or before where reading could
// run past the end of `values`: row_readable), so a corrupt mask or row_start is an error naming the row, never a
// read outside `values`. The bound product (BitmapSparseGemv) checks whole bitmaps once, when bound.
#include "torch_and_intrinsics.h"  // first: before anything reads torch

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "bound_gemv.h"
#include "isa.h"
#include "simd_common.h"
#include "sparse24_row_vectors.h"  // transpose_x

namespace comptrust::cpu {
namespace {

constexpr int64_t kWordInputs = 16;
// Rows of x from which the product runs on dense blocks and torch's GEMM (bitmap_sparse_gemm_cpu).
constexpr int64_t kDenseMinRows = 16;
// x rows one pass over a weight row serves (their accumulators: 4 per row, 16 registers).
constexpr int64_t kRowChunk = 4;
// On AVX-512, rows of x from which the row-vector kernel runs (bitmap_row_vectors), and from which dense blocks do.
// Against dense fp32 F.linear, cold, 50% pruned, on 4096x4096 / 576x1536 / 1536x576, row vectors / the kernel below
// it (the row kernel up to 15 rows, dense blocks from 16): 9 rows 1.11-1.89x / 1.13-1.91x, 12 rows 1.08-1.39x /
// 0.92-1.15x, 16 rows 1.19-1.57x / 0.37-0.87x, 32 rows 1.24-1.48x / 0.45-0.90x, 64 rows 1.11-1.24x / 0.57-0.92x,
// 128 rows 0.92-1.05x / 0.70-0.97x, 256 rows 0.88-0.98x / 0.78-1.04x, 511 rows 0.81-0.96x / 0.89-1.02x.
constexpr int64_t kRowVectorMinRows = 10;
constexpr int64_t kRowVectorMaxRows = 256;
constexpr int64_t kRowVectorBlock = 64;  // x rows per transposed block: 4 registers of 16
constexpr int64_t kDenseBlockBytes = 8 << 20;

// The vector kernels count mask bits with the popcnt instruction (every AVX2 CPU has it; the base x86-64 target
// does not, and without it each count is a dozen instructions).
#ifdef COMPTRUST_X86
#define COMPTRUST_POPCNT __attribute__((target("popcnt")))
#define COMPTRUST_AVX2_POPCNT __attribute__((target("avx2,fma,f16c,popcnt")))
#define COMPTRUST_AVX512_POPCNT __attribute__((target("avx512f,avx2,fma,f16c,popcnt")))
#endif

struct BitmapProblem {
  const float* values;
  const int16_t* mask;       // [n, words]
  const int64_t* row_start;  // [n + 1]
  int64_t n, k, words, nnz;

  const uint16_t* row_mask(int64_t r) const { return reinterpret_cast<const uint16_t*>(mask) + r * words; }
  int64_t row_count(int64_t r) const {
    const uint16_t* w = row_mask(r);
    int64_t count = 0;
    for (int64_t j = 0; j < words; ++j) count += __builtin_popcount(w[j]);
    return count;
  }
  // Whether row r's mask bits and row_start agree (the values it reads lie inside its own range).
  bool row_consistent(int64_t r) const { return row_count(r) == row_start[r + 1] - row_start[r]; }
};

#ifdef COMPTRUST_X86
// row_consistent with popcnt, four words at a time.
COMPTRUST_POPCNT bool row_consistent_popcnt(const BitmapProblem& p, int64_t r) {
  const uint16_t* w = p.row_mask(r);
  int64_t count = 0, j = 0;
  for (; j + 4 <= p.words; j += 4) {
    uint64_t bits;
    std::memcpy(&bits, w + j, sizeof bits);
    count += __builtin_popcountll(bits);
  }
  for (; j < p.words; ++j) count += __builtin_popcount(w[j]);
  return count == p.row_start[r + 1] - p.row_start[r];
}
#endif

bool row_consistent(const BitmapProblem& p, int64_t r, Isa isa) {
#ifdef COMPTRUST_X86
  if (isa != Isa::kScalar) return row_consistent_popcnt(p, r);
#endif
  return p.row_consistent(r);
}

// sum + the kept weights of a row's inputs [from, k) times x, one by one in input order (values from `tail`,
// advanced past them): the scalar kernel's whole row, the vector kernels' inputs past their last block.
inline float add_kept(const BitmapProblem& p, const uint16_t* words, int64_t from, const float*& tail, const float* x,
                      float sum) {
  for (int64_t t = from; t < p.k; ++t)
    if (words[t / kWordInputs] >> (t % kWordInputs) & 1) sum += *tail++ * x[t];
  return sum;
}

// y[b] (rows b of x, `rows` of them, ldx apart) = row r . x[b], in dense_gemv's scalar order; returns how many
// values the row took.
int64_t bitmap_row_scalar(const BitmapProblem& p, int64_t r, const float* x, int64_t ldx, int64_t rows, float* y,
                          int64_t ldy) {
  const uint16_t* words = p.row_mask(r);
  const float* const start = p.values + p.row_start[r];
  const float* v = start;
  for (int64_t b = 0; b < rows; ++b) {
    v = start;
    y[b * ldy] = add_kept(p, words, 0, v, x + b * ldx, 0.f);
  }
  return v - start;
}

#ifdef COMPTRUST_X86
// The same for Rows (up to kRowChunk) rows of x on AVX-512, in dense_gemv's AVX-512 order (dot_row_avx512).
template <int Rows>
COMPTRUST_AVX512_POPCNT int64_t bitmap_row_avx512(const BitmapProblem& p, int64_t r, const float* x, int64_t ldx,
                                                  float* y, int64_t ldy) {
  const int64_t full = p.k / 64 * 64, full16 = p.k / 16 * 16;
  const uint16_t* words = p.row_mask(r);
  const float* const start = p.values + p.row_start[r];
  const float* v = start;
  __m512 acc[Rows][4];
  for (int b = 0; b < Rows; ++b)
    for (int a = 0; a < 4; ++a) acc[b][a] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i < full; i += 64) {
    uint64_t bits;
    std::memcpy(&bits, words + i / kWordInputs, sizeof bits);
    __m512 w[4];
    for (int a = 0; a < 4; ++a) {
      const __mmask16 lanes = static_cast<__mmask16>(bits >> (16 * a));
      w[a] = _mm512_maskz_expandloadu_ps(lanes, v);
      v += __builtin_popcount(lanes);
    }
    for (int b = 0; b < Rows; ++b)
      for (int a = 0; a < 4; ++a)
        acc[b][a] = _mm512_fmadd_ps(w[a], _mm512_loadu_ps(x + b * ldx + i + 16 * a), acc[b][a]);
  }
  for (; i < full16; i += 16) {
    const __mmask16 lanes = static_cast<__mmask16>(words[i / kWordInputs]);
    const __m512 w = _mm512_maskz_expandloadu_ps(lanes, v);
    v += __builtin_popcount(lanes);
    for (int b = 0; b < Rows; ++b) acc[b][0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + b * ldx + i), acc[b][0]);
  }
  const float* tail = v;
  for (int b = 0; b < Rows; ++b) {
    const float sum = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]), _mm512_add_ps(acc[b][2], acc[b][3])));
    tail = v;
    y[b * ldy] = add_kept(p, words, i, tail, x + b * ldx, sum);
  }
  return tail - start;
}
#endif

#ifdef COMPTRUST_X86
// AVX2 has no expand instruction: per 8 inputs, a masked load takes the byte's popcount values and vpermps spreads
// them, a table giving each kept lane its value's position (pruned lanes read lane 7, which the masked load leaves
// zero whenever some lane is pruned).
struct Avx2ExpandTables {
  alignas(32) int32_t position[256][8];
  alignas(32) int32_t first[9][8];  // load masks: the first c lanes
  Avx2ExpandTables() {
    for (int lanes = 0; lanes < 256; ++lanes)
      for (int l = 0, c = 0; l < 8; ++l) position[lanes][l] = (lanes >> l & 1) ? c++ : 7;
    for (int c = 0; c <= 8; ++c)
      for (int l = 0; l < 8; ++l) first[c][l] = l < c ? -1 : 0;
  }
};
const Avx2ExpandTables kExpand;

// The 8 weights of mask byte `lanes` from the value stream v (advanced past them).
COMPTRUST_AVX2_POPCNT inline __m256 expand8(unsigned lanes, const float*& v) {
  const int count = __builtin_popcount(lanes);
  const __m256 kept = _mm256_maskload_ps(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.first[count])));
  v += count;
  return _mm256_permutevar8x32_ps(kept, _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.position[lanes])));
}

// bitmap_row_avx512 on AVX2, in dense_gemv's AVX2 order (dot_row_avx2: four sums of 8 over 32-input blocks, leftover
// 8-blocks into the first, reduce_add8, then the inputs past the last 8 one by one).
template <int Rows>
COMPTRUST_AVX2_POPCNT int64_t bitmap_row_avx2(const BitmapProblem& p, int64_t r, const float* x, int64_t ldx, float* y,
                                              int64_t ldy) {
  const int64_t full = p.k / 32 * 32, full8 = p.k / 8 * 8;
  const uint16_t* words = p.row_mask(r);
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(words);  // byte j: inputs 8j..8j+7 (little-endian words)
  const float* const start = p.values + p.row_start[r];
  const float* v = start;
  __m256 acc[Rows][4];
  for (int b = 0; b < Rows; ++b)
    for (int a = 0; a < 4; ++a) acc[b][a] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i < full; i += 32) {
    __m256 w[4];
    for (int a = 0; a < 4; ++a) w[a] = expand8(bytes[i / 8 + a], v);
    for (int b = 0; b < Rows; ++b)
      for (int a = 0; a < 4; ++a)
        acc[b][a] = _mm256_fmadd_ps(w[a], _mm256_loadu_ps(x + b * ldx + i + 8 * a), acc[b][a]);
  }
  for (; i < full8; i += 8) {
    const __m256 w = expand8(bytes[i / 8], v);
    for (int b = 0; b < Rows; ++b) acc[b][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * ldx + i), acc[b][0]);
  }
  const float* tail = v;
  for (int b = 0; b < Rows; ++b) {
    const float sum =
        reduce_add8(_mm256_add_ps(_mm256_add_ps(acc[b][0], acc[b][1]), _mm256_add_ps(acc[b][2], acc[b][3])));
    tail = v;
    y[b * ldy] = add_kept(p, words, i, tail, x + b * ldx, sum);
  }
  return tail - start;
}
#endif

// Whether row r may be read before its count is known to match: a row reads at most k values from row_start[r], so
// only where that could run past the end of `values` (the last rows) is its mask counted first; every other row's
// count is compared after, and a wrong one has read only inside `values`.
bool row_readable(const BitmapProblem& p, int64_t r, Isa isa) {
  return p.row_start[r] + p.k <= p.nnz || row_consistent(p, r, isa);
}

// Rows [begin, end) of the weight times `rows` rows of x (ldx apart) into y (rows ldy apart, column r for weight
// row r). check: false where a row's mask and row_start disagree (its outputs are then garbage: the caller raises).
bool bitmap_rows(const BitmapProblem& p, const float* x, int64_t ldx, int64_t rows, float* y, int64_t ldy,
                 int64_t begin, int64_t end, Isa isa, bool check) {
  bool ok = true;
  for (int64_t r = begin; r < end; ++r) {
    if (check && !row_readable(p, r, isa)) {
      ok = false;
      continue;
    }
    int64_t used = 0;
#ifdef COMPTRUST_X86
    if (isa == Isa::kAvx512) {
      int64_t b = 0;
      for (; b + kRowChunk <= rows; b += kRowChunk)
        used = bitmap_row_avx512<kRowChunk>(p, r, x + b * ldx, ldx, y + b * ldy + r, ldy);
      for (; b < rows; ++b) used = bitmap_row_avx512<1>(p, r, x + b * ldx, ldx, y + b * ldy + r, ldy);
    } else if (isa == Isa::kAvx2) {
      int64_t b = 0;
      for (; b + kRowChunk <= rows; b += kRowChunk)
        used = bitmap_row_avx2<kRowChunk>(p, r, x + b * ldx, ldx, y + b * ldy + r, ldy);
      for (; b < rows; ++b) used = bitmap_row_avx2<1>(p, r, x + b * ldx, ldx, y + b * ldy + r, ldy);
    } else
#endif
      used = bitmap_row_scalar(p, r, x, ldx, rows, y + r, ldy);
    if (check && used != p.row_start[r + 1] - p.row_start[r]) ok = false;
  }
  return ok;
}

// Weight rows [begin, end) written densely into out ([end - begin, k], rows k apart).
bool expand_rows_scalar(const BitmapProblem& p, int64_t begin, int64_t end, float* out) {
  for (int64_t r = begin; r < end; ++r) {
    if (!row_readable(p, r, Isa::kScalar)) return false;
    const uint16_t* words = p.row_mask(r);
    const float* v = p.values + p.row_start[r];
    float* row = out + (r - begin) * p.k;
    for (int64_t i = 0; i < p.k; ++i) row[i] = (words[i / kWordInputs] >> (i % kWordInputs) & 1) ? *v++ : 0.f;
    if (v - p.values != p.row_start[r + 1]) return false;
  }
  return true;
}

#ifdef COMPTRUST_X86
COMPTRUST_AVX512_POPCNT bool expand_rows_avx512(const BitmapProblem& p, int64_t begin, int64_t end, float* out) {
  const int64_t full16 = p.k / kWordInputs * kWordInputs;
  for (int64_t r = begin; r < end; ++r) {
    if (!row_readable(p, r, Isa::kAvx512)) return false;
    const uint16_t* words = p.row_mask(r);
    const float* v = p.values + p.row_start[r];
    float* row = out + (r - begin) * p.k;
    int64_t i = 0;
    for (; i < full16; i += kWordInputs) {
      const __mmask16 lanes = static_cast<__mmask16>(words[i / kWordInputs]);
      _mm512_storeu_ps(row + i, _mm512_maskz_expandloadu_ps(lanes, v));
      v += __builtin_popcount(lanes);
    }
    for (; i < p.k; ++i) row[i] = (words[i / kWordInputs] >> (i % kWordInputs) & 1) ? *v++ : 0.f;
    if (v - p.values != p.row_start[r + 1]) return false;
  }
  return true;
}

COMPTRUST_AVX2_POPCNT bool expand_rows_avx2(const BitmapProblem& p, int64_t begin, int64_t end, float* out) {
  const int64_t full8 = p.k / 8 * 8;
  for (int64_t r = begin; r < end; ++r) {
    if (!row_readable(p, r, Isa::kAvx2)) return false;
    const uint16_t* words = p.row_mask(r);
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(words);
    const float* v = p.values + p.row_start[r];
    float* row = out + (r - begin) * p.k;
    int64_t i = 0;
    for (; i < full8; i += 8) _mm256_storeu_ps(row + i, expand8(bytes[i / 8], v));
    for (; i < p.k; ++i) row[i] = (words[i / kWordInputs] >> (i % kWordInputs) & 1) ? *v++ : 0.f;
    if (v - p.values != p.row_start[r + 1]) return false;
  }
  return true;
}
#endif

// Weight rows [begin, end) into out; false where a row's mask and row_start disagree (checked as bitmap_rows does).
bool expand_rows(const BitmapProblem& p, int64_t begin, int64_t end, float* out, Isa isa) {
#ifdef COMPTRUST_X86
  if (isa == Isa::kAvx512) return expand_rows_avx512(p, begin, end, out);
  if (isa == Isa::kAvx2) return expand_rows_avx2(p, begin, end, out);
#endif
  return expand_rows_scalar(p, begin, end, out);
}

#ifdef COMPTRUST_X86
// Rows [begin, end) of the weight against `rows` rows of x given transposed (xt[i][0..ld), zero past rows), into y
// (rows n apart): each kept weight w at input i is one broadcast and RV fused multiply-adds against xt[i], two
// accumulator sets taking alternate kept weights (one set's chains would wait on the FMA latency at 16-32 rows).
// False where a row's mask and row_start disagree (checked as bitmap_rows does; bits past k are never read).
template <int RV>
COMPTRUST_AVX512_POPCNT bool bitmap_row_vectors(const BitmapProblem& p, const float* xt, int64_t ld, int64_t rows,
                                                float* y, int64_t n, int64_t begin, int64_t end) {
  alignas(64) float out[16 * RV];
  for (int64_t r = begin; r < end; ++r) {
    if (!row_readable(p, r, Isa::kAvx512)) return false;
    const uint16_t* words = p.row_mask(r);
    const float* const start = p.values + p.row_start[r];
    const float* v = start;
    __m512 a0[RV], a1[RV];
    for (int j = 0; j < RV; ++j) a0[j] = a1[j] = _mm512_setzero_ps();
    for (int64_t w0 = 0; w0 < p.words; w0 += 4) {
      uint64_t bits = 0;
      for (int64_t w = w0; w < std::min(w0 + 4, p.words); ++w) bits |= uint64_t{words[w]} << (16 * (w - w0));
      const int64_t inputs = p.k - w0 * kWordInputs;  // inputs of this chunk inside k
      if (inputs < 64) bits &= (uint64_t{1} << inputs) - 1;
      const float* xc = xt + w0 * kWordInputs * ld;
      while (bits) {
        const float* x0 = xc + __builtin_ctzll(bits) * ld;
        bits &= bits - 1;
        const __m512 w_0 = _mm512_set1_ps(v[0]);
        if (bits) {
          const float* x1 = xc + __builtin_ctzll(bits) * ld;
          bits &= bits - 1;
          const __m512 w_1 = _mm512_set1_ps(v[1]);
          v += 2;
          for (int j = 0; j < RV; ++j) {
            a0[j] = _mm512_fmadd_ps(w_0, _mm512_load_ps(x0 + 16 * j), a0[j]);
            a1[j] = _mm512_fmadd_ps(w_1, _mm512_load_ps(x1 + 16 * j), a1[j]);
          }
        } else {
          v += 1;
          for (int j = 0; j < RV; ++j) a0[j] = _mm512_fmadd_ps(w_0, _mm512_load_ps(x0 + 16 * j), a0[j]);
        }
      }
    }
    if (v - start != p.row_start[r + 1] - p.row_start[r]) return false;
    for (int j = 0; j < RV; ++j) _mm512_store_ps(out + 16 * j, _mm512_add_ps(a0[j], a1[j]));
    for (int64_t b = 0; b < rows; ++b) y[b * n + r] = out[b];
  }
  return true;
}

// y [m, n] = x [m, k] @ W^T by row vectors, x in blocks of up to kRowVectorBlock rows transposed once each.
bool bitmap_by_row_vectors(const BitmapProblem& p, const float* x, int64_t m, float* y) {
  const int64_t blocks = (m + kRowVectorBlock - 1) / kRowVectorBlock;
  const int64_t block_rows = (m + blocks - 1) / blocks;  // even blocks: 80 rows as 40 + 40, not 64 + 16
  const int64_t rv = (block_rows + 15) / 16, ld = 16 * rv;
  thread_local std::vector<float> xt_buffer;  // reused, as the dense blocks' scratch
  if (static_cast<int64_t>(xt_buffer.size()) < p.k * ld + 16) xt_buffer.resize(p.k * ld + 16);
  float* xt = align64(xt_buffer.data());  // not xt_buffer inside the workers
  std::atomic<bool> ok{true};
  for (int64_t i0 = 0; i0 < m && ok; i0 += block_rows) {
    const int64_t rows = std::min(block_rows, m - i0);
    const float* xb = x + i0 * p.k;
    at::parallel_for(0, p.k, 256, [&](int64_t k0, int64_t k1) { transpose_x(xb, p.k, rows, ld, k0, k1, xt); });
    at::parallel_for(0, p.n, 16, [&](int64_t begin, int64_t end) {
      bool done = false;
      switch (rv) {
        case 1: done = bitmap_row_vectors<1>(p, xt, ld, rows, y + i0 * p.n, p.n, begin, end); break;
        case 2: done = bitmap_row_vectors<2>(p, xt, ld, rows, y + i0 * p.n, p.n, begin, end); break;
        case 3: done = bitmap_row_vectors<3>(p, xt, ld, rows, y + i0 * p.n, p.n, begin, end); break;
        default: done = bitmap_row_vectors<4>(p, xt, ld, rows, y + i0 * p.n, p.n, begin, end); break;
      }
      if (!done) ok = false;
    });
  }
  return ok;
}
#endif

// Tasks of at least 2^17 multiply-adds, as dense_gemv's.
int64_t row_grain(int64_t k) { return std::max<int64_t>(16, (int64_t{1} << 17) / k); }

// Shapes and dtypes of one bitmap weight of `k` inputs; its output width n. The per-row counts are checked where the
// rows are read (bitmap_rows), row_start's order and ends here.
int64_t check_bitmap_weight(const char* op, const at::Tensor& values, const at::Tensor& mask,
                            const at::Tensor& row_start, int64_t k) {
  TORCH_CHECK(k > 0, op, ": k must be positive, got ", k);
  const int64_t words = (k + kWordInputs - 1) / kWordInputs;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"values", values}, {"mask", mask},
                                {"row_start", row_start}}) {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  }
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.dim() == 1, op, ": values must be 1-D float32 [nnz], got ",
              values.scalar_type(), " ", values.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kShort && mask.dim() == 2 && mask.size(0) > 0 && mask.size(1) == words, op,
              ": mask must be int16 [n, ceil(k/16)=", words, "] for k=", k, ", got ", mask.scalar_type(), " ",
              mask.sizes());
  const int64_t n = mask.size(0);
  TORCH_CHECK(row_start.scalar_type() == at::kLong && row_start.dim() == 1 && row_start.size(0) == n + 1, op,
              ": row_start must be int64 [n + 1 = ", n + 1, "], got ", row_start.scalar_type(), " ", row_start.sizes());
  const int64_t* starts = row_start.data_ptr<int64_t>();
  TORCH_CHECK(starts[0] == 0 && starts[n] == values.numel(), op, ": row_start must run from 0 to nnz=",
              values.numel(), ", got ", starts[0], " .. ", starts[n]);
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(starts[r] <= starts[r + 1], op, ": row_start decreases at row ", r, " (", starts[r], " > ",
                starts[r + 1], ")");
  return n;
}

BitmapProblem problem_of(const at::Tensor& values, const at::Tensor& mask, const at::Tensor& row_start, int64_t k) {
  return {values.data_ptr<float>(), mask.data_ptr<int16_t>(), row_start.data_ptr<int64_t>(), mask.size(0), k,
          mask.size(1), values.numel()};
}

[[noreturn]] void fail_rows(const char* op, const BitmapProblem& p) {
  for (int64_t r = 0; r < p.n; ++r)
    if (!p.row_consistent(r))
      TORCH_CHECK(false, op, ": row ", r, "'s mask has ", p.row_count(r), " kept weights but row_start gives it ",
                  p.row_start[r + 1] - p.row_start[r], " (corrupt bitmap)");
  TORCH_CHECK(false, op, ": a row's mask sets bits past k=", p.k, " (corrupt bitmap)");
}

at::Tensor bitmap_sparse_gemm_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                                  const at::Tensor& row_start, int64_t k) {
  constexpr const char* op = "bitmap_sparse_gemm";
  const int64_t n = check_bitmap_weight(op, values, mask, row_start, k);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, op, ": x must be float32 on the CPU, got ",
              x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, op, ": x must be [..., k=", k, "], got ", x.sizes());
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = n;
  at::Tensor y = at::empty(sizes, x.options());
  const int64_t m = x.numel() / k;
  if (m == 0) return y;
  const at::Tensor x2 = x.reshape({m, k}).contiguous();
  at::Tensor y2 = y.view({m, n});
  const BitmapProblem p = problem_of(values, mask, row_start, k);
  std::atomic<bool> ok{true};
  const Isa isa = select_isa();
#ifdef COMPTRUST_X86
  if (isa == Isa::kAvx512 && m >= kRowVectorMinRows && m < kRowVectorMaxRows) {
    if (!bitmap_by_row_vectors(p, x2.data_ptr<float>(), m, y2.data_ptr<float>())) fail_rows(op, p);
    return y;
  }
#endif
  if (m < kDenseMinRows) {
    const float* xf = x2.data_ptr<float>();
    float* yf = y2.data_ptr<float>();
    at::parallel_for(0, n, std::max<int64_t>(1, row_grain(k) / m), [&](int64_t begin, int64_t end) {
      if (!bitmap_rows(p, xf, k, m, yf, n, begin, end, isa, true)) ok = false;
    });
  } else {
    const int64_t block_rows = std::clamp<int64_t>(kDenseBlockBytes / (k * 4), 1, n);
    thread_local std::vector<float> buffer;  // reused: faulting a fresh block in cost more than expanding it
    if (static_cast<int64_t>(buffer.size()) < block_rows * k) buffer.resize(block_rows * k);
    float* scratch = buffer.data();
    for (int64_t r0 = 0; r0 < n && ok; r0 += block_rows) {
      const int64_t rows = std::min(block_rows, n - r0);
      at::parallel_for(r0, r0 + rows, 1, [&](int64_t begin, int64_t end) {
        if (!expand_rows(p, begin, end, scratch + (begin - r0) * k, isa)) ok = false;
      });
      if (!ok) break;
      at::Tensor y_block = y2.narrow(1, r0, rows);  // rows n apart: BLAS writes in place
      at::mm_out(y_block, x2, at::from_blob(scratch, {rows, k}, x.options()).t());
    }
  }
  if (!ok) fail_rows(op, p);
  return y;
}

// Several bitmap layers of one input (BoundGemv): their rows shared out in one parallel region, as DenseGemv's.
// The bitmaps were checked whole when bound, so steps skip the per-row count.
class BitmapSparseGemv final : public BoundGemv {
 public:
  BitmapSparseGemv(std::vector<at::Tensor> tensors, std::vector<BitmapProblem> layers)
      : tensors_(std::move(tensors)), layers_(std::move(layers)), isa_(select_isa()) {
    k_ = layers_[0].k;
    first_row_.push_back(0);
    for (const BitmapProblem& p : layers_) {
      widths_.push_back(p.n);
      first_row_.push_back(first_row_.back() + p.n);
    }
  }

  void run(const float* x, float* const* y) const override {
    at::parallel_for(0, first_row_.back(), row_grain(k_), [&](int64_t begin, int64_t end) {
      for (size_t i = 0; i < layers_.size(); ++i) {
        const int64_t first = std::max(begin, first_row_[i]), last = std::min(end, first_row_[i + 1]);
        if (first < last)
          bitmap_rows(layers_[i], x, k_, 1, y[i], 0, first - first_row_[i], last - first_row_[i], isa_, false);
      }
    });
  }

 private:
  std::vector<at::Tensor> tensors_;  // keeps the bound storage alive
  std::vector<BitmapProblem> layers_;
  std::vector<int64_t> first_row_;
  Isa isa_;
};

}  // namespace

std::shared_ptr<const BoundGemv> bind_bitmap_sparse_gemv(const std::vector<at::Tensor>& values,
                                                         const std::vector<at::Tensor>& mask,
                                                         const std::vector<at::Tensor>& row_start, int64_t k) {
  constexpr const char* op = "bind_bitmap_sparse_gemv";
  TORCH_CHECK(!values.empty() && values.size() == mask.size() && values.size() == row_start.size(), op,
              ": one values, mask and row_start per layer");
  std::vector<at::Tensor> tensors;
  std::vector<BitmapProblem> layers;
  for (size_t i = 0; i < values.size(); ++i) {
    check_bitmap_weight(op, values[i], mask[i], row_start[i], k);
    layers.push_back(problem_of(values[i], mask[i], row_start[i], k));
    for (int64_t r = 0; r < layers.back().n; ++r)
      if (!layers.back().row_consistent(r)) fail_rows(op, layers.back());
    tensors.insert(tensors.end(), {values[i], mask[i], row_start[i]});
  }
  return std::make_shared<BitmapSparseGemv>(std::move(tensors), std::move(layers));
}

}  // namespace comptrust::cpu

TORCH_LIBRARY_IMPL(comptrust, CPU, m) { m.impl("bitmap_sparse_gemm", &comptrust::cpu::bitmap_sparse_gemm_cpu); }
