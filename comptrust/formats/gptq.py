"""GPTQ v1 checkpoint tensors of one linear layer <-> our packed int4 / int3 / int8 formats.

A GPTQ v1 checkpoint stores, per layer `name`: name.qweight, name.qzeros, name.scales, name.g_idx and
optionally name.bias, in exactly the layouts of int4.py / int3.py / int8.py, so import is validation plus, for
act-order checkpoints, one permutation of the input rows (act_order.py). Every tensor is checked for
presence, dtype and shape before use, so a malformed checkpoint fails with the tensor it is about.
"""
from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch

from comptrust.formats.act_order import (
    apply_act_order,
    check_act_order_groups,
    g_idx_is_trivial,
    trivial_g_idx,
    undo_act_order,
)
from comptrust.formats.int3 import Int3Packed, check_int3_shapes, pack_int3, unpack_int3
from comptrust.formats.int4 import Int4Packed, check_int4_shapes, num_groups, pack_int4, unpack_int4
from comptrust.formats.int8 import Int8Packed, check_int8_shapes, pack_int8, unpack_int8

Packed = Union[Int4Packed, Int3Packed, Int8Packed]

# bits -> (packed class, shape check, pack, unpack)
_FORMATS = {
    4: (Int4Packed, check_int4_shapes, pack_int4, unpack_int4),
    3: (Int3Packed, check_int3_shapes, pack_int3, unpack_int3),
    8: (Int8Packed, check_int8_shapes, pack_int8, unpack_int8),
}
_BIAS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def read_checkpoint_tensor(
    tensors: Mapping[str, torch.Tensor],
    name: str,
    key: str,
    shape: Sequence[int],
    dtypes: Sequence[torch.dtype],
    required: bool = True,
) -> torch.Tensor | None:
    """tensors[key] (or tensors[f"{name}.{key}"]) after checking its shape and dtype.

    Raises ValueError "name.key: expected [shape] dtype, got [shape] dtype" (or "missing"); returns None
    for an absent optional tensor. dtypes[0] is the one named in messages.
    """
    full = f"{name}.{key}"
    tensor = tensors[key] if key in tensors else tensors.get(full)
    expected = f"{_shape_str(shape)} {_dtype_name(dtypes[0])}"
    if tensor is None:
        if required:
            raise ValueError(f"{full}: missing (expected {expected}); present: {sorted(tensors)}")
        return None
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{full}: expected {expected} tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype not in tuple(dtypes):
        raise ValueError(f"{full}: expected {expected}, got {_shape_str(tensor.shape)} {_dtype_name(tensor.dtype)}")
    return tensor


def read_bias(tensors: Mapping[str, torch.Tensor], out_features: int, name: str) -> torch.Tensor | None:
    """The optional name.bias [out_features] (fp16, bf16 or fp32), validated; None when absent."""
    return read_checkpoint_tensor(tensors, name, "bias", [out_features], _BIAS_DTYPES, required=False)


def _format(bits: int, name: str):
    if bits not in _FORMATS:
        raise ValueError(f"{name}: bits={bits} is not supported (GPTQ import handles 3, 4 and 8)")
    return _FORMATS[bits]


def from_gptq_tensors(
    tensors: Mapping[str, torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
    out_features: int,
    name: str,
) -> tuple[Packed, torch.Tensor | None, torch.Tensor | None]:
    """One layer's GPTQ v1 tensors -> (packed, perm or None, bias or None).

    Keys may be local ("qweight") or prefixed by the layer name ("model.layers.0.mlp.up_proj.qweight").
    group_size -1 means one group over all of in_features. For an act-order checkpoint (g_idx not
    i // group_size) the rows are permuted once here: run the returned layer on x[:, perm].
    """
    cls, check_shapes, pack, unpack = _format(bits, name)
    k, n = in_features, out_features
    g = k if group_size == -1 else group_size
    try:
        check_shapes(k, n, g)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    groups = num_groups(k, g)
    qweight = read_checkpoint_tensor(tensors, name, "qweight", [k * bits // 32, n], [torch.int32])
    qzeros = read_checkpoint_tensor(tensors, name, "qzeros", [groups, n * bits // 32], [torch.int32])
    scales = read_checkpoint_tensor(tensors, name, "scales", [groups, n], [torch.float16])
    g_idx = read_checkpoint_tensor(tensors, name, "g_idx", [k], [torch.int32, torch.int64], required=False)
    bias = read_bias(tensors, n, name)
    packed = cls(qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), g)
    if g_idx is None or g_idx_is_trivial(g_idx, g):
        return packed, None, bias
    check_act_order_groups(g_idx, g, name=f"{name}.g_idx")
    codes, zeros, scales_ng = unpack(packed)
    codes, perm = apply_act_order(codes, g_idx, g)
    # Zero points and scales are per group and do not move; only qweight is rebuilt.
    return pack(codes, zeros, scales_ng, g), perm, bias


def to_gptq_tensors(
    packed: Packed,
    bits: int,
    bias: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Our packed layer -> GPTQ v1 tensors {qweight, qzeros, scales, g_idx[, bias]} an AutoGPTQ v1 loader reads.

    Without perm, g_idx is the trivial i // group_size (int32). With the perm from_gptq_tensors returned,
    the rows are put back in checkpoint order and g_idx says where each came from, so an act-order
    checkpoint is reproduced bit-exactly.
    """
    cls, _, pack, unpack = _format(bits, "to_gptq_tensors")
    if not isinstance(packed, cls):
        raise ValueError(f"to_gptq_tensors: bits={bits} needs {cls.__name__}, got {type(packed).__name__}")
    k, g = packed.in_features, packed.group_size
    qweight, g_idx = packed.qweight, trivial_g_idx(k, g)
    if perm is not None:
        codes, zeros, scales = unpack(packed)
        codes, g_idx = undo_act_order(codes, perm, g)
        qweight = pack(codes, zeros, scales, g).qweight
    out = {
        "qweight": qweight.contiguous(),
        "qzeros": packed.qzeros.contiguous(),
        "scales": packed.scales.contiguous(),
        "g_idx": g_idx,
    }
    if bias is not None:
        if tuple(bias.shape) != (packed.out_features,):
            raise ValueError(f"to_gptq_tensors: bias {_shape_str(bias.shape)} must be [{packed.out_features}]")
        out["bias"] = bias
    return out
