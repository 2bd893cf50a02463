// The CPU kernels' weight layout ("tiled"), built once per layer from the GPTQ v1 tensors by
// comptrust/formats/cpu_tiles.py. Output columns are cut into tiles of kTileCols; each tile's weights
// lie contiguously along k, so a thread streams its tiles front to back (the GPTQ [k/8, n] layout makes
// every thread read 32 bytes out of each 16 KB row: the prefetchers lose and bandwidth halves).
//
// weight, bits 4: [n/8, k/8, 8] int32. Word (t, r, c) is GPTQ qweight[r, 8t + c]: input rows 8r..8r+7 of
//         column 8t+c, row 8r+i in bits 4i..4i+3. Masking 0x0F0F0F0F leaves rows 8r+{0,2,4,6} in the
//         word's bytes 0..3, shifting by 4 first the odd rows: u8 lanes ready for a u8 x s8 dot product.
// weight, bits 3: [n/8, k/32, 3, 8] int32, 32 input rows per block in three planes per column:
//         plane p = 0, 1: low two bits of row 32b + 16p + j at bits 2j;
//         plane 2:        bit 2 of row 32b + 16p + 4q + i at bit 8q + 4p + i.
//         So shifting planes p and 2 right by 2i and 4p+i puts rows 16p + 4q + i (q = 0..3) in bytes q of
//         the word, low bits in bits 0-1 and the high bit at bit 0 of the high plane's byte.
// weight, bits 8: [n/8, k/4, 8] int32. Word (t, r, c) is GPTQ qweight[r, 8t + c]: row 4r+i in bits 8i..8i+7.
// zeros:  [n/8, groups, 8] uint8: bits 3 and 4, the zero point itself; bits 8, zero-1 as GPTQ stores it
//         (v1 allows zero point 256, which no byte holds), so the kernels add kInt8ZeroOffset.
// scales: [n/8, groups, 8] fp16.
// W[j, kk] = (code - zero[g, j]) * scale[g, j] with g = kk / group_size, as in the GPTQ layout.
#pragma once
#include <cstdint>

namespace comptrust {

constexpr int kTileCols = 8;
constexpr int kInt3BlockRows = 32;   // input rows per int3 block ...
constexpr int kInt3BlockPlanes = 3;  // ... stored as this many words per column
constexpr int kInt8ZeroOffset = 1;   // int8 tiles store zero-1
constexpr int kActBlock = 32;        // int8 activations: one scale per this many inputs (within a group)

}  // namespace comptrust
