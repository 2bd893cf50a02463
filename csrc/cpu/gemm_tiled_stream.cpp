// The one-stream kernels of the tiled GEMM (gemm_tiled.h): one row of x on int4 / int3 tiles, each tile read as
// one sequential stream, x as int8 limbs (fp32 x) or its a8 codes (int8 x) on VNNI's vpdpbusd.
//
// The two-tile kernels (direct_avx512, a8_avx512) read tiles t and t + 1 side by side: two streams of 32-byte
// rows (2.3 KB apart at k = 576), more with P > 1. At batch 1 on the embedded model's layers, cold, that read
// pattern and the fp32 kernel's decoding (a shift, a vpermps and a multiply-add per 16 products) held them to
// 12-14 GB/s in place, where the dense rows (one stream per thread) read 25-30. This kernel reads one tile at
// a time, two word rows (16 inputs of its 8 columns) per 64-byte load, so a thread's stretch of tiles is one
// sequential stream; fp32 x is three int8 limbs per block of up to kLimbBlock inputs (int8_limbs.h: fp32
// accuracy), multiplied with vpdpbusd: per 64 bytes of weights one vpermd, three mask/shift instructions and six
// vpdpbusd. With int8 activations (act_bits 8) x is one limb, its a8 codes, and two vpdpbusd: then the kernels run
// at the memory's pace. Against the two-tile a8 kernel it replaced at one row (cold, alternated in one process):
// 4096 x 4096 and 11008 x 4096 1.20-1.29x (int4 and int3), 4096 x 11008 1.12x / 1.03x, SmolLM2's layers even to
// 1.08x; the embedded model's w4a8 and w3a8 decode 105 -> 282 and 113 -> 305 tokens/s (the program now binds those
// layers too).
// The vpermd puts word row 2v's column c in lane 2c and row 2v + 1's in lane 2c + 1 (inputs 16v..16v+7 and
// 16v+8..16v+15); a lane's low nibbles are its even inputs, the high nibbles its odd ones. So the activation
// operand of the low nibbles is 4 int8 of inputs 16v + {0,2,4,6} in even lanes and 16v + {8,10,12,14} in odd
// ones: one 8-byte broadcast (vpbroadcastq, a plain load), as is the high nibbles' ({1,3,5,7}, {9,11,13,15}).
// Each block's integer sums are scaled by its limb steps; per group the lane pairs are added before the zero
// point and scale are applied. Needs k and the group size to be multiples of 16 (stream_fits).
// What a line of weights costs, in L2, one thread (Zen 5 at ~3.8 GHz; a memory giving two cores 77 GB/s brings each
// a line every 6.3 cycles): int4 fp32 x 4.9 cycles, int8 x 3.2; int3 (a line is 171 weights to int4's 128) 7.5 and
// 5.1. The work around a limb block's steps (its sums cleared, scaled and added, a group's zero point and scale, the
// loops' bounds) costs much of that: the code before spent 2.0 of its 6.0 cycles there. Straight-line limb blocks,
// pointers advanced rather than bounds worked out per block, and the steps forced inline took int4 from 6.0 and 5.6
// cycles (1.23x, 1.77x), int3 from 7.9 and 5.5 (1.06x, 1.07x), alternated run by run. Cold that shows only in part
// (4096 x 4096, two threads, call by call against the code before, reads at 40-70 GB/s: fp32 0.98-1.03x, int8 x
// 0.99-1.06x): at 75 GB/s int4 reads 52 GB/s on fp32 x and 66 on int8 x, as if memory stalls and work added up.
// Reading two tiles side by side, so that x's broadcasts serve both, took int4 fp32 to 4.0 cycles in L2 but cold to
// 0.73-0.92x: two streams 16 KB apart read slower than one.
#include "gemm_tiled.h"

