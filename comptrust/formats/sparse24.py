"""2:4 semi-structured sparse weight format, alone and combined with int4 (pure torch reference).

A weight W [n, k] (nn.Linear orientation: out x in) is 2:4 when every group of 4 consecutive inputs of a
row, W[r, 4g:4g+4], holds at most 2 nonzeros. -0.0 counts as zero; NaN and inf count as nonzero.

Layout (the C++/CUDA kernels read exactly this):
  values [n, k/2]  same dtype as W   the 2 kept entries of each group, in input order: values[r, 2g+j] is
                                      W[r, 4g + idx_j(r, g)] for j = 0, 1
  meta   [n, k/8]  uint8              one byte per 2 groups (8 inputs):
                                        byte meta[r, b] holds group 2b   in bits 0..3 (low nibble)
                                                          group 2b+1 in bits 4..7 (high nibble)
                                        within a group's nibble: idx0 in bits 0..1, idx1 in bits 2..3,
                                        idx0 < idx1 (so only 6 of the 16 nibble values are valid)
  Decoding group g of row r:  nib = (meta[r, g >> 1] >> (4 * (g & 1))) & 0xF;
                              idx0 = nib & 3; idx1 = nib >> 2.
  Hence k must be a multiple of 8: a meta byte covers two whole groups, so no row ends in half a byte.

Which 2 positions a group keeps: its nonzero positions, topped up with its lowest-index zero positions
when it has fewer than 2 nonzeros (all-zero group: idx (0, 1), nibble 0b0100). A kernel needs no special
case for sparse groups, and the packer is deterministic, so packing the same matrix twice is byte-equal.

Signed zeros: kept entries are copied bit for bit, so a -0.0 that lies at a kept position survives the
round trip; every position that is not kept unpacks as +0.0. Unpacking is therefore bit-exact for any 2:4
matrix whose -0.0 entries sit at kept positions (always true when it has no -0.0), and == equal always.

This is the storage/checkpoint layout, chosen so a kernel decodes a group with two shifts and masks.
Sparse tensor cores (mma.sp / cuSPARSELt / CUTLASS) want the same nibbles in an interleaved int16 order:
to_torch_semi_structured / from_torch_semi_structured convert to and from the (packed, meta) pair torch's
SparseSemiStructuredTensorCUTLASS holds (fp16/bf16), so a GPU can run our weights on torch's sparse mm.

2:4 + int4: the compact values [n, k/2] are quantized exactly like a dense [n, k/2] weight by RTN
(comptrust.compress.rtn: asymmetric per-group grid containing 0, zero points 1..16 stored as zero-1,
fp16 scales) and packed by comptrust.formats.int4.pack_int4 (GPTQ v1 layout: qweight [k/16, n] int32,
qzeros [groups, n/8] int32, scales [groups, n] fp16). group_size counts KEPT values along the compact
axis, so one quantization group of size gs covers 2*gs dense inputs (gs/2 whole sparsity groups). The
meta is byte-identical to pack_sparse24's of the same matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from comptrust.formats.int4 import INT4_PER_WORD, Int4Packed, dequantize_int4

GROUP = 4          # inputs per sparsity group
KEPT = 2           # kept entries per group
GROUPS_PER_META_BYTE = 2
INPUTS_PER_META_BYTE = GROUP * GROUPS_PER_META_BYTE  # 8: why k must be a multiple of 8
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_sparse24_weight(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise ValueError/TypeError naming `name` when `weight` cannot be stored in the 2:4 layout
    (whether it actually is 2:4 is checked by pack_sparse24)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"sparse24: {name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"sparse24: {name} must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"sparse24: {name} has dtype {weight.dtype}; 2:4 packs float32, bfloat16 or float16")
    n, k = weight.shape
    if n <= 0 or k <= 0:
        raise ValueError(f"sparse24: {name} shape {tuple(weight.shape)} must have positive sizes")
    if k % INPUTS_PER_META_BYTE:
        raise ValueError(f"sparse24: {name} has in_features k={k}, which must be a multiple of 8 "
                         f"(groups of 4 inputs, two groups per metadata byte)")


def _check_meta(meta: torch.Tensor, n: int, k: int, what: str) -> None:
    if meta.dtype != torch.uint8:
        raise TypeError(f"{what}: meta has dtype {meta.dtype}, expected torch.uint8")
    if meta.shape != (n, k // INPUTS_PER_META_BYTE):
        raise ValueError(f"{what}: meta has shape {tuple(meta.shape)}, expected [n={n}, k/8={k // 8}] "
                         f"for a [{n}, {k}] weight")


@dataclass(frozen=True)
class Sparse24Packed:
    """A 2:4 weight: its kept values [n, k/2] and their positions, meta [n, k/8] uint8 (module docstring)."""

    values: torch.Tensor
    meta: torch.Tensor

    def __post_init__(self):
        v = self.values
        if v.dim() != 2 or v.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"Sparse24Packed: values must be 2-D float32/bfloat16/float16 [n, k/2], "
                             f"got shape {tuple(v.shape)} dtype {v.dtype}")
        if v.shape[1] % (INPUTS_PER_META_BYTE // KEPT):
            raise ValueError(f"Sparse24Packed: values has {v.shape[1]} columns (k/2); it must be a multiple "
                             f"of 4 (k a multiple of 8)")
        if self.meta.dim() != 2:
            raise ValueError(f"Sparse24Packed: meta must be 2-D [n, k/8], got shape {tuple(self.meta.shape)}")
        _check_meta(self.meta, v.shape[0], v.shape[1] * KEPT, "Sparse24Packed")

    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    @property
    def in_features(self) -> int:
        return self.values.shape[1] * KEPT

    @property
    def nbytes(self) -> int:
        """Bytes the packed weight occupies: half the dense values plus 4 bits of metadata per group."""
        return self.values.numel() * self.values.element_size() + self.meta.numel() * self.meta.element_size()


@dataclass(frozen=True)
class Sparse24Int4Packed:
    """A 2:4 weight whose kept values are int4 (GPTQ v1 layout over the compact [n, k/2] matrix)."""

    qvalues: Int4Packed   # in_features of qvalues is k/2: it quantizes the compact values
    meta: torch.Tensor    # [n, k/8] uint8, as Sparse24Packed.meta

    def __post_init__(self):
        _check_meta(self.meta, self.qvalues.out_features, self.qvalues.in_features * KEPT, "Sparse24Int4Packed")

    @property
    def out_features(self) -> int:
        return self.qvalues.out_features

    @property
    def in_features(self) -> int:
        return self.qvalues.in_features * KEPT

    @property
    def group_size(self) -> int:
        """Quantization group size, counted in kept values (covers 2x as many dense inputs)."""
        return self.qvalues.group_size

    @property
    def nbytes(self) -> int:
        q = self.qvalues
        return sum(t.numel() * t.element_size() for t in (q.qweight, q.qzeros, q.scales, self.meta))


def _first_bad_group_message(weight: torch.Tensor, grouped: torch.Tensor, counts: torch.Tensor, name: str) -> str:
    flat = int((counts > KEPT).flatten().nonzero()[0])
    row, group = divmod(flat, counts.shape[1])
    total = int((counts > KEPT).sum())
    vals = [float(x) for x in grouped[row, group].float()]
    return (f"sparse24: {name} [{weight.shape[0]}, {weight.shape[1]}] is not 2:4: row {row}, group {group} "
            f"(inputs {GROUP * group}..{GROUP * group + 3}) has {int(counts[row, group])} nonzeros {vals}, "
            f"at most 2 allowed ({total} offending group(s) in all); prune it first, e.g. prune_magnitude_24")


def _kept_indices(nonzero: torch.Tensor) -> torch.Tensor:
    """[n, k/4, 4] bool -> [n, k/4, 2] int64 kept positions, ascending: nonzeros first, then lowest zeros."""
    position = torch.arange(GROUP, dtype=torch.int64, device=nonzero.device)
    # Unique keys: a nonzero at position p scores p, a zero scores 4 + p, so the 2 smallest are the rule.
    key = (~nonzero).to(torch.int64) * GROUP + position
    chosen = key.topk(KEPT, dim=-1, largest=False).indices
    return chosen.sort(dim=-1).values


def _encode_meta(idx: torch.Tensor) -> torch.Tensor:
    """[n, k/4, 2] positions -> [n, k/8] uint8 (layout in the module docstring)."""
    nibble = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)       # [n, k/4]
    return (nibble[:, 0::2] | (nibble[:, 1::2] << 4)).contiguous()


def _decode_meta(meta: torch.Tensor, what: str) -> torch.Tensor:
    """[n, k/8] uint8 -> [n, k/4, 2] int64 positions; rejects nibbles whose idx0 >= idx1."""
    n = meta.shape[0]
    m = meta.to(torch.int64)
    nibble = torch.stack((m & 0xF, m >> 4), dim=-1).reshape(n, -1)     # group 2b low, 2b+1 high
    idx = torch.stack((nibble & 3, nibble >> 2), dim=-1)
    bad = idx[..., 0] >= idx[..., 1]
    if bad.any():
        row, group = divmod(int(bad.flatten().nonzero()[0]), bad.shape[1])
        nib = int(nibble[row, group])
        raise ValueError(f"{what}: meta is corrupt: row {row}, group {group} has nibble {nib:#06b} "
                         f"(idx0={nib & 3}, idx1={nib >> 2}); idx0 < idx1 is required")
    return idx


def _scatter(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Compact [n, k/2] + positions [n, k/4, 2] -> dense [n, k]; unkept positions are +0.0."""
    n, groups = idx.shape[0], idx.shape[1]
    dense = torch.zeros(n, groups, GROUP, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, idx.to(values.device), values.reshape(n, groups, KEPT))
    return dense.reshape(n, groups * GROUP)


