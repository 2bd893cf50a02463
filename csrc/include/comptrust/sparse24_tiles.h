// The CPU kernels' 2:4 layout ("sparse24 tiles"), built once per layer from the storage layout
// (comptrust/formats/sparse24.py) by comptrust/formats/cpu_tiles.py. As for the int4/int3 tiles
// (cpu_tiles.h), output columns are cut into tiles of kTileCols and each tile's data lies contiguously
// along k, so a thread streams its tiles front to back.
//
// meta:   [n/8, k/4] int32. Word (t, g) holds group g (inputs 4g..4g+3) of the tile's 8 columns: column
//         8t+c's nibble in bits 4c..4c+3 (idx0 in its bits 0-1, idx1 in bits 2-3, as in the storage
//         layout). Shifting the word right by 4c (idx0) or 4c+2 (idx1) per lane gives vpermps indices
//         directly: vpermps reads only the low 3 bits, and with x[4g..4g+3] in both 128-bit halves the
//         third bit (the neighbour's) selects the same value, so no mask is needed.
// values, float kinds: [n/8, k/4, 2, 8] float32 / bfloat16 / float16; element (t, g, j, c) is the kept value j
//         of group g of column 8t+c (storage values[8t+c, 2g+j]): two 8-lane vectors per group.
// values, int4: the compact [n, k/2] int4 matrix tiled exactly as gemm_tiled's int4 weight (cpu_tiles.h):
//         weight [n/8, k/16, 8] int32, word (t, w, c) = kept values 8w..8w+7 of column 8t+c (kept value
//         8w+i, i.e. slot i%2 of group 4w+i/2, in bits 4i); zeros/scales [n/8, groups, 8], groups counted
//         over kept values (group_size kept values = 2*group_size inputs).
#pragma once
#include <cstdint>

#include "comptrust/cpu_tiles.h"
#include "comptrust/sparse24_layout.h"

namespace comptrust {

constexpr int kSparseInt4WordGroups = 4;  // 2:4 groups per int4 word (8 kept values)

}  // namespace comptrust