#ifdef COMPTRUST_X86
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace comptrust::cpu::tiled {
namespace {

// GCC left int4_block a call, its sums and pointers passed through memory (1.4x slower in L2), so the steps and blocks
// are forced inline; each int4_tile / int3_tile instantiation stays a function of its own (inlined into one
// function, all of them, they spilled).
#define COMPTRUST_FORCE_INLINE inline __attribute__((always_inline))
#define COMPTRUST_OWN_FUNCTION __attribute__((noinline))

template <int kSets, int L>
COMPTRUST_AVX512 COMPTRUST_FORCE_INLINE void clear_sums(__m512i (&acc)[kSets][L]) {
  for (auto& set : acc)
    for (__m512i& a : set) a = _mm512_setzero_si512();
}

// The one-stream kernels' lanes hold a column's sums in lane pairs (2c, 2c + 1). A limb block's integer sums are
// kept in a few sets, so that its vpdpbusd form a few chains (each waits 4 cycles on the one before it in its set;
// Zen 5 issues two a cycle). More sets than int4_step and int3_products use ran 5-9% slower in L2: a block's chains
// overlap the next block's anyway, and each set costs a clear and an add per limb. Sets [first, first + count) (all
// by default), the sums of block b of group g, scaled by its limb steps (L limbs: x.limbs), added into `sum`:
template <int L, int kSets>
COMPTRUST_AVX512 COMPTRUST_FORCE_INLINE __m512 add_limb_block(const Problem& p, const StreamLimbs& x, int64_t g,
                                                              int64_t b, const __m512i (&acc)[kSets][L], __m512 sum,
                                                              int first = 0, int count = kSets) {
  for (int l = 0; l < L; ++l) {
    __m512i total = acc[first][l];
    for (int set = first + 1; set < first + count; ++set) total = _mm512_add_epi32(total, acc[set][l]);
    const float limb_step = x.steps[(l * p.groups + g) * x.blocks_per_group + b];
    sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_set1_ps(limb_step), sum);
  }
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

// The word row pair at `words` (16 words: half 0's 8 columns, then half 1's) in the lanes above.
COMPTRUST_AVX512_VNNI inline __m512i interleaved_halves(const int32_t* words) {
  const __m512i interleave = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  return _mm512_permutexvar_epi32(interleave, _mm512_loadu_si512(words));
}

// The int4 kernel. A limb block's integer sums are kept in two sets, a step's even nibbles adding into one and its
// odd nibbles into the other.
constexpr int kInt4Sets = 2;

// One step: word rows 2v, 2v + 1 at `rows` (inputs 16v..16v+15; `codes` at limb 0's bytes of them).
template <int L>
COMPTRUST_AVX512_VNNI COMPTRUST_FORCE_INLINE void int4_step(const int32_t* rows, const int8_t* codes, int64_t k,
                                                            __m512i (&acc)[kInt4Sets][L]) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  prefetch_to_l2(rows, 2 * kPrefetchBytes);
  const __m512i words = interleaved_halves(rows);
  const __m512i even = _mm512_and_si512(words, nibble), odd = _mm512_and_si512(_mm512_srli_epi32(words, 4), nibble);
  for (int l = 0; l < L; ++l) {
    int64_t low, high;
    std::memcpy(&low, codes + l * k, sizeof low);
    std::memcpy(&high, codes + l * k + 8, sizeof high);
    acc[0][l] = dpbusd(acc[0][l], even, _mm512_set1_epi64(low));
    acc[1][l] = dpbusd(acc[1][l], odd, _mm512_set1_epi64(high));
  }
}

// Block b of group g: `steps` steps (kSteps, unrolled, where that is not 0) from rows / codes on, both advanced
// past it, added into sum.
template <int L, int kSteps>
COMPTRUST_AVX512_VNNI COMPTRUST_FORCE_INLINE __m512 int4_block(const Problem& p, const StreamLimbs& x, int64_t g,
                                                               int64_t b, int64_t steps, const int32_t*& rows,
                                                               const int8_t*& codes, __m512 sum) {
  __m512i acc[kInt4Sets][L];
  clear_sums(acc);
  if constexpr (kSteps > 0) {
    steps = kSteps;
    COMPTRUST_UNROLL for (int s = 0; s < kSteps; ++s)
      int4_step(rows + s * 2 * kTileCols, codes + s * kStreamInputs, p.k, acc);
  } else {
    for (int64_t s = 0; s < steps; ++s) int4_step(rows + s * 2 * kTileCols, codes + s * kStreamInputs, p.k, acc);
  }
  rows += steps * 2 * kTileCols;
  codes += steps * kStreamInputs;
  return add_limb_block(p, x, g, b, acc, sum);
}

// One row on int4 tile t: per group its whole limb blocks of kSteps steps (0: however many, not unrolled), then
// the part of one left at its end, if any (a last group short of the group size, a group size not a multiple of
// the block's).
template <int L, int kSteps>
COMPTRUST_AVX512_VNNI COMPTRUST_OWN_FUNCTION void int4_tile(const Problem& p, const StreamLimbs& x, int64_t t) {
  const int32_t* rows = p.tile_w(t);
  const int8_t* codes = x.codes.data();
  const int64_t block_steps = x.block_inputs / kStreamInputs;
  __m512 out = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512 sum = _mm512_setzero_ps();
    int64_t b = 0, left = (p.group_end(g) - g * p.group_size) / kStreamInputs;
    for (; left >= block_steps; left -= block_steps)
      sum = int4_block<L, kSteps>(p, x, g, b++, block_steps, rows, codes, sum);
    if (left > 0) sum = int4_block<L, 0>(p, x, g, b, left, rows, codes, sum);
    out = add_group(p, t, g, sum, out);
  }
  store_pairs(p, t, out);
}

