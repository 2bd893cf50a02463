// Conventions shared by every GPTQ v1 layout header (int4_layout.h, int3_layout.h).
#pragma once

// The packing helpers are used from host code (CPU kernels, tests) and device code (CUDA kernels).
#if defined(__CUDACC__)
#define COMPTRUST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define COMPTRUST_HOST_DEVICE inline
#endif

namespace comptrust {

// v1 checkpoints store zero-1 (AutoGPTQ's historical off-by-one), so a stored field s means zero s+1;
// it is also why a 3-bit field can hold zero points 1..8 and a 4-bit one 1..16.
constexpr int kGptqV1ZeroOffset = 1;

}  // namespace comptrust
