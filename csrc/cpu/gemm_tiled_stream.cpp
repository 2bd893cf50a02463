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
// Its vpdpbusd count bounds it about as much as the memory does: in the embedded model's decode step, the q/k/v
// product run a second time with its weights hot in L2 took 9.4 us per layer against 12.5 cold (Zen 4 issues a zmm
// vpdpbusd every two cycles: 12 cycles per 128 weights). Fewer limbs would halve that and lose fp32 accuracy.
#include "gemm_tiled.h"

#ifdef COMPTRUST_X86
#include <algorithm>
#include <cstring>
#include <vector>

namespace comptrust::cpu::tiled {
namespace {

// The one-stream kernels' lanes hold a column's sums in lane pairs (2c, 2c + 1). A block's integer sums are kept
// in two sets, alternate steps adding into each (a block of 128 inputs would otherwise be one chain of 16 vpdpbusd
// per limb). Block b of group g, scaled by its limb steps (L limbs: x.limbs), added into `sum`:
template <int L>
COMPTRUST_AVX512 inline __m512 add_limb_block(const Problem& p, const StreamLimbs& x, int64_t g, int64_t b,
                                              const __m512i (&acc)[2][L], __m512 sum) {
  for (int l = 0; l < L; ++l)
    sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[0][l], acc[1][l])),
                          _mm512_set1_ps(x.steps[(l * p.groups + g) * x.blocks_per_group + b]), sum);
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

// One step of the int4 kernel: word rows 2v, 2v + 1 (inputs 16v..16v+15) into acc.
template <int L>
COMPTRUST_AVX512_VNNI inline void int4_step(const Problem& p, const StreamLimbs& x, const int32_t* tw, int64_t v,
                                            __m512i (&acc)[L]) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i interleave = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  const int32_t* rows = tw + v * 2 * kTileCols;
  prefetch_to_l2(rows, 2 * kPrefetchBytes);
  const __m512i words = _mm512_permutexvar_epi32(interleave, _mm512_loadu_si512(rows));
  const __m512i even = _mm512_and_si512(words, nibble), odd = _mm512_and_si512(_mm512_srli_epi32(words, 4), nibble);
  for (int l = 0; l < L; ++l) {
    const int8_t* codes = x.codes.data() + l * p.k + v * kStreamInputs;
    int64_t low, high;
    std::memcpy(&low, codes, sizeof low);
    std::memcpy(&high, codes + 8, sizeof high);
    acc[l] = dpbusd(acc[l], even, _mm512_set1_epi64(low));
    acc[l] = dpbusd(acc[l], odd, _mm512_set1_epi64(high));
  }
}

// int3, one tile at a time as the int4 kernel: a block (32 inputs of the tile's 8 columns) is 96 contiguous
// bytes, planes 0 and 1 in one 64-byte load, the high-bit plane in a 32-byte one. vpermd puts plane 0's column c
// (rows 0-15) in lane 2c and plane 1's (rows 16-31) in lane 2c + 1, the high plane's word c in both; shifting lane
// 2c + 1's high word right by 4 lines its rows' bits up with lane 2c's. Then code operand i = 0..3 holds, per lane,
// rows 16p + 4q + i in byte q: the low plane's 2-bit field i, and the high bit moved to bit 2 and merged in by one
// vpternlogd, ready for vpdpbusd against x's 8 bytes {x[4q + i]}, {x[16 + 4q + i]} (stream_lane_position):
// per 96 bytes of weights two vpermd, ~14 shift/mask/merge instructions and twelve vpdpbusd (four with int8
// activations). Needs the group size to be a multiple of 32 (stream_fits), so a limb block is whole int3 blocks.
// With fp32 x it is compute-bound: with limb blocks of 32 inputs, warm in cache, 0.76-0.87x the int4 kernel's
// weights per second (per 256 weights ~35 vector instructions against int4's ~26, Zen 4 issuing about two zmm ones
// per cycle), so cold it ran 0.81-1.22x as fast as int4 in quick benchmark runs where its bytes would allow 1.3x.
// Blocks of 128 (kLimbBlock) take 7 of those instructions off; cold, alternated in one process on Zen 5 (old
// time / new): int3 4096 x 4096 1.13x, 11008 x 4096 1.09x, 4096 x 11008 1.10x (int4 0.99-1.03x: at the memory's
// pace). Against int4, alternated, it then ran 1.07-1.34x as fast, with the host's memory speed of the minute.
// With int8 activations it reads at the memory's pace (4096 x 4096 cold: 1.30x as fast as int4 a8 on Zen 4).
// Its prefetch: both cache lines a 96-byte block can start 4 KB ahead, into L2. Cold, alternated in one process
// against int4 (int4 time / int3 time, before -> after; one prefetch into L1 per block, 2 KB ahead, before): int8
// activations 4096 x 4096 1.04 -> 1.11, 11008 x 4096 0.96 -> 1.04, 4096 x 11008 1.12 -> 1.25, SmolLM2's 576 x 1536
// and 1536 x 576 1.02 -> 1.12 and 0.92 -> 1.04; fp32 x 1-4% faster. (A GFNI decode of the high bits, three
// instructions fewer per block, measured no faster on top of it.)
constexpr int64_t kInt3PrefetchBytes = 4096;

