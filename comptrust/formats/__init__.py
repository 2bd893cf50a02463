"""Packed weight formats. int4 follows the GPTQ v1 checkpoint layout (see int4.py)."""
from comptrust.formats.int4 import (
    Int4Packed,
    pack_int4,
    unpack_int4,
    dequantize_int4,
    num_groups,
)

__all__ = ["Int4Packed", "pack_int4", "unpack_int4", "dequantize_int4", "num_groups"]
