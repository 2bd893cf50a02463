// Packing of the GPTQ v1 int3 layout (comptrust/formats/int3.py), shared by host and device code.
//
// qweight [k/32*3, n]     int32: words 3b, 3b+1, 3b+2 of column j hold input rows 32b..32b+31 of output j.
// qzeros  [groups, n/32*3] int32: words 3c..3c+2 of group row g hold the zero points of outputs
//                         32c..32c+31, stored as zero-1 (comptrust/gptq_v1.h), so 1..8 fit in 3 bits.
// scales  [groups, n]     fp16.   groups = ceil(k / group_size); group_size == k for per-channel.
// Dequantized weight: W[j, kk] = (q - zero[g, j]) * scale[g, j] with g = kk / group_size.
//
// Bit order: read a block's three words as one little-endian 96-bit integer w0 | w1 << 32 | w2 << 64;
// value i sits at bits 3i..3i+2. Values 10 (bits 30..32) and 21 (bits 63..65) straddle two words, so
// a value is taken from a 64-bit window instead: w1:w0 holds values 0..20 whole (bits 0..62) and w2:w1,
// starting at block bit 32, holds values 21..31 whole (block bits 63..95 are its bits 31..63).
//
// Every size the layout allows is a multiple of 32 (k, n, group_size), so a 3-word block never
// straddles a quantization group and a 32-column tile never straddles a qzeros block.
#pragma once
#include <cstdint>

#include "comptrust/gptq_v1.h"

namespace comptrust {

constexpr int kInt3Bits = 3;
constexpr int kInt3PerBlock = 32;       // values per block ...
constexpr int kInt3WordsPerBlock = 3;   // ... in this many int32 words
constexpr uint32_t kInt3Mask = 0x7;
constexpr int kInt3LowWindowValues = 21;  // values 0..20 lie whole in w1:w0

// Value i (0..31) of the block (w0, w1, w2). With i known at compile time (unrolled loops) the select
// and the shift fold to one funnel shift; a run-time i costs two selects more.
COMPTRUST_HOST_DEVICE int int3_at(uint32_t w0, uint32_t w1, uint32_t w2, int i) {
  const bool low = i < kInt3LowWindowValues;
  const uint64_t window = low ? (uint64_t{w1} << 32 | w0) : (uint64_t{w2} << 32 | w1);
  const int shift = low ? kInt3Bits * i : kInt3Bits * i - 32;
  return static_cast<int>((window >> shift) & kInt3Mask);
}

// Zero point (already +1) of output column `col` from one group's row of qzeros.
COMPTRUST_HOST_DEVICE int int3_zero_at(const int32_t* qzeros_row, int col) {
  const int32_t* block = qzeros_row + (col / kInt3PerBlock) * kInt3WordsPerBlock;
  return int3_at(static_cast<uint32_t>(block[0]), static_cast<uint32_t>(block[1]), static_cast<uint32_t>(block[2]),
                 col % kInt3PerBlock) +
         kGptqV1ZeroOffset;
}

}  // namespace comptrust