// int3, one tile at a time as the int4 kernel. A pair of blocks (64 inputs of the tile's 8 columns) is 192
// contiguous bytes, three whole cache lines (cpu_tiles.h): each block's two A word rows, then the two nibble word
// rows they share. One vpermd per 64-byte load puts half 0's column c in lane 2c and half 1's in lane 2c + 1;
// then code operand i = 0..3 holds, per lane, rows 16p + 4q + i in byte q (int3_code_bytes: one or two
// instructions, three for i = 2), ready for vpdpbusd against x's 8 bytes {x[4q + i]}, {x[16 + 4q + i]}
// (stream_lane_position). Per 192 bytes of weights three vpermd, ~17 shift/mask/merge instructions and 24
// vpdpbusd (8 with int8 activations). Needs the group size to be a multiple of 32 (stream_fits), so a limb block
// is whole int3 blocks; a block whose partner lies in another limb block (groups of an odd number of blocks, a
// last block alone) is read on its own.
// The layout before (two 2-bit planes and a high-bit plane per 96-byte block: two vpermd, a vpsrlvd and ~14
// shift/mask/merge instructions per block, and every other block's 64-byte load split across cache lines) kept
// int3 fp32 at 0.80x int4's weights per second with both in L3, and cold at 1.0-1.1x int4's speed where its
// bytes allow 1.31x. This one, alternated in one process (old time / new, cold, call order rotated): 4096 x 4096
// 1.13-1.17x, 11008 x 4096 1.12x; in L3 int3 at 0.95x int4's weights per second. In `bench int` after it, batch 1
// against int4: fp32 x 1.22x / 1.14x / 1.12x (4096 x 4096, 11008 x 4096, 4096 x 11008; 1.08 / 0.96 / 0.98 in the
// last run before), int8 activations 1.28x / 1.31x / 1.26x.
constexpr int64_t kInt3PrefetchBytes = 4096;

// int3's sets: a limb block's even blocks add into sets [0, kInt3Sets), its odd ones into the next kInt3Sets, code
// operand i of a block into set i % kInt3Sets of its half: with one limb (int8 activations) a pair's 8 vpdpbusd
// form four chains of two, with three limbs its 24 form six chains of four.
template <int L>
constexpr int kInt3Sets = L == 1 ? 2 : 1;
template <int L>
using Int3Sums = __m512i[2 * kInt3Sets<L>][L];

// Block `block`'s codes, operands i = 0..3 (a: its A words, nibbles: its nibble words in bits 0-3 of each byte,
// both in the lanes above), into sets from `first` on.
template <int L>
COMPTRUST_AVX512_VNNI COMPTRUST_FORCE_INLINE void int3_products(const Problem& p, const StreamLimbs& x, int64_t block,
                                                                __m512i a, __m512i nibbles, Int3Sums<L>& acc,
                                                                int first) {
  COMPTRUST_UNROLL for (int i = 0; i < 4; ++i) {
    const __m512i codes = int3_code_bytes(a, nibbles, i);
    for (int l = 0; l < L; ++l) {
      int64_t inputs;
      std::memcpy(&inputs, x.codes.data() + l * p.k + block * kInt3BlockRows + 8 * i, sizeof inputs);
      __m512i& sums = acc[first + i % kInt3Sets<L>][l];
      sums = dpbusd(sums, codes, _mm512_set1_epi64(inputs));
    }
  }
}

