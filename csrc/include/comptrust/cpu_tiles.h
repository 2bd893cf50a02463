// The CPU kernels' weight layout ("tiled"), built once per layer from the GPTQ v1 tensors by
// comptrust/formats/cpu_tiles.py. Output columns are cut into tiles of kTileCols; each tile's weights
// lie contiguously along k, so a thread streams its tiles front to back (the GPTQ [k/8, n] layout makes
// every thread read 32 bytes out of each 16 KB row: the prefetchers lose and bandwidth halves).
//
// weight, bits 4: [n/8, k/8, 8] int32. Word (t, r, c) is GPTQ qweight[r, 8t + c]: input rows 8r..8r+7 of
//         column 8t+c, row 8r+i in bits 4i..4i+3. Masking 0x0F0F0F0F leaves rows 8r+{0,2,4,6} in the
//         word's bytes 0..3, shifting by 4 first the odd rows: u8 lanes ready for a u8 x s8 dot product.
// weight, bits 3: [n/8, k/32, 3, 8] int32: 3 words per column for each block of 32 input rows, taken in pairs;
//         word row r of tile t is weight[t, r / 3, r % 3, :] (one word per column).
//         Rows 32b + 16p + 4q + i (half p, q and i 0..3) of block b have, per column,
//           an A word (b, p): in byte q, code i = 0 in bits 0-2, i = 1 in bits 3-5, bits 0-1 of i = 2 in bits 6-7;
//           a nibble (b, p) per byte q: code i = 3 in bits 0-2, bit 2 of i = 2 in bit 3.
//         Blocks 2c and 2c + 1 fill word rows 6c..6c+5 as A(2c, 0), A(2c, 1), A(2c + 1, 0), A(2c + 1, 1), N0, N1,
//         N_p's bytes holding block 2c's nibble (2c, p) in bits 0-3 and block 2c + 1's in bits 4-7. Where k/32 is odd
//         the last block is alone: A(b, 0), A(b, 1), N, N's bytes holding nibble (b, 0) in bits 0-3 and (b, 1) in 4-7.
//         So with n the nibble word shifted to bits 0-3, row 4q + i of a half is, in byte q: i = 0: a & 7;
//         i = 1: (a >> 3) & 7; i = 2: (a >> 6) & 3 | (n >> 1) & 4; i = 3: n & 7 (int3_words in gemm_tiled.h).
//         Byte-parallel decoding (a code's bits never cross a byte) and a pair's 192 bytes in three whole cache lines:
//         the one-stream kernel (gemm_tiled_stream.cpp) reads them with one vpermd per 64 bytes.
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
