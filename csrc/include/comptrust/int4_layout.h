// Packing constants of the GPTQ v1 int4 layout, shared by the CPU and CUDA kernels.
//
// qweight [ceil(k/8), n] int32: word (r, j) holds input rows 8r..8r+7 of output column j, row 8r+i in
//         bits 4i..4i+3 (packed along the input dimension, so one word feeds one output).
// qzeros  [groups, n/8]  int32: word (g, c) holds the zero points of outputs 8c..8c+7, stored as
//         zero-1 (the v1 convention other tools read), so a stored nibble s means zero s+1.
// scales  [groups, n]    fp16.   groups = ceil(k / group_size); group_size == k for per-channel.
// Dequantized weight: W[j, kk] = (q - zero[g, j]) * scale[g, j] with g = kk / group_size.
#pragma once
#include <cstdint>

#include "comptrust/gptq_v1.h"

namespace comptrust {

constexpr int kInt4Bits = 4;
constexpr int kInt4PerWord = 8;
constexpr uint32_t kInt4Mask = 0xF;

COMPTRUST_HOST_DEVICE int int4_at(uint32_t word, int i) {
  return static_cast<int>((word >> (kInt4Bits * i)) & kInt4Mask);
}

COMPTRUST_HOST_DEVICE int int4_zero_at(const int32_t* qzeros_row, int col) {
  uint32_t word = static_cast<uint32_t>(qzeros_row[col / kInt4PerWord]);
  return int4_at(word, col % kInt4PerWord) + kGptqV1ZeroOffset;
}

}  // namespace comptrust
