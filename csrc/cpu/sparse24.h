// The CPU 2:4 sparse x float GEMM/GEMV over the tiled 2:4 layout (csrc/include/comptrust/sparse24_tiles.h): what
// its files share (the problem a call describes, the kept values' storage types, the decoders and constants both
// SIMD widths use, each kernel family's entry points) and, below, its paths. sparse24_cpu.cpp holds the ops, the
// path choice (run_kind, run), x's preparation and the bound one-row products; the SIMD kernel families are one
// file each, sparse24_{avx2,avx512,vnni,bf16}.cpp (and the row-vector kernel, sparse24_row_vectors.h).
//
// One kernel for batches below kDenseMinRows, on blocks of up to kRowBlock rows (larger batches expand the
// weight block by block and run torch's GEMM, see run_expanded). Per group of 4 inputs, x[4g..4g+3]
// is broadcast into both halves of a register and vpermps picks, per output column, the input each kept
// value multiplies: two permutes and two fused multiply-adds cover 16 weights, and the metadata word needs
// two variable shifts and no masking (see the layout header). Batch 1 is memory-bound: this is the path
// that must read the half-size weight at DRAM speed.
// int4 values: per quantization group, sum_k x*(q - z) with q - z formed in integers, then times s.
// A dequantize-to-dense-panel kernel (gemm_tiled's choice for batch >= 8) was slower here at every batch
// from 8 to 64 (4096x4096 fp32, m = 32: 14.5 ms against 11.2): its scatter costs more than it saves, and it
// multiplies the zeros that this kernel skips.
// An AVX-512 version (both kept-value slots in one register) runs where the CPU has it; a portable scalar
// twin where AVX2 is missing. Work split: tiles (8 output columns) are
// at::parallel_for's tasks.
// On AVX-512, float x from 32 rows on (bf16 x to 511) runs the row-vector kernel instead (sparse24_row_vectors.h:
// vectorized over x's rows, so only the kept weights are multiplied), except where the tile unit below is faster.
// Where the CPU has AMX, bf16 activations from 8 rows, and fp32 ones from 16 when the kept values are exact in
// bf16, run on the tile unit instead (run_bf16_panels); without AMX but with AVX512-BF16, bf16 activations
// from 8 to kDotMaxRows rows (kAmxMaxRows on large layers) run the same panels on vdpbf16ps (bf16_dot.h), as
// sparse rows that skip the zeros.
// int8 activations with int4 values run on VNNI (a8_int4_avx512), and there too fp32 ones at batch 1 on large
// layers, as int8 limbs (int8_limbs.h); one row reads one tile at a time where k and the groups allow it
// (stream_int4_avx512: one weight stream per thread).
// DecodeProgram binds one fp32 row's product to its layers once (Sparse24Gemv, bound_gemv.h): the per-tile batch-1
// kernels above, a layer's q/k/v or gate/up in one parallel region, without the dispatcher's per-call work.
#pragma once
#include "torch_and_intrinsics.h"  // also isa.h: COMPTRUST_X86 on x86-64

#include <algorithm>
#include <cstdint>

#include "comptrust/sparse24_tiles.h"
#include "int8_limbs.h"  // kLimbs; the limb splitting on x86-64
#include "simd_common.h"
#ifdef COMPTRUST_X86
#include "amx_bf16.h"
#endif

namespace comptrust::cpu::sparse24 {

struct Sparse24Problem {
  const float* x;          // [m, k] fp32
  const void* values;      // float kinds [n/8, k/4, 2, 8]; int4: [n/8, k/16, 8] int32
  const uint32_t* meta;    // [n/8, k/4]
  const uint8_t* zeros;    // int4 only: [n/8, groups, 8]
  const at::Half* scales;  // int4 only: [n/8, groups, 8]
  float* y;                // [m, n]
  int64_t m, n, k;
  int64_t group_size;  // kept values per quantization group (int4); k/2 for float values: one "group"
  int64_t groups;

