"""Packed weight formats. int4, int3 and int8 follow the GPTQ v1 checkpoint layout (int4.py, int3.py, int8.py);
gptq.py / awq.py import checkpoint tensors into them, act_order.py handles GPTQ's g_idx; sparse24.py is the
2:4 semi-structured layout (values + 4-bit-per-group metadata), alone or with int4 kept values; bitmap_sparse.py
holds unstructured sparsity (kept values + a bit per weight)."""
from comptrust.formats.bitmap_sparse import BitmapPacked, check_bitmap, pack_bitmap, unpack_bitmap
from comptrust.formats.int4 import (
    Int4Packed,
    pack_int4,
    unpack_int4,
    dequantize_int4,
    num_groups,
)
from comptrust.formats.int3 import (
    Int3Packed,
    check_int3_shapes,
    pack_int3,
    unpack_int3,
    dequantize_int3,
)
from comptrust.formats.int8 import (
    Int8Packed,
    check_int8_shapes,
    pack_int8,
    unpack_int8,
    dequantize_int8,
)
from comptrust.formats.act_order import (
    act_order_permutation,
    apply_act_order,
    check_act_order_groups,
    g_idx_is_trivial,
    trivial_g_idx,
    undo_act_order,
)
from comptrust.formats.gptq import from_gptq_tensors, read_bias, to_gptq_tensors
from comptrust.formats.awq import dequantize_awq, from_awq_tensors, to_awq_tensors
from comptrust.formats.sparse24 import (
    Sparse24Int4Packed,
    Sparse24Packed,
    check_sparse24_int4_shapes,
    check_sparse24_weight,
    dequantize_sparse24_int4,
    from_torch_semi_structured,
    pack_sparse24,
    pack_sparse24_int4,
    prune_magnitude_24,
    to_torch_semi_structured,
    unpack_sparse24,
)

__all__ = [
    "Int4Packed", "pack_int4", "unpack_int4", "dequantize_int4", "num_groups",
    "Int3Packed", "check_int3_shapes", "pack_int3", "unpack_int3", "dequantize_int3",
    "Int8Packed", "check_int8_shapes", "pack_int8", "unpack_int8", "dequantize_int8",
    "act_order_permutation", "apply_act_order", "check_act_order_groups", "g_idx_is_trivial",
    "trivial_g_idx", "undo_act_order",
    "from_gptq_tensors", "read_bias", "to_gptq_tensors",
    "dequantize_awq", "from_awq_tensors", "to_awq_tensors",
    "Sparse24Packed", "Sparse24Int4Packed", "check_sparse24_weight", "check_sparse24_int4_shapes",
    "pack_sparse24", "unpack_sparse24", "prune_magnitude_24", "pack_sparse24_int4", "dequantize_sparse24_int4",
    "to_torch_semi_structured", "from_torch_semi_structured",
    "BitmapPacked", "check_bitmap", "pack_bitmap", "unpack_bitmap",
]
