"""AWQ (Lin et al., 2023): activation-aware scaling before round-to-nearest, then a weight-clipping search.

Per group of layers reading one input (q/k/v, gate/up, down), input channel j is scaled by
s_j = mean|x_j|^alpha (normalised by sqrt(max s * min s)) with alpha from a grid, so salient channels
lose less to rounding; the layers' weights take W * s and the op that produced the input takes 1/s
(the norm's weight for q/k/v and gate/up, up_proj's rows for down_proj), so the dense model computes the
same function. Then each layer's groups are clipped to the ratio of their range that rounds best, and the
layer is RTN-quantized (comptrust.compress.rtn's grid) onto the packed kernels.

Both searches score candidates by the layer's output error on the calibration inputs, computed from the
inputs' second moment H = sum x x^T (||X d||^2 = d^T H d for a weight error d), so no activations are
stored; clipping uses the diagonal block of H per group, which is AutoAWQ's per-group criterion exactly.
Scaling is skipped (s = 1) where the input has no producer to fold into, e.g. o_proj under grouped-query
attention, as AutoAWQ does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from comptrust.compress.hessian import HessianAccumulator
from comptrust.compress.rtn import check_weight_format, quantize_rtn, rtn_grid
from comptrust.nn.quant_linear import QuantLinear


class AWQStatistics(HessianAccumulator):
    """The Hessian (for scoring) plus sum |x_j| (for the activation scale)."""

    def __init__(self, in_features: int):
        super().__init__(in_features)
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.tokens = 0
        self.alpha: float | None = None  # the chosen scale exponent; None: not scaled (nothing to fold into)

    def add_batch(self, x: torch.Tensor) -> None:
        super().add_batch(x)
        rows = x.reshape(-1, self.in_features)
        self.abs_sum = self.abs_sum.to(rows.device) + rows.abs().sum(dim=0, dtype=torch.float64)
        self.tokens += rows.shape[0]

    def scaled(self, scale: torch.Tensor) -> None:
        """The statistics of x / scale (after the scale is folded into the producer)."""
        self.hessian /= scale[:, None] * scale[None, :]
        self.abs_sum /= scale.double()


def _fake_quantize(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    n, k = weight.shape
    groups = -(-k // group_size)
    w = nn.functional.pad(weight, (0, groups * group_size - k)).view(n, groups, group_size)
    scale, zero = rtn_grid(w, bits, symmetric)
    codes = torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, 2**bits - 1)
    return ((codes - zero[..., None]) * scale[..., None]).view(n, -1)[:, :k]


def _output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum over rows of d^T H d: the squared output error (up to H's normalisation) of weight error d."""
    return float(((delta @ hessian) * delta).sum())


