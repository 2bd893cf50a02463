"""AWQ "GEMM" checkpoint tensors (AutoAWQ WQLinear_GEMM, 4-bit) -> our int4 GPTQ v1 layout.

AWQ GEMM layout, per layer:
  qweight [k, n/8]        int32  packed along the OUTPUT dim: nibble slot i (bits 4i..4i+3) of word c
                                 holds output column 8c + AWQ_ORDER[i]
  qzeros  [k/G, n/8]      int32  same packing; zero points stored as they are (0..15), not zero-1
  scales  [k/G, n]        fp16
  w[out j, in r] = (q - z) * s   (AutoAWQ awq/utils/packing_utils.py dequantize_gemm)

Zero point 0. GPTQ v1 keeps zero-1 in a nibble, so it stores zeros 1..16 and cannot hold AWQ's 0. Such
a group-column is converted losslessly by flipping it: (q - 0) * s == ((15 - q) - 15) * (-s), i.e.
codes 15-q, zero 15, scale -s. Negating an fp16 only flips its sign bit and IEEE rounding is
sign-symmetric, so every dequantized weight is bit-identical to AWQ's. Kernels must therefore not
assume scales are positive (pass allow_negated_scales=False to get an error instead).
"""
from __future__ import annotations

from typing import Mapping

import torch

from comptrust.formats.gptq import read_checkpoint_tensor
from comptrust.formats.int4 import (
    INT4_PER_WORD,
    Int4Packed,
    _pack_nibbles_last_dim,
    _unpack_nibbles_last_dim,
    check_int4_shapes,
    pack_int4,
    unpack_int4,
)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)          # nibble slot i holds output column AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # output column j sits in nibble slot AWQ_REVERSE_ORDER[j]
_MAX = 15


def _unpack_awq_last_dim(words: torch.Tensor) -> torch.Tensor:
    """[..., w] int32 AWQ words -> [..., 8w] uint8 in output-column order."""
    slots = _unpack_nibbles_last_dim(words).reshape(*words.shape[:-1], -1, INT4_PER_WORD)
    return slots[..., list(AWQ_REVERSE_ORDER)].reshape(*words.shape[:-1], -1)


def _pack_awq_last_dim(values: torch.Tensor) -> torch.Tensor:
    """Inverse of _unpack_awq_last_dim: [..., 8w] column-order values in 0..15 -> [..., w] int32."""
    cols = values.reshape(*values.shape[:-1], -1, INT4_PER_WORD)
    return _pack_nibbles_last_dim(cols[..., list(AWQ_ORDER)].reshape(*values.shape[:-1], -1))


def _awq_group_size(group_size: int, in_features: int, name: str) -> int:
    g = in_features if group_size == -1 else group_size
    # AWQ (WQLinear_GEMM) asserts this: its groups are never partial.
    if g <= 0 or in_features % g:
        raise ValueError(f"{name}: AWQ needs in_features k={in_features} to be a multiple of group_size={group_size}")
    return g


def from_awq_tensors(
    tensors: Mapping[str, torch.Tensor],
    group_size: int,
    in_features: int,
    out_features: int,
    name: str,
    allow_negated_scales: bool = True,
) -> Int4Packed:
    """One layer's AWQ GEMM tensors (local or name-prefixed keys) -> Int4Packed (GPTQ v1 layout).

    The optional bias is not part of the packed weight: read it with gptq.read_bias(tensors, n, name).
    """
    k, n = in_features, out_features
    g = _awq_group_size(group_size, k, name)
    try:
        check_int4_shapes(k, n, g)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    groups = k // g
    qweight = read_checkpoint_tensor(tensors, name, "qweight", [k, n // INT4_PER_WORD], [torch.int32])
    qzeros = read_checkpoint_tensor(tensors, name, "qzeros", [groups, n // INT4_PER_WORD], [torch.int32])
    scales = read_checkpoint_tensor(tensors, name, "scales", [groups, n], [torch.float16])
    codes = _unpack_awq_last_dim(qweight).to(torch.int16)   # [k, n]
    zeros = _unpack_awq_last_dim(qzeros).to(torch.int16)    # [groups, n]
    flip = zeros == 0
    if flip.any():
        if not allow_negated_scales:
            raise ValueError(
                f"{name}.qzeros: {int(flip.sum())} zero points are 0, which GPTQ v1 cannot store (it keeps "
                "zero-1 in 4 bits, so zeros must be 1..16); allow_negated_scales=True stores them losslessly "
                "as codes 15-q, zero 15, scale -s"
            )
        rows = flip.repeat_interleave(g, dim=0)
        codes = torch.where(rows, _MAX - codes, codes)
        zeros = torch.where(flip, _MAX, zeros)
        scales = torch.where(flip, -scales, scales)
    return pack_int4(codes.t(), zeros.t(), scales.t(), g)


def to_awq_tensors(packed: Int4Packed) -> dict[str, torch.Tensor]:
    """Our int4 layer -> AWQ GEMM tensors {qweight, qzeros, scales} (used by tests to build AWQ inputs).

    Undoes from_awq_tensors' flip (negative scale with zero 15 -> zero 0), so AWQ -> ours -> AWQ is
    bit-exact for real AWQ tensors (their scales are never negative). Zero 16 has no AWQ encoding.
    """
    k, g = packed.in_features, packed.group_size
    _awq_group_size(g, k, "to_awq_tensors")
    codes, zeros, scales = unpack_int4(packed)            # [n, k], [n, groups], [n, groups]
    codes, zeros = codes.to(torch.int16), zeros.to(torch.int16)
    unflip = torch.signbit(scales) & (zeros == _MAX)
    codes = torch.where(unflip.repeat_interleave(g, dim=1), _MAX - codes, codes)
    zeros = torch.where(unflip, 0, zeros)
    scales = torch.where(unflip, -scales, scales)
    if (zeros > _MAX).any():
        raise ValueError(
            f"to_awq_tensors: {int((zeros > _MAX).sum())} zero points are 16, which AWQ cannot store (zeros are 0..15)"
        )
    return {
        "qweight": _pack_awq_last_dim(codes.t().contiguous()),
        "qzeros": _pack_awq_last_dim(zeros.t().contiguous()),
        "scales": scales.t().contiguous(),
    }


def dequantize_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Oracle straight from the AWQ definition: dense [n, k] weight with w = (q - z) * s.

    Written independently of the converters above: output column j is nibble AWQ_REVERSE_ORDER[j % 8]
    of word j // 8, row r uses group r // group_size.
    """
    k = qweight.shape[0]
    g = k if group_size == -1 else group_size
    n = qweight.shape[1] * INT4_PER_WORD
    j = torch.arange(n)
    shift = 4 * torch.tensor(AWQ_REVERSE_ORDER, dtype=torch.int32)[j % INT4_PER_WORD]
    q = (qweight[:, j // INT4_PER_WORD] >> shift) & 0xF    # [k, n]
    z = (qzeros[:, j // INT4_PER_WORD] >> shift) & 0xF     # [groups, n]
    group = torch.arange(k) // g
    w = (q.to(torch.float32) - z[group].to(torch.float32)) * scales[group].to(torch.float32)
    return w.t().contiguous().to(dtype)