  int64_t sparse_groups() const { return k / kSparse24Group; }
  const uint32_t* tile_meta(int64_t t) const { return meta + t * sparse_groups(); }
  template <class V>
  const V* tile_values(int64_t t) const {
    return static_cast<const V*>(values) + t * sparse_groups() * kSparse24Kept * kTileCols;
  }
  const int32_t* tile_words(int64_t t) const { return static_cast<const int32_t*>(values) + t * (k / 16) * kTileCols; }
  const uint8_t* tile_zeros(int64_t t) const { return zeros + t * groups * kTileCols; }
  const at::Half* tile_scales(int64_t t) const { return scales + t * groups * kTileCols; }
  // Kept values [kept_begin, kept_end) of quantization group g.
  int64_t kept_end(int64_t g) const { return std::min(k / kSparse24Kept, (g + 1) * group_size); }
};

// Tag types for the kept values' storage: at::BFloat16 / at::Half / float, or int4 codes.
struct Int4Values {};

template <class V>
inline float to_float(V v) {
  return static_cast<float>(v);
}

// From this many rows the weight is expanded block by block into torch's GEMM (sparse24_cpu.cpp run_expanded).
constexpr int64_t kDenseMinRows = 192;

// Batch 1, float values: 4 tiles per task on layers of at least 128 tiles, except where one_weight_stream(). Side
// by side, cold weights, 4096x4096 and 11008x4096 fp32 values against dense fp32 F.linear: 1.84-1.88x (one tile per
// task: 1.47-1.52x, the bytes' limit is 1.88x). On Zen 5 the other way round: one tile at a time 1.72-1.91x our
// dense_gemv on the three Llama shapes, four side by side 1.42-1.50x (cold, alternated in one process).
constexpr int kStreamTiles = 4;
constexpr int64_t kStreamTilesMin = 128;
constexpr int kStreamA8Pairs = 2;  // int4 values, int8 x

// One row of int8 x (or of fp32 x's limbs) through int4 values on the a8 kernel: on layers of at least
// kStreamTilesMin tiles the first a8_row_units(p) work units are kStreamA8Pairs tile pairs each, then (and on
// smaller layers every unit is) one pair, the last of which may hold one tile.
inline int64_t a8_row_units(const Sparse24Problem& p) {
  const int64_t pairs = (p.n / kTileCols + 1) / 2;
  return 2 * pairs >= kStreamTilesMin ? (pairs - 1) / kStreamA8Pairs : 0;
}

#ifdef COMPTRUST_X86
// ------------------------------------------------------------------- what both SIMD widths share
// Per-lane shifts that bring column c's idx0 (idx1) to the low bits of lane c.
COMPTRUST_AVX2 inline __m256i idx0_shifts() { return _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28); }
COMPTRUST_AVX2 inline __m256i idx1_shifts() { return _mm256_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30); }

template <int R>
constexpr int kFloatChains = R == 1 ? 2 : 1;  // groups in flight per step; each has 2 chains (j = 0, 1)
// Float values stream 8x the bytes per decoded weight that int4 codes do, so they are prefetched further
// ahead than kPrefetchBytes: at batch 1 on 4096x4096, 4096 bytes read ~1.3x faster than 1024 (512 was
// slower still), and without software prefetch 1.5x slower. Into L2 8 KB ahead rather than into L1 4 KB ahead
// (AMD EPYC, cold, alternated in one process): 1.08-1.27x on 4096x4096 and 11008x4096 at batch 1 and 4, AVX-512
// and AVX2 paths, fp32 and bf16 values; even on SmolLM2's small shapes.
constexpr int64_t kValuePrefetchBytes = 8192;

// Independent multiply-add chains per row of the int4-value kernels (see direct_int4_avx2).
template <int R>
constexpr int kProductChains = R == 1 ? 4 : 2;

// A group's four dense rows for one tile: row i holds, per column, the kept value whose index is i, or zero.
COMPTRUST_AVX2 inline void group_rows(uint32_t meta_word, __m256 v0, __m256 v1, __m256 (&rows)[kSparse24Group]) {
  const __m256i word = _mm256_set1_epi32(static_cast<int>(meta_word)), three = _mm256_set1_epi32(3);
  const __m256i idx0 = _mm256_and_si256(_mm256_srlv_epi32(word, idx0_shifts()), three);
  const __m256i idx1 = _mm256_and_si256(_mm256_srlv_epi32(word, idx1_shifts()), three);
  COMPTRUST_UNROLL for (int i = 0; i < kSparse24Group; ++i) {
    const __m256i row = _mm256_set1_epi32(i);
    const __m256 at0 = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(idx0, row)), v0);
    const __m256 at1 = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(idx1, row)), v1);
    rows[i] = _mm256_or_ps(at0, at1);
  }
}

// -------------------------------------------------------------------------------- AVX2 helpers
COMPTRUST_AVX2 inline __m256 load_values(const float* v) { return _mm256_loadu_ps(v); }
COMPTRUST_AVX2 inline __m256 load_values(const at::Half* v) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
}
COMPTRUST_AVX2 inline __m256 load_values(const at::BFloat16* v) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));  // bf16 is the high half of an fp32
}

