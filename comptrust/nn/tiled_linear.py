"""TiledLinear: what every compressed linear layer shares (QuantLinear, Sparse24Linear, Sparse24Int4Linear).

A layer's buffers are its checkpoint tensors (GPTQ v1, or the documented 2:4 layout), so state_dict() is a
checkpoint. On CPU the kernels want their own tiled layout (comptrust.formats.cpu_tiles): the layer builds it
once and from then on keeps only that form, releasing the buffers' storage (the weights would otherwise sit
in memory twice). packed() and state_dict() rebuild the checkpoint tensors bit-exactly from the tiles; moving
the layer to another device brings them back as buffers first.

A subclass names its buffers (CHECKPOINT_BUFFERS) and supplies the conversions and the two products:
_packed_from_buffers / _tile / _untile, _run_tiled (the CPU hot path) and _run_packed (any device).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from comptrust import ops


class TiledLinear(nn.Module):
    CHECKPOINT_BUFFERS: tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._tiled = None  # the CPU kernels' form, once built (then the checkpoint buffers are empty)

    # --------------------------------------------------------------------- subclass interface
    def _packed_from_buffers(self):
        raise NotImplementedError

    def _tile(self, packed):
        raise NotImplementedError

    def _untile(self, tiled):
        raise NotImplementedError

    def _run_tiled(self, x2d: torch.Tensor, tiled) -> torch.Tensor:
        raise NotImplementedError

    def _run_packed(self, x2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _checkpoint_tensors(self, packed) -> dict[str, torch.Tensor]:
        """{buffer name: tensor} of a packed weight; override when the names are not attributes of it."""
        return {name: getattr(packed, name) for name in self.CHECKPOINT_BUFFERS}

    # ------------------------------------------------------------------ the two forms of the weight
    def _set_buffers_from(self, packed, bias: torch.Tensor | None) -> None:
        """Fill the checkpoint buffers from `packed` (shape/dtype checked), then tile when on CPU, so memory
        reports see the final layer."""
        for name, got in self._checkpoint_tensors(packed).items():
            expected = getattr(self, name)
            if got.shape != expected.shape or got.dtype != expected.dtype:
                raise ValueError(f"{type(self).__name__}: {name} is {tuple(got.shape)} {got.dtype}, expected "
                                 f"{tuple(expected.shape)} {expected.dtype}")
            setattr(self, name, got.contiguous())
        if bias is not None:
            self.bias = bias.detach().to(torch.float32).clone()
        if getattr(self, self.CHECKPOINT_BUFFERS[0]).device.type == "cpu" and ops.cpu_kernels_available():
            self.tiled()

    def packed(self):
        """The checkpoint tensors (rebuilt from the tiles when the layer runs on CPU)."""
        return self._untile(self._tiled) if self._tiled is not None else self._packed_from_buffers()

    def tiled(self):
        """The CPU kernels' form; built on first use, after which the checkpoint buffers are released."""
        if self._tiled is None:
            self._tiled = self._tile(self.packed())
            for name in self.CHECKPOINT_BUFFERS:
                setattr(self, name, getattr(self, name).new_empty(0))
        return self._tiled

    def _restore_checkpoint_buffers(self) -> None:
        if self._tiled is not None:
            tensors = self._checkpoint_tensors(self._untile(self._tiled))
            self._tiled = None
            for name, tensor in tensors.items():
                setattr(self, name, tensor)

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() move buffers: give them their contents back first.
        self._restore_checkpoint_buffers()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._tiled is not None:
            for name, tensor in self._checkpoint_tensors(self.packed()).items():
                destination[prefix + name] = tensor

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._restore_checkpoint_buffers()  # loading replaces the weight: the tiles would be stale
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def kernel_tensors(self) -> tuple[torch.Tensor, ...]:
        """Tensors the layer holds outside its buffers (the CPU tiles), for memory accounting."""
        return () if self._tiled is None else self._tiled.tensors()

    # ------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, layer expects "
                             f"{self.in_features}")
        x2d = x.reshape(-1, self.in_features)
        tiled = self._tiled
        # The decode hot path (~200 calls per token on a small model): straight to the kernel, no other checks.
        y = self._run_tiled(x2d, tiled) if tiled is not None and x.is_cpu else self._forward_any_device(x2d)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _forward_any_device(self, x2d: torch.Tensor) -> torch.Tensor:
        device = getattr(self, self.CHECKPOINT_BUFFERS[0]).device if self._tiled is None else torch.device("cpu")
        if x2d.device != device:
            raise ValueError(f"{type(self).__name__}: input is on {x2d.device} but the layer's weights are on "
                             f"{device}")
        if device.type == "cpu" and ops.cpu_kernels_available():
            return self._run_tiled(x2d, self.tiled())
        return self._run_packed(x2d)
