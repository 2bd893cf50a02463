// What the SIMD CPU kernels share (gemm_tiled_*.cpp, sparse24_*.cpp): the AVX2 / AVX-512 target
// attributes, scale / zero-point / int4 decoding of the tiled layout (comptrust/cpu_tiles.h), software
// prefetch, the row-block loop, and the AVX-512 "two slots per register" fold.
#pragma once
#include "torch_and_intrinsics.h"

#include <cstdint>
#include <type_traits>

#include "comptrust/cpu_tiles.h"
#include "isa.h"

// Loops over the R rows of a block must be unrolled before register allocation, or GCC keeps the
// accumulator arrays on the stack and every fused multiply-add pays a store and a reload.
#define COMPTRUST_UNROLL _Pragma("GCC unroll 8")

// The portable helpers below serve every build; the rest of this file only x86-64.
namespace comptrust::cpu {

// The register kernels take a compile-time number of rows R (their accumulators live in registers):
// run(std::integral_constant<int, R>{}, first_row) on blocks of kRowBlock rows, then once on the 1..3 left.
constexpr int kRowBlock = 4;
template <class Run>
inline void for_each_row_block(int64_t m, Run&& run) {
  int64_t i0 = 0;
  for (; i0 + kRowBlock <= m; i0 += kRowBlock) run(std::integral_constant<int, kRowBlock>{}, i0);
  switch (m - i0) {
    case 3: run(std::integral_constant<int, 3>{}, i0); break;
    case 2: run(std::integral_constant<int, 2>{}, i0); break;
    case 1: run(std::integral_constant<int, 1>{}, i0); break;
    default: break;
  }
}

// std::nearbyint(v) for |v| < 2^22, inline (int8 activations: |v| <= 127): adding and subtracting 1.5 * 2^23
// leaves v rounded to an integer, ties to even, in the default rounding mode. std::nearbyint is a libm call
// per input in this build (baseline x86-64 code outside the target-attributed kernels), and quantizing 64 x 576
// activations that way took longer than the 2:4 product that followed (192x576).
inline float round_int8_range(float v) {
  constexpr float kMagic = 12582912.f;  // 1.5 * 2^23
  return (v + kMagic) - kMagic;
}

// p rounded up to the next 64-byte boundary, for buffers over-allocated by 64 bytes. Large buffers from malloc are
// only 16-byte aligned, and 64-byte loads from them split cache lines; worse, whether a buffer happens to be
// aligned varies from process to process (2:4 bf16 4096x4096 at 64 rows on vdpbf16ps ran 4.8 ms in some
// processes and 6.4-6.8 ms in others before its buffers were aligned).
template <class T>
T* align64(T* p) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
}

}  // namespace comptrust::cpu

#ifdef COMPTRUST_X86
#define COMPTRUST_AVX2 __attribute__((target("avx2,fma,f16c")))
#define COMPTRUST_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#define COMPTRUST_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")))
#define COMPTRUST_AVX512_VNNI_VBMI __attribute__((target("avx512f,avx512bw,avx512vnni,avx512vbmi,avx2,fma,f16c")))
// The bf16 panels (amx_bf16.h): decoding and the vdpbf16ps product need no tile unit; the tile product does.
#define COMPTRUST_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512bf16,avx512vbmi,avx2,fma,f16c")))
#define COMPTRUST_AMX \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512bf16,avx512vbmi,avx2,fma,f16c")))

namespace comptrust::cpu {

// Software prefetch this far ahead in a tile's weight stream: the hardware prefetcher alone left the batch-1
// kernels reading DRAM at half the bandwidth (decode and memory time added up instead of overlapping).
// 2048 bytes (not 1024): side by side on cold 4096x4096 weights at batch 1, 2048-4096 ran int4 (float and int8
// x), int3 a8 and 2:4+int4 5-15% faster than 1024; no prefetch was slower still.
constexpr int64_t kPrefetchBytes = 2048;
inline void prefetch_ahead(const void* stream) {
  _mm_prefetch(static_cast<const char*>(stream) + kPrefetchBytes, _MM_HINT_T0);
}
// Into L2, `bytes` ahead, for a stream that only wants bandwidth: the L1's few miss buffers held such streams back
// on AMD EPYC (cold, alternated in one process). The int4 one-stream kernel's codes 4 KB ahead (4096x4096 and
// 11008x4096 at batch 1 4-7% faster, SmolLM2's shapes even), the int3 one's too, every line of the stream (with
// one prefetch per 96-byte block, every third line was left out, and it ran 20-50% slower than with
// prefetch_ahead); fp32 streams 8 KB (dense rows, 2:4 values); the greedy screen's int8 codes 16 KB.
inline void prefetch_to_l2(const void* stream, int64_t bytes) {
  _mm_prefetch(static_cast<const char*>(stream) + bytes, _MM_HINT_T1);
}

COMPTRUST_AVX2 inline __m256 load_scales(const at::Half* s) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
}
COMPTRUST_AVX2 inline __m256 load_zeros(const uint8_t* z) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z))));
}
// Eight dequantized weights to out[0..7], as fp32 or rounded to bf16 (nearest, ties to even, as
// c10::BFloat16 rounds; weights are finite, so no NaN case).
COMPTRUST_AVX2 inline void store8(float* out, __m256 v) { _mm256_storeu_ps(out, v); }