// One int3 block (32 inputs) into acc.
template <int L>
COMPTRUST_AVX512_VNNI inline void int3_step(const Problem& p, const StreamLimbs& x, const int32_t* tw, int64_t block,
                                            __m512i (&acc)[L]) {
  const __m512i interleave = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  const __m512i twice = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i odd_lanes_by_4 = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  const __m512i bit2 = _mm512_set1_epi8(0x04), low2 = _mm512_set1_epi8(0x03);
  const int32_t* bw = tw + block * kInt3BlockPlanes * kTileCols;
  // Every cache line of the stream (a block is 1.5 lines: one prefetch per block skipped every third line).
  prefetch_to_l2(bw, kInt3PrefetchBytes);
  prefetch_to_l2(bw + 16, kInt3PrefetchBytes);
  const __m512i low = _mm512_permutexvar_epi32(interleave, _mm512_loadu_si512(bw));
  const __m512i high = _mm512_srlv_epi32(
      _mm512_permutexvar_epi32(twice, _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bw + 2 * kTileCols)))),
      odd_lanes_by_4);
  COMPTRUST_UNROLL for (int i = 0; i < 4; ++i) {
    const __m512i low_i = i ? _mm512_srli_epi32(low, 2 * i) : low;
    const __m512i high_i = _mm512_and_si512(i < 2 ? _mm512_slli_epi32(high, 2 - i) : i == 2 ? high : _mm512_srli_epi32(high, 1), bit2);
    const __m512i codes = _mm512_ternarylogic_epi32(low2, low_i, high_i, 0xCA);  // low2 ? low_i : high_i, bitwise
    for (int l = 0; l < L; ++l) {
      int64_t inputs;
      std::memcpy(&inputs, x.codes.data() + l * p.k + block * kInt3BlockRows + 8 * i, sizeof inputs);
      acc[l] = dpbusd(acc[l], codes, _mm512_set1_epi64(inputs));
    }
  }
}

// One step of either kernel: an int4 word-row pair (16 inputs) or an int3 block (32).
template <int BITS, int L>
COMPTRUST_AVX512_VNNI inline void stream_step(const Problem& p, const StreamLimbs& x, const int32_t* tw, int64_t s,
                                              __m512i (&acc)[L]) {
  if constexpr (BITS == 3) int3_step(p, x, tw, s, acc);
  else int4_step(p, x, tw, s, acc);
}

// One row on tile t: per limb block, its steps alternate between the two sum sets.
template <int BITS, int L>
COMPTRUST_AVX512_VNNI void stream_tile(const Problem& p, const StreamLimbs& x, int64_t t) {
  constexpr int64_t kStepInputs = BITS == 3 ? kInt3BlockRows : kStreamInputs;
  const int32_t* tw = p.tile_w(t);
  __m512 out = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t last = p.group_end(g) / kStepInputs;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t b = 0, s = g * p.group_size / kStepInputs; s < last; ++b) {
      __m512i acc[2][L];
      for (auto& set : acc)
        for (__m512i& a : set) a = _mm512_setzero_si512();
      const int64_t block_end = std::min(last, s + x.block_inputs / kStepInputs);
      for (; s + 2 <= block_end; s += 2) {
        stream_step<BITS>(p, x, tw, s, acc[0]);
        stream_step<BITS>(p, x, tw, s + 1, acc[1]);
      }
      if (s < block_end) stream_step<BITS>(p, x, tw, s++, acc[0]);
      sum = add_limb_block(p, x, g, b, acc, sum);
    }
    out = add_group(p, t, g, sum, out);
  }
  store_pairs(p, t, out);
}

template <int L>
COMPTRUST_AVX512_VNNI void stream_pair(const Problem& p, const StreamLimbs& x, int64_t u) {
  for (int64_t t = 2 * u, last = std::min(2 * u + 2, p.n / kTileCols); t < last; ++t) {
    if (p.bits == 3) stream_tile<3, L>(p, x, t);
    else stream_tile<4, L>(p, x, t);
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
