// The fp32 kernels of decode_step_cpu.cpp's ops on raw pointers, for DecodeProgram's fp32 steps: the same code the
// ops run after their checks, so results are bit-identical; the caller has made those checks.
//
// Why: inside a decode step every op call starts with the dispatcher's tables, the allocator and a new TensorImpl
// gone cold from the weights' stream: timed in place on the embedded int4 model, 4.6 us per norm call, 2.7-3.1 per
// silu_mul, for ~0.3 us of arithmetic.
#pragma once

#include <cstdint>

namespace comptrust::cpu {

// hidden += delta (when not null) in place, then out = RMSNorm(hidden) * weight: one row of `width`.
void residual_rms_norm_f32(float* hidden, const float* delta, const float* weight, float* out, int64_t width, float eps);

// decode_attention on one token: q [heads, head_dim], k, v [kv_heads, head_dim]; caches [kv_heads, max_len,
// head_dim]; cos, sin [head_dim]; out [heads, head_dim].
void decode_attention_f32(const float* q, const float* k, const float* v, float* key_cache, float* value_cache,
                          const float* cos, const float* sin, int64_t heads, int64_t kv_heads, int64_t max_len,
                          int64_t head_dim, int64_t position, float scale, float* out);

// out = silu(gate) * up over n values.
void silu_mul_f32(const float* gate, const float* up, float* out, int64_t n);

// out[j] = w[j, :] . x for rows j in [begin, end) of w [n, k]: dense_gemv's fp32 rows (its AVX-512 kernel where
// avx512, else its scalar one), each row's sum alone, so one row computed again is bit-identical.
void dense_rows_f32(const float* x, const float* w, int64_t k, float* out, int64_t begin, int64_t end, bool avx512);

}  // namespace comptrust::cpu
