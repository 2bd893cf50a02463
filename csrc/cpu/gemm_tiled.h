// The CPU int4/int3/int8 x float GEMM/GEMV over the tiled layout (csrc/include/comptrust/cpu_tiles.h): what its
// files share (the problem a call describes, the layout's lane orders, the AVX2 code decoders, each kernel family's
// entry points) and, below, its paths. gemm_tiled_cpu.cpp holds the ops and picks the path (gemm_tiled_2d, run);
// the SIMD kernel families are one file each, gemm_tiled_{avx2,panel,avx512,stream,bf16}.cpp.
//
// Five paths, picked by batch size, activation precision and CPU:
//   * direct (batch < kPanelMinRows, float activations): codes are decoded in registers and feed up to
//     kRowBlock rows at once. Per group we accumulate sum_k x*q and apply zero and scale once:
//       sum_k x*(q - z)*s = s * (sum_k x*q - z * sum_k x),   sum_k x precomputed per (row, group).
//     Batch 1 is memory-bound, so this is the path that must run at DRAM speed. One fp32 row on int4 and int3
//     layers (TiledGemv, also the decode program's bound product) reads each thread's tiles as one stream with x
//     as int8 limbs on VNNI where the limbs fit in L1 (limbs_fit_l1) and k and the group size fit
//     (int4_tile and int3_tile in gemm_tiled_stream.cpp).
//   * panel (batch >= kPanelMinRows, float activations): two tiles (four with AVX-512) are
//     dequantized once into an L1-resident fp32 panel, then a 6x16 (6x32) register-blocked microkernel runs
//     every row over it (the decode cost is paid once per weight instead of once per row block).
//   * dequantize + BLAS (batch >= kBlasMinRows, float activations, only without SIMD kernels; bf16 activations
//     where no bf16 panel takes them): blocks of tiles dequantized into a scratch and multiplied by torch's
//     GEMM (dense_blocks.h).
//   * AMX-BF16 (bf16 activations, kPanelMinRows <= batch < kAmxMaxRows, where the CPU has AMX): two tiles'
//     codes (or, for int8 and groups that split a 32-input step, dequantized weights) as a bf16 panel in the
//     tile unit's pair layout, multiplied with tdpbf16ps; codes are scaled per group in fp32. Without AMX but
//     with AVX512-BF16 (Zen 4), bf16 activations from kPanelMinRows to kDotMaxRows rows (kAmxMaxRows on large
//     layers) run the same panels on vdpbf16ps (bf16_dot.h). fp32
//     activations take it too for panels of codes (batch >= kPanelMinRows), x split into
//     three bf16 planes whose sum is exactly x (run_amx_fp32), in place of the panel path.
//   * a8 (int8 activations, any batch; int4/int3 weights): x is quantized per row and per block of 32
//     inputs, the codes are unpacked into u8 lanes and multiplied with vpdpbusd where the CPU has AVX-512
//     VNNI (64 u8 x s8 products per instruction), else vpmaddubsw/vpmaddwd (16 per pair), the integer
//     block sums scaled once per block. With VNNI, fp32 x runs there too where that is faster (limbs_for:
//     batch 1, and any batch on larger layers), as three int8 limbs per block (a group's inputs up to
//     kLimbBlock) that hold x to 2^-23 of the block's largest input (quantize_limbs): fp32 accuracy, in place of
//     the direct and panel kernels.
// Each kernel has an AVX2 path and a portable scalar one (the BLAS path a scalar dequantization); direct,
// a8 and the panel also an AVX-512 one (isa.h picks). The AVX-512 int4/int3 direct and a8 kernels take two
// neighbouring tiles per register (16 output columns for the same inputs).
// int8 weights (w8, for accuracy rather than size) have no a8 path: u8 codes up to 255 times s8
// activations would saturate vpmaddubsw's int16 pairs.
// Work split: tiles (8 output columns) are the tasks of at::parallel_for, so each thread streams a
// contiguous stretch of the weight; at batch 1 on large layers the a8 kernels run four tile pairs at once
// (eight weight streams per thread: more of the memory bandwidth), on more rows two (pairs_per_unit).
#pragma once
#include "torch_and_intrinsics.h"  // also isa.h: COMPTRUST_X86 on x86-64

#include <algorithm>
#include <cstdint>
#include <vector>

#include "comptrust/cpu_tiles.h"
#include "int8_limbs.h"  // kLimbs; the limb splitting on x86-64
#include "simd_common.h"

namespace comptrust::cpu::tiled {

constexpr int64_t kPanelMinRows = 8;
// Float x through dequantize + BLAS from kBlasMinRows rows: bf16 x where no bf16 panel takes it, and fp32 x only
// on the scalar kernels. The SIMD kernels take fp32 x at every batch (gemm_tiled_cpu.cpp, "dequantize + BLAS").
constexpr int64_t kBlasMinRows = 64;
// The tile kernels run a batch in passes of at most this many rows (gemm_tiled_2d).
constexpr int64_t kRowsPerPass = 256;

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
  int64_t block_inputs = kActBlock;  // x8's blocks: kActBlock inputs (a8), a group's inputs up to kLimbBlock (limbs)

