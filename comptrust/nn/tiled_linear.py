"""TiledLinear: what every compressed linear layer shares (QuantLinear, Sparse24Linear, Sparse24Int4Linear).

A layer's buffers are its checkpoint tensors (GPTQ v1, or the documented 2:4 layout), so state_dict() is a
checkpoint. On CPU the kernels want their own tiled layout (comptrust.formats.cpu_tiles): the layer builds it
once and from then on keeps only that form, releasing the buffers' storage (the weights would otherwise sit
in memory twice). packed() and state_dict() rebuild the checkpoint tensors bit-exactly from the tiles; moving
the layer to another device brings them back as buffers first.

A subclass names its buffers (CHECKPOINT_BUFFERS) and supplies the conversions and the two products:
_packed_from_buffers / _tile / _untile, _kernel_call (the CPU hot path: the op and its arguments after x, bound
once when the tiles are built) and _run_packed (any device).
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
        self._kernel = None  # (op, arguments after x) for the tiles, bound with them (_set_tiled)
        self._act_bits = None

    # --------------------------------------------------------------------- subclass interface
    def _packed_from_buffers(self):
        raise NotImplementedError

    def _tile(self, packed):
        raise NotImplementedError

    def _untile(self, tiled):
        raise NotImplementedError

    def _kernel_call(self, tiled) -> tuple:
        """(op, the op's arguments after x) that run x @ W^T on `tiled`."""
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
            self._set_tiled(self._tile(self.packed()))
            for name in self.CHECKPOINT_BUFFERS:
                setattr(self, name, getattr(self, name).new_empty(0))
        return self._tiled

    @property
    def act_bits(self) -> int | None:
        """8: the layer runs on int8 activations (where its kernels have them); None: float activations."""
        return self._act_bits

    @act_bits.setter
    def act_bits(self, value: int | None) -> None:
        self._check_act_bits(value)
        self._act_bits = value
        if self._tiled is not None:  # the bound kernel call carries it
            self._kernel = self._kernel_call(self._tiled)

    def _check_act_bits(self, value: int | None) -> None:
        if value is not None:
            raise ValueError(f"{type(self).__name__}: act_bits={value}: runs on float activations only (None)")

    def _set_tiled(self, tiled) -> None:
        self._tiled = tiled
        self._kernel = None if tiled is None else self._kernel_call(tiled)

    # The bound op cannot be pickled (torch.save of a whole module, copy.deepcopy): drop it, bind it again after.
    def __getstate__(self):
        return {**self.__dict__, "_kernel": None}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._set_tiled(self._tiled)

    def _restore_checkpoint_buffers(self) -> None:
        if self._tiled is not None:
            tensors = self._checkpoint_tensors(self._untile(self._tiled))
            self._set_tiled(None)
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
        kernel = self._kernel
        if kernel is not None and x.is_cpu:
            # The decode hot path (~200 calls per token on a small model): the bound op on x as it comes (the
            # tiled ops take [..., k]), nothing else; each Python-level step here costs about a microsecond,
            # against 5-10 us for a whole 576-wide layer.
            op, args = kernel
            try:
                y = op(x, *args)
            except RuntimeError:
                self._check_features(x)
                raise
        else:
            self._check_features(x)
            y = self._forward_any_device(x.reshape(-1, self.in_features)).view(x.shape[:-1] + (self.out_features,))
        bias = self._buffers["bias"]  # not self.bias: nn.Module's attribute lookup is the slow path
        return y if bias is None else y + bias.to(y.dtype)

    def _check_features(self, x: torch.Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1] if x.dim() else 0} features, layer "
                             f"expects {self.in_features}")

    def _forward_any_device(self, x2d: torch.Tensor) -> torch.Tensor:
        device = getattr(self, self.CHECKPOINT_BUFFERS[0]).device if self._tiled is None else torch.device("cpu")
        if x2d.device != device:
            raise ValueError(f"{type(self).__name__}: input is on {x2d.device} but the layer's weights are on "
                             f"{device}")
        if device.type == "cpu" and ops.cpu_kernels_available():
            self.tiled()
            op, args = self._kernel
            return op(x2d, *args)
        return self._run_packed(x2d)