// Kept values 0 and 1 of group g of tile t, dequantized (int4: as kept_value does).
template <class V>
COMPTRUST_AVX2 inline void group_values(const Sparse24Problem& p, int64_t t, int64_t g, __m256& v0, __m256& v1) {
  if constexpr (std::is_same_v<V, Int4Values>) {
    const int64_t qg = kSparse24Kept * g / p.group_size;
    const __m256 zeros = load_zeros(p.tile_zeros(t) + qg * kTileCols);
    const __m256 scale = load_scales(p.tile_scales(t) + qg * kTileCols);
    const __m256i words = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(p.tile_words(t) + g / kSparseInt4WordGroups * kTileCols));
    const int slot = static_cast<int>(kSparse24Kept * (g % kSparseInt4WordGroups));
    v0 = _mm256_mul_ps(_mm256_sub_ps(int4_codes(words, slot), zeros), scale);
    v1 = _mm256_mul_ps(_mm256_sub_ps(int4_codes(words, slot + 1), zeros), scale);
  } else {
    const V* v = p.tile_values<V>(t) + g * kSparse24Kept * kTileCols;
    v0 = load_values(v);
    v1 = load_values(v + kTileCols);
  }
}


// ------------------------------------------------------------------------------------------- entry points
// sparse24_avx2.cpp: every row of x on tile t (float or int4 values), and tile t as dense W^T rows out[kk][0..7]
// (ld apart, zeros where pruned) for the expanded path.
template <class V>
void rows_avx2(const Sparse24Problem& p, int64_t t);
template <class V, typename Out>
void expand_tile_avx2(const Sparse24Problem& p, int64_t t, Out* out, int64_t ld);

// sparse24_avx512.cpp: every row of x on tile t; one row on tile t (what the bound product runs, bit-identical
// to the op at m == 1); one row on tiles t..t+kStreamTiles-1 together (float values).
template <class V>
void rows_avx512(const Sparse24Problem& p, int64_t t);
template <class V>
void one_row_avx512(const Sparse24Problem& p, int64_t t);
template <class V>
void stream_tiles_avx512(const Sparse24Problem& p, int64_t t);

// sparse24_vnni.cpp: int4 values on int8 x (x8, block_scale: quantize_rows_int8's layout, or quantize_rows_limbs's
// with limbs) with VNNI and VBMI: every row on tile pair u (tiles 2u, 2u + 1), and one row's work unit u of `units`
// (a8_row_units).
void a8_int4_rows(const Sparse24Problem& p, const int8_t* x8, const float* block_scale, int64_t u);
void a8_int4_row_unit(const Sparse24Problem& p, const int8_t* x8, const float* block_scale, int64_t u, int64_t units,
                      bool limbs);
// ... and one row on tile t alone (stream_int4_avx512: one stream per thread), x8 in stream_int4_order, where
// stream_int4_fits.
void stream_int4_tile(const Sparse24Problem& p, const int8_t* x8, const float* block_scale, int64_t t, bool limbs);
// Whether one row (int8 x, or fp32 x as limbs) runs tile by tile on stream_int4_tile: the CPU has VNNI and VBMI, k
// and a quantization group's inputs are whole activation blocks, and fp32 x's limbs stay in L1 (limbs_fit_l1).
inline bool stream_int4_fits(const Sparse24Problem& p, bool limbs) {
  return avx512_vnni_vbmi_usable() && p.k % kActBlock == 0 && 2 * p.group_size % kActBlock == 0 &&
         (!limbs || limbs_fit_l1(p.k));
}
// The inputs per block of x's scales there: int8 x's activation blocks; fp32 x's limbs a quantization group's
// inputs up to kLimbBlock (whole activation blocks, as stream_int4_fits asks of the group).
inline int64_t stream_int4_block_inputs(const Sparse24Problem& p, bool limbs) {
  return limbs ? std::min<int64_t>(2 * p.group_size, kLimbBlock) : kActBlock;
}
// x8's rows (k bytes each) from the natural order to stream_int4_avx512's: the middle 8-byte quarters of every
// 32-input block swapped.
inline void to_stream_int4_order(int8_t* x8, int64_t rows, int64_t k) {
  for (int64_t i = 0; i < rows * k; i += kActBlock) std::swap_ranges(x8 + i + 8, x8 + i + 16, x8 + i + 16);
}

// sparse24_bf16.cpp: the bf16 panels (AMX-BF16 or AVX512-BF16). Whether bf16 x runs on them; whether fp32 x runs
// on the tile unit as three exact bf16 planes; y = x @ W^T there (Out bf16 for bf16 x, float for fp32 x's planes).
bool bf16_panels_for(const Sparse24Problem& p);
template <class V>
bool amx_fp32_for(const Sparse24Problem& p, Isa isa);
template <class V, class Out>
void run_bf16_panels(const Sparse24Problem& p, const AmxActivations& x, Out* y);
#endif  // COMPTRUST_X86

}  // namespace comptrust::cpu::sparse24
