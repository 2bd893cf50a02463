// The 2:4 storage layout of comptrust/formats/sparse24.py, for host and device code.
//
// values [n, k/2]  the 2 kept entries of each group of 4 inputs, in input order:
//                  values[r, 2g + t] = W[r, 4g + idx_t(r, g)], t = 0, 1
// meta   [n, k/8]  uint8, one byte per 2 groups: group 2b in bits 0..3, group 2b+1 in bits 4..7;
//                  a group's nibble is idx0 | idx1 << 2 with idx0 < idx1.
// k is a multiple of 8 (a meta byte never straddles a row end). With int4 values the compact [n, k/2]
// matrix is stored as GPTQ v1 int4 (int4_layout.h), group_size counting kept values.
#pragma once
#include <cstdint>

#include "comptrust/gptq_v1.h"

namespace comptrust {

constexpr int kSparse24Group = 4;         // inputs per sparsity group
constexpr int kSparse24Kept = 2;          // kept values per group
constexpr int kSparse24InputsPerMeta = 8;  // inputs per meta byte (two groups)
constexpr int kSparse24KeptPerMeta = 4;    // kept values per meta byte

// Position (0..3) within its group of kept value t (0 or 1) of group h (0: low nibble, 1: high) of a byte.
COMPTRUST_HOST_DEVICE int sparse24_position(uint32_t meta_byte, int h, int t) {
  return static_cast<int>((meta_byte >> (4 * h + 2 * t)) & 3u);
}

// Offset of kept value j (of a meta byte's 4, in order) from the byte's first input: 4 * (j / 2) + idx.
COMPTRUST_HOST_DEVICE int sparse24_input_offset(uint32_t meta_byte, int j) {
  return kSparse24Group * (j >> 1) + sparse24_position(meta_byte, j >> 1, j & 1);
}

}  // namespace comptrust