// Blocks `block` (even) and block + 1 of a pair.
template <int L>
COMPTRUST_AVX512_VNNI COMPTRUST_FORCE_INLINE void int3_pair_step(const Problem& p, const StreamLimbs& x,
                                                                 const int32_t* tw, int64_t block, Int3Sums<L>& acc) {
  const int32_t* pw = tw + block * kInt3BlockPlanes * kTileCols;
  for (int line = 0; line < 3; ++line) prefetch_to_l2(pw + 16 * line, kInt3PrefetchBytes);
  const __m512i nibbles = interleaved_halves(pw + 4 * kTileCols);
  int3_products<L>(p, x, block, interleaved_halves(pw), nibbles, acc, 0);
  int3_products<L>(p, x, block + 1, interleaved_halves(pw + 2 * kTileCols), _mm512_srli_epi32(nibbles, 4), acc,
                   kInt3Sets<L>);
}

// Block `block` alone: one of a pair, or a last block without one (its nibble word holds both halves).
template <int L>
COMPTRUST_AVX512_VNNI COMPTRUST_FORCE_INLINE void int3_block_step(const Problem& p, const StreamLimbs& x,
                                                                  const int32_t* tw, int64_t block, Int3Sums<L>& acc) {
  const Int3Words half0 = int3_words(p.k / kInt3BlockRows, block, 0), half1 = int3_words(p.k / kInt3BlockRows, block, 1);
  prefetch_to_l2(tw + half0.a, kInt3PrefetchBytes);
  prefetch_to_l2(tw + half0.nibbles, kInt3PrefetchBytes);
  __m512i nibbles;
  if (half1.nibbles == half0.nibbles) {  // alone: lane 2c gets word c, lane 2c + 1 word c >> 4
    const __m512i twice = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i odd_lanes_by_4 = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tw + half0.nibbles));
    nibbles = _mm512_srlv_epi32(_mm512_permutexvar_epi32(twice, _mm512_castsi256_si512(words)), odd_lanes_by_4);
  } else {
    nibbles = _mm512_srli_epi32(interleaved_halves(tw + half0.nibbles), half0.shift);
  }
  // a constant first set: (block % 2) * kInt3Sets as an index kept every set on the stack, in every step
  if (block % 2) int3_products<L>(p, x, block, interleaved_halves(tw + half0.a), nibbles, acc, kInt3Sets<L>);
  else int3_products<L>(p, x, block, interleaved_halves(tw + half0.a), nibbles, acc, 0);
}

// int3 blocks s..end - 1 of one limb block: whole pairs together, any other block alone.
template <int L>
COMPTRUST_AVX512_VNNI COMPTRUST_FORCE_INLINE void int3_steps(const Problem& p, const StreamLimbs& x, const int32_t* tw,
                                                             int64_t s, int64_t end, Int3Sums<L>& acc) {
  while (s < end) {
    if (s % 2 == 0 && s + 2 <= end) {
      int3_pair_step<L>(p, x, tw, s, acc);
      s += 2;
    } else {
      int3_block_step<L>(p, x, tw, s, acc);
      ++s;
    }
  }
}

// One row on int3 tile t: per group, its limb blocks of kBlocks int3 blocks each (1, 2 or 4) as whole pairs
// (kBlocks 1: a pair is two limb blocks) while they start on one, then the rest one limb block at a time, its
// blocks in pairs where they can be (int3_steps; kBlocks 0: everything so).
template <int L, int kBlocks>
COMPTRUST_AVX512_VNNI COMPTRUST_OWN_FUNCTION void int3_tile(const Problem& p, const StreamLimbs& x, int64_t t) {
  const int32_t* tw = p.tile_w(t);
  const int64_t limb_blocks = x.block_inputs / kInt3BlockRows;
  __m512 out = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512 sum = _mm512_setzero_ps();
    int64_t s = g * p.group_size / kInt3BlockRows, b = 0;
    const int64_t last = p.group_end(g) / kInt3BlockRows;
    Int3Sums<L> acc;
    if constexpr (kBlocks == 1) {
      for (; s % 2 == 0 && s + 2 <= last; s += 2, b += 2) {
        clear_sums(acc);
        int3_pair_step<L>(p, x, tw, s, acc);
        sum = add_limb_block(p, x, g, b, acc, sum, 0, kInt3Sets<L>);
        sum = add_limb_block(p, x, g, b + 1, acc, sum, kInt3Sets<L>, kInt3Sets<L>);
      }
    } else if constexpr (kBlocks > 1) {
      for (; s % 2 == 0 && s + kBlocks <= last; s += kBlocks, ++b) {
        clear_sums(acc);
        COMPTRUST_UNROLL for (int pair = 0; pair < kBlocks / 2; ++pair) int3_pair_step<L>(p, x, tw, s + 2 * pair, acc);
        sum = add_limb_block(p, x, g, b, acc, sum);
      }
    }
    for (; s < last; ++b) {
      clear_sums(acc);
      const int64_t end = std::min(last, s + limb_blocks);
      int3_steps<L>(p, x, tw, s, end, acc);
      s = end;
      sum = add_limb_block(p, x, g, b, acc, sum);
    }
    out = add_group(p, t, g, sum, out);
  }
  store_pairs(p, t, out);
}