@dataclass(frozen=True)
class AWQConfig:
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    grid: int = 20               # alpha in {0, 1/grid, ..., (grid-1)/grid}
    clip: bool = True            # search a clipping ratio per output row and group
    max_shrink: float = 0.5      # clipping ratios from 1 down to 1 - max_shrink

    method = "awq"
    calibrated = True
    true_sequential = False      # every scale of a block is searched on the dense block, then applied

    def __post_init__(self):
        check_weight_format("AWQConfig", self.bits, self.group_size)
        if self.grid <= 0 or not 0 <= self.max_shrink < 1:
            raise ValueError(f"AWQConfig: grid={self.grid} must be positive and max_shrink={self.max_shrink} in [0, 1)")

    @property
    def tag(self) -> str:
        """'awq-w4g128', '-sym', '-noclip' when the clipping search is off."""
        return (f"awq-w{self.bits}g{self.group_size}" + ("-sym" if self.symmetric else "")
                + ("" if self.clip else "-noclip"))

    def group_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def why_ineligible(self, name: str, linear: nn.Linear) -> str | None:
        return QuantLinear.why_ineligible(name, linear, self.bits)

    def statistics(self, in_features: int) -> AWQStatistics:
        return AWQStatistics(in_features)

    # ------------------------------------------------------------------ scale search and folding
    def _search_scale(self, weights: list[torch.Tensor], stats: AWQStatistics) -> tuple[torch.Tensor, float]:
        mean_abs = (stats.abs_sum / max(stats.tokens, 1)).float().clamp(min=1e-8)
        group = self.group_for(weights[0].shape[1])
        best, best_error, best_alpha = torch.ones_like(mean_abs), None, 0.0
        for step in range(self.grid):
            alpha = step / self.grid
            scale = mean_abs.pow(alpha)
            scale = (scale / (scale.max() * scale.min()).sqrt()).clamp(min=1e-4)
            error = sum(_output_error(w - _fake_quantize(w * scale, self.bits, group, self.symmetric) / scale,
                                      stats.hessian) for w in weights)
            if best_error is None or error < best_error:
                best, best_error, best_alpha = scale, error, alpha
        return best, best_alpha

    def prepare_stage(self, layer: nn.Module, groups, linears: dict[str, nn.Linear], statistics: dict) -> None:
        """Search and fold every group's scale (all on the dense block, before any layer is quantized)."""
        for group in groups:
            stats = statistics[group.names[0]]
            fold = _folder(layer, group, linears)
            if fold is None:
                continue
            weights = [linears[name].weight.detach().float() for name in group.names]
            scale, alpha = self._search_scale(weights, stats)
            stats.alpha = alpha
            if alpha == 0.0:
                continue  # s = 1 rounds best: nothing to fold
            with torch.no_grad():
                fold(scale)
                for name in group.names:
                    linears[name].weight.mul_(scale.to(linears[name].weight.dtype)[None, :])
            stats.scaled(scale)

    # ------------------------------------------------------------------ clipping and quantization
    def _clip(self, weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, float]:
        n, k = weight.shape
        group = self.group_for(k)
        clipped = weight.clone()
        steps = max(int(self.max_shrink * self.grid), 1)
        for start in range(0, k, group):
            columns = slice(start, min(start + group, k))
            w = weight[:, columns]
            h = hessian[columns, columns]
            best_error = torch.full((n,), float("inf"), device=weight.device)
            best = w.clone()
            for step in range(steps):
                ratio = 1 - step / self.grid
                limit_hi = w.amax(dim=1, keepdim=True).clamp(min=0) * ratio
                limit_lo = w.amin(dim=1, keepdim=True).clamp(max=0) * ratio
                candidate = torch.minimum(torch.maximum(w, limit_lo), limit_hi)
                delta = w - _fake_quantize(candidate, self.bits, w.shape[1], self.symmetric)
                error = ((delta @ h) * delta).sum(dim=1)
                better = error < best_error
                best_error = torch.where(better, error, best_error)
                best[better] = candidate[better]
            clipped[:, columns] = best
        delta = weight - _fake_quantize(clipped, self.bits, group, self.symmetric)
        return clipped, _output_error(delta, hessian)

    def compress(self, name: str, linear: nn.Linear, stats: AWQStatistics) -> tuple[nn.Module, dict]:
        weight = linear.weight.detach().float()
        group = self.group_for(linear.in_features)
        if self.clip:
            weight, error = self._clip(weight, stats.hessian)
        else:
            error = _output_error(weight - _fake_quantize(weight, self.bits, group, self.symmetric), stats.hessian)
        packed = quantize_rtn(weight, self.bits, group, self.symmetric)
        return QuantLinear.from_packed(packed, linear.bias, self.symmetric), {"loss": error / 2, "alpha": stats.alpha}


def _folder(layer: nn.Module, group, linears: dict[str, nn.Linear]):
    """A function that divides the group's input by `scale` at its producer, or None when there is none
    to fold into: a norm's weight (Gemma's norms multiply by 1 + weight), or for down_proj the rows of the
    up_proj whose output it multiplies (act(gate) * up)."""
    producer = layer.get_submodule(group.producer) if group.producer else None
    k = linears[group.names[0]].in_features
    if producer is not None and "norm" in type(producer).__name__.lower():
        weight = getattr(producer, "weight", None)
        if weight is None or weight.shape != (k,):
            return None
        offset = 1.0 if type(producer).__name__.startswith("Gemma") else 0.0

        def fold_norm(scale):
            weight.copy_(((weight.float() + offset) / scale - offset).to(weight.dtype))
        return fold_norm
    if len(group.names) == 1 and group.names[0].endswith("down_proj"):
        up = linears.get(group.names[0].replace("down_proj", "up_proj"))
        if up is not None and up.out_features == k:
            def fold_up(scale):
                up.weight.div_(scale.to(up.weight.dtype)[:, None])
                if up.bias is not None:
                    up.bias.div_(scale.to(up.bias.dtype))
            return fold_up
    return None