  const int32_t* tile_w(int64_t t) const { return w + t * words_per_column(bits, k) * kTileCols; }
  const uint8_t* tile_zeros(int64_t t) const { return zeros + t * groups * kTileCols; }
  const at::Half* tile_scales(int64_t t) const { return scales + t * groups * kTileCols; }
  int64_t group_end(int64_t g) const { return std::min(k, (g + 1) * group_size); }
};

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

// ... and inside its 16 (int4) or 32 (int3) row unit in the one-stream kernels' lane order (gemm_tiled_stream.cpp's
// int4_tile / int3_tile). int4: inputs 16v..16v+15 as {0,2,4,6}, {8,10,12,14}, {1,3,5,7}, {9,11,13,15}; int3:
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

// Where half p of int3 block `block` lies in a tile of `blocks` blocks (cpu_tiles.h), in words from the tile's
// start (column 0's word; column c's is c further): its A word, and the word whose bits shift..shift+3 of each
// byte are its nibble.
struct Int3Words {
  int64_t a, nibbles;
  int shift;
};
inline Int3Words int3_words(int64_t blocks, int64_t block, int p) {
  const int64_t pair = (block - block % 2) * kInt3BlockPlanes * kTileCols;
  if (block % 2 == 0 && block + 1 == blocks) return {pair + p * kTileCols, pair + 2 * kTileCols, 4 * p};  // alone
  const int second = static_cast<int>(block % 2);
  return {pair + (2 * second + p) * kTileCols, pair + (4 + p) * kTileCols, 4 * second};
}

// Where a kernel family wants x's int8 codes (quantize_rows): the two-tile kernels' order or the one-stream one.
enum class Lanes { kTwoTile, kOneStream };

inline int64_t lane_position(Lanes lanes, int bits, int64_t kk) {
  return lanes == Lanes::kOneStream ? stream_lane_position(bits, kk) : a8_lane_position(bits, kk);
}

// sums[i][g] = the sum of x's row i over group g, in fp32 (the zero-point term of every float-x kernel).
void group_sums_fp32(const Problem& p, const float* x, float* sums);

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

// Codes of row j = 4q + i (0..15) of a half of an int3 block for 8 columns, as floats, from the half's A word and
// nibble word shifted to bits 0-3 (cpu_tiles.h, load_int3_half).
COMPTRUST_AVX2 inline __m256 int3_codes(__m256i a, __m256i nibbles, int j) {
  const int q = j / 4, i = j % 4;
  const __m256i bits = i == 0   ? _mm256_srli_epi32(a, 8 * q)
                       : i == 1 ? _mm256_srli_epi32(a, 8 * q + 3)
                       : i == 3 ? _mm256_srli_epi32(nibbles, 8 * q)
                                : _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(a, 8 * q + 6), _mm256_set1_epi32(3)),
                                                  _mm256_and_si256(_mm256_srli_epi32(nibbles, 8 * q + 1), _mm256_set1_epi32(4)));
  return _mm256_cvtepi32_ps(_mm256_and_si256(bits, _mm256_set1_epi32(7)));
}

// The A word and the nibble word (shifted to bits 0-3) of half p of block `block` of a tile, 8 columns.
COMPTRUST_AVX2 inline void load_int3_half(const int32_t* tw, int64_t blocks, int64_t block, int p, __m256i& a,
                                          __m256i& nibbles) {
  const Int3Words words = int3_words(blocks, block, p);
  a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tw + words.a));
  nibbles = _mm256_srli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tw + words.nibbles)), words.shift);
}

// Byte q of the result: code i (0..3) of row 4q + i of the half (a, nibbles: load_int3_half), u8 lanes for the
// int8-activation products.
COMPTRUST_AVX2 inline __m256i int3_code_bytes(__m256i a, __m256i nibbles, int i) {
  const __m256i seven = _mm256_set1_epi8(7);
  if (i == 0) return _mm256_and_si256(a, seven);
  if (i == 1) return _mm256_and_si256(_mm256_srli_epi16(a, 3), seven);
  if (i == 3) return _mm256_and_si256(nibbles, seven);
  return _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 6), _mm256_set1_epi8(3)),
                         _mm256_and_si256(_mm256_srli_epi16(nibbles, 1), _mm256_set1_epi8(4)));
}

// The same, 16 columns (two tiles' halves, or one tile's two halves interleaved), one vpternlogd for i = 2.
COMPTRUST_AVX512_VNNI inline __m512i int3_code_bytes(__m512i a, __m512i nibbles, int i) {
  const __m512i seven = _mm512_set1_epi8(7);
  if (i == 0) return _mm512_and_si512(a, seven);
  if (i == 1) return _mm512_and_si512(_mm512_srli_epi32(a, 3), seven);
  if (i == 3) return _mm512_and_si512(nibbles, seven);
  // per bit, mask 3 ? a >> 6 : (nibbles >> 1) & 4 (vpternlogd 0xCA)
  return _mm512_ternarylogic_epi32(_mm512_set1_epi8(3), _mm512_srli_epi32(a, 6),
                                   _mm512_and_si512(_mm512_srli_epi32(nibbles, 1), _mm512_set1_epi8(4)), 0xCA);
}

