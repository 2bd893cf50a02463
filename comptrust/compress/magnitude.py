"""Magnitude pruning to 2:4, onto the 2:4 sparse kernels (Sparse24Linear / Sparse24Int4Linear).

Each eligible layer keeps the 2 largest |w| of every group of 4 inputs (comptrust.formats.sparse24.
prune_magnitude_24) and runs on the 2:4 kernels: its values keep the model's dtype, or with bits=4 are
RTN-quantized to int4 in groups of group_size KEPT values (so g64 spans 128 inputs, like a dense g128).
Unstructured magnitude pruning and Wanda/SparseGPT come with the calibration pipeline (issue 5).
"""
from __future__ import annotations

from dataclasses import dataclass

PATTERNS = ("2:4",)


@dataclass(frozen=True)
class MagnitudeConfig:
    pattern: str = "2:4"
    bits: int | None = None   # 4: int4 kept values (2:4 + int4); None: float values
    group_size: int = 64      # kept values per int4 group (-1: one group per row); ignored without bits
    symmetric: bool = False
    lm_head: bool = False     # prune the output projection too

    method = "magnitude"

    def __post_init__(self):
        if self.pattern not in PATTERNS:
            raise ValueError(f"MagnitudeConfig: pattern={self.pattern!r} is not available; {PATTERNS} are "
                             f"(unstructured pruning arrives with issue 5)")
        if self.bits not in (None, 4):
            raise ValueError(f"MagnitudeConfig: bits={self.bits} must be None (float values) or 4")
        if self.bits and self.group_size != -1 and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError(f"MagnitudeConfig: group_size={self.group_size} (kept values) must be -1 or a positive "
                             f"multiple of 8")

    @property
    def tag(self) -> str:
        """'mag-24', 'mag-24-w4g64', 'mag-24-w4g64-sym', with '-head' when lm_head is pruned too."""
        quant = f"-w4g{self.group_size}" + ("-sym" if self.symmetric else "") if self.bits else ""
        return "mag-24" + quant + ("-head" if self.lm_head else "")
