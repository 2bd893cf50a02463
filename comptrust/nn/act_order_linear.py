"""ActOrderQuantLinear: the layer an act-order (desc_act) GPTQ checkpoint becomes at load.

An act-order layer's groups are scattered over the input rows (see formats/act_order.py). Import sorts
the rows once so every group is contiguous again; the stored weight is then W[:, perm], an ordinary
grouped int4/int3/int8 weight that the packed kernels run unchanged, and the layer gathers its input:
    y = x @ W^T = x[..., perm] @ W[:, perm]^T
The gather touches k activations per token, which is negligible next to the k*n weight read it saves
(the alternative, a kernel that looks up each row's group through g_idx, reads scales out of order).
"""
from __future__ import annotations

import torch

from comptrust.formats.gptq import to_gptq_tensors
from comptrust.formats.int3 import Int3Packed
from comptrust.formats.int4 import Int4Packed
from comptrust.formats.int8 import Int8Packed
from comptrust.nn.quant_linear import QuantLinear


class ActOrderQuantLinear(QuantLinear):
    """A QuantLinear whose weight rows are stored in group order; `perm` maps them back to input order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("perm", torch.arange(self.in_features, dtype=torch.int64))

    @classmethod
    def from_act_order(cls, packed: Int4Packed | Int3Packed | Int8Packed, perm: torch.Tensor, bias: torch.Tensor | None = None,
                       symmetric: bool = False, act_bits: int | None = None) -> "ActOrderQuantLinear":
        """The layer from_gptq_tensors' (packed, perm, bias) describe: run on x[..., perm]."""
        k = packed.in_features
        perm = perm.to(torch.int64).flatten()
        if perm.numel() != k or not torch.equal(torch.sort(perm).values, torch.arange(k)):
            raise ValueError(f"ActOrderQuantLinear: perm (shape {list(perm.shape)}) must be a permutation of "
                             f"0..{k - 1} (in_features={k})")
        layer = cls.from_packed(packed, bias, symmetric, act_bits)
        layer.perm = perm.contiguous()
        return layer

    def gptq_tensors(self) -> dict[str, torch.Tensor]:
        """The layer's GPTQ v1 tensors in checkpoint row order, with the act-order g_idx (bit-exact export)."""
        return to_gptq_tensors(self.packed(), self.bits, self.bias, self.perm.cpu())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"ActOrderQuantLinear: input has {x.shape[-1]} features, layer expects {self.in_features}")
        return super().forward(x.index_select(-1, self.perm.to(x.device)))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", act-order"