// ------------------------------------------------------------------------------------------- entry points
// gemm_tiled_avx2.cpp: AVX2 direct (float x) or a8 (int8 x, vpmaddubsw) kernels, every row of x, tile t.
void rows_avx2(const Problem& p, int64_t t, bool a8);

// gemm_tiled_panel.cpp: float x from kPanelMinRows rows through L1 panels of dequantized tiles (AVX2 or AVX-512
// microkernel, by isa), every tile; and tile t's weights dequantized for the BLAS path (dense_blocks.h), out
// [k][ld] from column 0 of the tile.
void panel_all(const Problem& p, Isa isa);
void dequantize_tile_avx2(const Problem& p, int64_t t, float* out, int64_t ld);
void dequantize_tile_avx2(const Problem& p, int64_t t, at::BFloat16* out, int64_t ld);

// gemm_tiled_avx512.cpp: the AVX-512 two-tile kernels. run_vnni_two_tile: every tile on the VNNI kernel (int8 x,
// or fp32 x as limbs: p.limbs), in units of pairs_per_unit tile pairs; grain: tiles per task. direct_rows_avx512:
// float x on tiles 2u and 2u + 1 (int4 / int3); int8_rows_avx512: float x on int8 tile t.
void run_vnni_two_tile(const Problem& p, int64_t grain);
void direct_rows_avx512(const Problem& p, int64_t u);
void int8_rows_avx512(const Problem& p, int64_t t);

// gemm_tiled_stream.cpp: the one-stream VNNI kernels (one row of x, int4 / int3).
constexpr int kStreamInputs = 16;
// Layers of fp32 x take it while x's limbs (3k bytes, reread for every tile) fill at most 70% of a core's L1 data
// cache (limbs_fit_l1), at any size (int8 activations, k bytes, at any k). On Zen 4 (32 KB L1d, k = 4096: 37%),
// cold, alternated in one process, against the two-tile limb kernel (a8_avx512): 4096 x 4096 and 11008 x 4096 read
// 3-10% and 14-17% faster, 4096 x 11008 (103%) 20% slower; SmolLM2's layers (k = 576, 1536) 20-50% faster than on
// the two-tile fp32 one; int3 11008 x 4096 and 4096 x 4096 1.10x, SmolLM2's 576 x 576, 576 x 1536 and 1536 x 576
// 1.12x, 1.20x and 1.43x. On Zen 5 (48 KB L1d), against torch's int4pack op in the same runs (medians of 6 and 4
// alternated runs): 4096 x 11008 (69%) int4 1.05x on it against 0.94x on the two-tile kernel, int3 1.40x against
// 1.10x; 4096 x 14336 (90%) int4 1.03x against 1.21x, int3 1.23x against 1.35x.

inline bool stream_fits(int bits, int64_t k, int64_t group_size) {
  if (bits == 3) return group_size % kInt3BlockRows == 0;  // k is a multiple of 32 in the int3 layout
  return bits == 4 && k % kStreamInputs == 0 && group_size % kStreamInputs == 0;
}

// x's int8 codes in a kernel family's lane order (lane_position), as LimbOrder for limbs_of_block and
// quantize_block_int8.
const LimbOrder& lane_order(Lanes lanes, int bits);

// The activations of one row for the one-stream kernels, as `limbs` int8 rows in their lane order
// (stream_lane_position): codes[l * k + kk] limb l of input kk's position, steps[(l * groups + g) *
// blocks_per_group + b] the step of limb l in block b of group g, a block being block_inputs inputs (fewer at a
// group's end). fp32 x: kLimbs limbs (stream_limbs, fp32 accuracy) per block of up to kLimbBlock inputs; int8
// activations (act_bits 8): one, x's a8 codes (stream_int8), per block of kActBlock.
struct StreamLimbs {
  int limbs = kLimbs;
  int64_t block_inputs = kActBlock, blocks_per_group = 1;
  std::vector<int8_t> codes;
  std::vector<float> steps;
};

// x's kLimbs limbs for the one-stream kernels (fp32 accuracy).
void stream_limbs(const Problem& p, const float* x, StreamLimbs& out);
// Tiles 2u and 2u + 1 (the work units of the two-tile kernels), one after the other.
void stream_vnni_pair(const Problem& p, const StreamLimbs& x, int64_t u);

// gemm_tiled_bf16.cpp: bf16 panels on AMX-BF16 or AVX512-BF16 (vdpbf16ps).
// Whether bf16 x of m rows runs on the bf16 panels (either engine).
bool bf16_panels_for(int64_t m, int64_t n, int64_t k);
// y = x @ W^T for bf16 x and y.
void run_bf16_panels(const Problem& p, const at::BFloat16* x, at::BFloat16* y);
// Whether fp32 x of p.m rows runs on the tile unit as three exact bf16 planes (run_amx_fp32).
bool amx_fp32_for(const Problem& p);
void run_amx_fp32(const Problem& p, const float* x, float* y);
#endif  // COMPTRUST_X86

}  // namespace comptrust::cpu::tiled