// The sum of 8 lanes in one fixed order (halves, then pairs, then the last two): kernels that must match each
// other bit for bit (dense_gemv's AVX2 rows, the bitmap kernel's) reduce through this one.
COMPTRUST_AVX2 inline float reduce_add8(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}
// Eight floats rounded to bf16, in the low 128 bits.
COMPTRUST_AVX2 inline __m128i to_bf16x8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  // packus works per 128-bit lane: [r0..3, r0..3 | r4..7, r4..7] -> take quadwords 0 and 2.
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0b1000));
}
COMPTRUST_AVX2 inline void store8(at::BFloat16* out, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), to_bf16x8(v));
}

// Codes of row kk (0..7 within the word) of the 8 columns, as floats.
COMPTRUST_AVX2 inline __m256 int4_codes(__m256i words, int row) {
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(words, 4 * row), _mm256_set1_epi32(0xF)));
}

// The AVX-512 kernels keep one 8-column tile per zmm twice over: lanes 0..7 and 8..15 hold two different
// inputs' (or kept values') contributions to the same 8 columns. Column c's total: lane c plus lane 8 + c.
COMPTRUST_AVX512 inline __m256 fold_halves(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

// The sum of A accumulator chains, folded to the tile's 8 columns.
template <int A>
COMPTRUST_AVX512 inline __m256 fold_chains(const __m512 (&chains)[A]) {
  __m512 sum = chains[0];
  for (int a = 1; a < A; ++a) sum = _mm512_add_ps(sum, chains[a]);
  return fold_halves(sum);
}

// low in lanes 0..7, high in lanes 8..15 (AVX-512F alone has no vinsertf32x8).
COMPTRUST_AVX512 inline __m512 join_halves(__m256 low, __m256 high) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(low)), _mm256_castps_pd(high), 1));
}

// low in lanes 0..7, high in lanes 8..15: per-half shift counts and vpermps indices.
COMPTRUST_AVX512 inline __m512i halves(int low, int high) {
  return _mm512_inserti64x4(_mm512_set1_epi32(low), _mm256_set1_epi32(high), 1);
}

// The same 8-int32 word row of two tiles: tile0's in lanes 0..7, tile1's in lanes 8..15.
COMPTRUST_AVX512 inline __m512i two_tiles(const int32_t* tile0, const int32_t* tile1) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile0))),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile1)), 1);
}

// acc + u8 . s8 per 32-bit lane (vpdpbusd), as _mm512_dpbusd_epi32 but in inline asm: GCC 12 kept the intrinsic's
// loop-carried sums both in registers and on the stack, with a store and two moves per product (a8_avx512<4, 4, 1>:
// 4 stores and 12 moves per 8 products in its inner loop).
COMPTRUST_AVX512_VNNI inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}

// One whole block of kActBlock fp32 inputs as int8, the a8 kernels' activations (as
// comptrust.reference.quantize_activations_int8): q = x * (127 / amax), a true division, rounded to nearest even
// by vcvtps2dq as std::nearbyint would; returns the block's scale amax / 127. The scalar loops cost ~1 ns per
// input, more than the 2:4 product after them at 64 x 576. With `from` (kActBlock indices, 64-byte aligned),
// q[j] is the code of x[from[j]]: stored straight in a kernel's lane order (the per-input scatter it replaced
// took a third of an int4 a8 call at 64 x 576); code_sum, where given, receives the sum of the codes.
COMPTRUST_AVX512 inline float quantize_block_int8(const float* x, int8_t* q, const int32_t* from = nullptr,
                                                  int32_t* code_sum = nullptr) {
  __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
  if (from != nullptr) {
    const __m512 natural0 = x0;
    x0 = _mm512_permutex2var_ps(natural0, _mm512_load_si512(from), x1);
    x1 = _mm512_permutex2var_ps(natural0, _mm512_load_si512(from + 16), x1);
  }
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inv));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(q0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(q1));
  if (code_sum != nullptr) *code_sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  return amax / 127.f;
}

}  // namespace comptrust::cpu
#endif  // COMPTRUST_X86