def pack_sparse24(weight: torch.Tensor, name: str = "weight") -> Sparse24Packed:
    """Pack a 2:4 [n, k] weight (k % 8 == 0). Raises ValueError naming the first row/group with > 2
    nonzeros when it is not 2:4. `name` (e.g. the layer's name) is used in error messages."""
    check_sparse24_weight(weight, name)
    n, k = weight.shape
    w = weight.detach()
    grouped = w.reshape(n, k // GROUP, GROUP)
    nonzero = grouped != 0
    counts = nonzero.sum(dim=-1)
    if (counts > KEPT).any():
        raise ValueError(_first_bad_group_message(w, grouped, counts, name))
    idx = _kept_indices(nonzero)
    values = torch.gather(grouped, -1, idx).reshape(n, k // KEPT)  # a copy: bit for bit, -0.0 included
    return Sparse24Packed(values.contiguous(), _encode_meta(idx))


def unpack_sparse24(packed: Sparse24Packed) -> torch.Tensor:
    """The dense [n, k] weight, bit for bit at kept positions and +0.0 elsewhere."""
    idx = _decode_meta(packed.meta, "unpack_sparse24")
    return _scatter(packed.values, idx)


def prune_magnitude_24(weight: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """Magnitude 2:4 pruning: keep the 2 largest |w| of each group of 4 inputs, ties to the lower index.
    Returns the dense pruned matrix (same dtype; pruned entries +0.0), which pack_sparse24 accepts."""
    check_sparse24_weight(weight, name)
    n, k = weight.shape
    grouped = weight.detach().reshape(n, k // GROUP, GROUP)
    mag = grouped.abs().float()
    # Rank by (magnitude desc, index asc) without relying on topk's tie order: an element's rank is how
    # many others beat it; keep ranks 0 and 1. NaN sorts as largest, so it is kept rather than hidden.
    mag = torch.where(torch.isnan(mag), torch.inf, mag)
    a, b = mag.unsqueeze(-1), mag.unsqueeze(-2)                      # [.., i, 1] vs [.., 1, j]
    position = torch.arange(GROUP, device=weight.device)
    lower = position.view(1, GROUP) < position.view(GROUP, 1)        # [i, j]: j has a lower index than i
    beaten_by = (b > a) | ((b == a) & lower)
    keep = beaten_by.sum(dim=-1) < KEPT
    pruned = torch.where(keep, grouped, torch.zeros((), dtype=weight.dtype, device=weight.device))
    return pruned.reshape(n, k)


def check_sparse24_int4_shapes(n: int, k: int, group_size: int, name: str = "weight") -> None:
    """Raise ValueError when a [n, k] 2:4 weight cannot be int4-packed with `group_size` kept values."""
    if k % (KEPT * INT4_PER_WORD):
        raise ValueError(f"sparse24+int4: {name} has in_features k={k}, which must be a multiple of 16 "
                         f"(k/2={k // 2} kept values per row are packed 8 per int32 word)")
    if n % INT4_PER_WORD:
        raise ValueError(f"sparse24+int4: {name} has out_features n={n}, which must be a multiple of 8 "
                         f"(8 zero points per int32 word)")
    if group_size <= 0 or group_size % INT4_PER_WORD:
        raise ValueError(f"sparse24+int4: group_size={group_size} (counted in kept values; k/2={k // 2}) "
                         f"must be a positive multiple of 8")


def pack_sparse24_int4(weight_24: torch.Tensor, group_size: int, symmetric: bool = False,
                       name: str = "weight") -> Sparse24Int4Packed:
    """Pack a 2:4 [n, k] weight with its kept values RTN-quantized to int4 in groups of `group_size` kept
    values (the same grid as comptrust.compress.rtn). group_size=-1: one group per row (k/2 values)."""
    check_sparse24_weight(weight_24, name)
    n, k = weight_24.shape
    gs = k // KEPT if group_size == -1 else group_size
    check_sparse24_int4_shapes(n, k, gs, name)
    sparse = pack_sparse24(weight_24, name)
    # Imported here: comptrust.compress imports the nn layer, which imports comptrust.formats.
    from comptrust.compress.rtn import quantize_rtn

    return Sparse24Int4Packed(quantize_rtn(sparse.values, 4, gs, symmetric), sparse.meta)


def dequantize_sparse24_int4(packed: Sparse24Int4Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense [n, k] weight the packed tensors stand for (the reference the kernels are tested against)."""
    idx = _decode_meta(packed.meta, "dequantize_sparse24_int4")
    return _scatter(dequantize_int4(packed.qvalues, dtype), idx)


# ------------------------------------------------------------------------------- torch interop
# torch.sparse.SparseSemiStructuredTensorCUTLASS (what to_sparse_semi_structured builds on a GPU) stores a
# 2:4 fp16/bf16 matrix as the same compact values [n, k/2] (byte-identical for matrices with 2 nonzeros per
# group) plus int16 metadata with the same nibbles (idx0 | idx1 << 2), reordered for CUTLASS's mma.sp.
# The conversions go through the dense form with torch's own converters, so they stay right whatever order
# torch's metadata uses. torch's fp32 semi-structured format is 1:2 over pairs, not 2:4: not convertible.
_TORCH_SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def _torch_conversions():
    from torch.sparse import _semi_structured_conversions  # private, but what torch itself calls

    return _semi_structured_conversions


def _check_torch_semi_structured(n: int, k: int, dtype: torch.dtype, what: str) -> None:
    if dtype not in _TORCH_SEMI_STRUCTURED_DTYPES:
        raise ValueError(f"{what}: torch's 2:4 layout holds float16/bfloat16 values, got {dtype} (its float32 "
                         f"format is 1:2 over pairs)")
    if n % 32 or k % 16:
        raise ValueError(f"{what}: torch's 2:4 layout needs out_features % 32 == 0 and in_features % 16 == 0, "
                         f"got [{n}, {k}]")


def to_torch_semi_structured(packed: Sparse24Packed) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed, meta) as torch.sparse.SparseSemiStructuredTensorCUTLASS holds this weight; on a GPU,
    SparseSemiStructuredTensorCUTLASS(shape, packed=..., meta=..., packed_t=None, meta_t=None,
    compressed_swizzled_bitmask=None) is then the tensor to_sparse_semi_structured would have built."""
    n, k = packed.out_features, packed.in_features
    _check_torch_semi_structured(n, k, packed.values.dtype, "to_torch_semi_structured")
    return _torch_conversions().sparse_semi_structured_from_dense_cutlass(unpack_sparse24(packed))


def from_torch_semi_structured(values: torch.Tensor, meta: torch.Tensor, name: str = "weight") -> Sparse24Packed:
    """Our 2:4 layout of a weight held as torch's CUTLASS (packed, meta) pair (e.g. a
    SparseSemiStructuredTensorCUTLASS's .packed and .meta)."""
    if values.dim() != 2 or meta.dim() != 2 or meta.dtype != torch.int16:
        raise ValueError(f"from_torch_semi_structured: expected 2-D values and int16 meta, got values "
                         f"{tuple(values.shape)} {values.dtype}, meta {tuple(meta.shape)} {meta.dtype}")
    n, k = values.shape[0], values.shape[1] * KEPT
    _check_torch_semi_structured(n, k, values.dtype, "from_torch_semi_structured")
    if tuple(meta.shape) != (n, k // 16):
        raise ValueError(f"from_torch_semi_structured: meta is {tuple(meta.shape)}, expected [{n}, {k // 16}] "
                         f"for values {tuple(values.shape)}")
    dense = _torch_conversions().sparse_semi_structured_to_dense_cutlass(values, meta)
    return pack_sparse24(dense, name)