// Tiles 2u and 2u + 1 (where the layer has it), their limb blocks unrolled where they are 32, 64 or 128 inputs
// (int8 activations; fp32 x in groups of 32, 64, and 128 or more).
template <int L>
COMPTRUST_AVX512_VNNI void stream_pair(const Problem& p, const StreamLimbs& x, int64_t u) {
  const auto tile = [&](int64_t t, auto block_inputs) {
    constexpr int64_t kInputs = decltype(block_inputs)::value;
    if (p.bits == 3) int3_tile<L, kInputs / kInt3BlockRows>(p, x, t);
    else int4_tile<L, kInputs / kStreamInputs>(p, x, t);
  };
  for (int64_t t = 2 * u, last = std::min(2 * u + 2, p.n / kTileCols); t < last; ++t) {
    switch (x.block_inputs) {
      case 32: tile(t, std::integral_constant<int64_t, 32>{}); break;
      case 64: tile(t, std::integral_constant<int64_t, 64>{}); break;
      case 128: tile(t, std::integral_constant<int64_t, 128>{}); break;
      default: tile(t, std::integral_constant<int64_t, 0>{});
    }
  }
}

}  // namespace

const LimbOrder& lane_order(Lanes lanes, int bits) {
  static const LimbOrder kOrders[2][2] = {
      {limb_order([](int j) { return a8_lane_position(4, j); }), limb_order([](int j) { return a8_lane_position(3, j); })},
      {limb_order([](int j) { return stream_lane_position(4, j); }),
       limb_order([](int j) { return stream_lane_position(3, j); })}};
  return kOrders[lanes == Lanes::kOneStream][bits == 3];
}

void stream_limbs(const Problem& p, const float* x, StreamLimbs& out) {
  const LimbOrder& order = lane_order(Lanes::kOneStream, p.bits);
  out.limbs = kLimbs;
  out.block_inputs = std::min(p.group_size, kLimbBlock);
  out.blocks_per_group = (p.group_size + out.block_inputs - 1) / out.block_inputs;
  out.codes.resize(kLimbs * p.k);
  out.steps.resize(kLimbs * p.groups * out.blocks_per_group);
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t ke = p.group_end(g);
    for (int64_t b = 0, bk = g * p.group_size; bk < ke; ++b, bk += out.block_inputs) {
      const int64_t be = std::min(ke, bk + out.block_inputs);
      float steps[kLimbs];
      limb_steps(block_amax(x + bk, be - bk), steps);
      for (int l = 0; l < kLimbs; ++l) out.steps[(l * p.groups + g) * out.blocks_per_group + b] = steps[l];
      for (int64_t sk = bk; sk < be; sk += kActBlock) {  // lane orders permute within 32 inputs
        int8_t* const limbs[kLimbs] = {out.codes.data() + sk, out.codes.data() + p.k + sk,
                                       out.codes.data() + 2 * p.k + sk};
        limbs_with_steps(x + sk, std::min<int64_t>(be - sk, kActBlock), order, limbs, steps);
      }
    }
  }
}

void stream_vnni_pair(const Problem& p, const StreamLimbs& x, int64_t u) {
  x.limbs == 1 ? stream_pair<1>(p, x, u) : stream_pair<kLimbs>(p, x, u);
}
}  // namespace comptrust::cpu::tiled

#endif  // COMPTRUST_X86
