"""Typed entry points of comptrust's ops and the choice of backend.

Each op is declared once in csrc/ops.cpp (torch.ops.comptrust.*). Compiled CPU/CUDA implementations
register there; Triton kernels live in comptrust.kernels; the pure-torch reference (comptrust.reference)
always works. Importing this module never fails because a backend is missing: backends() says why.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from comptrust import reference
from comptrust.formats.bitmap_sparse import BitmapPacked, unpack_bitmap
from comptrust.formats.cpu_tiles import TiledSparse24, TiledWeight, tile_int3, tile_int4, tile_sparse24, tile_sparse24_int4
from comptrust.formats.int3 import Int3Packed
from comptrust.formats.int4 import Int4Packed
from comptrust.formats.sparse24 import Sparse24Int4Packed, Sparse24Packed

_BACKEND_ERRORS: dict[str, str] = {}

try:
    from comptrust import _C  # noqa: F401  (registers torch.ops.comptrust.*)
except Exception as exc:  # the package stays usable on the reference path
    _C = None
    _BACKEND_ERRORS["cpu"] = f"compiled extension comptrust._C did not load: {exc}"


def _compiled() -> bool:
    return _C is not None


def cpu_kernels_available() -> bool:
    """True when the compiled CPU kernels (gemm_tiled and friends) can run here."""
    return _C is not None


def cpu_isa() -> str | None:
    """The SIMD path the CPU kernels take here ('avx512', 'avx2', 'scalar'; COMPTRUST_CPU_ISA forces one), None
    without the compiled kernels."""
    return _C.cpu_isa() if _C is not None else None


def cpu_amx_bf16() -> bool:
    """True when gemm_tiled runs bf16 activations (8+ rows) on the AMX tile unit here."""
    return _C is not None and _C.cpu_amx_bf16()


def cpu_avx512_bf16() -> bool:
    """True when the CPU kernels can run bf16 panel products on AVX512-BF16 (vdpbf16ps) here: they do where
    there is no AMX tile unit (cpu_amx_bf16() False)."""
    return _C is not None and _C.cpu_avx512_bf16()


def _cuda_reason() -> str | None:
    """None when the compiled CUDA ops can run here, else why not."""
    if _C is None:
        return _BACKEND_ERRORS["cpu"]
    if not _C.cuda_built:
        return "comptrust._C was built without CUDA (CPU torch, or no toolkit at build time)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def _triton_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if torch.cuda.is_available():
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "no CUDA device; Triton kernels run on CPU only under TRITON_INTERPRET=1 (for testing)"


def backends() -> dict[str, dict[str, object]]:
    """What can run here: {'cpu'|'cuda'|'triton'|'reference': {'available': bool, 'detail': str}}."""
    if _C is not None:
        engines = ((" + VNNI", _C.cpu_avx512_vnni()), (" + AMX-BF16", _C.cpu_amx_bf16()),
                   (" + AVX512-BF16", _C.cpu_avx512_bf16() and not _C.cpu_amx_bf16()))
        extras = "".join(name for name, usable in engines if usable)
        cpu_detail = f"comptrust._C, SIMD path {_C.cpu_isa()}{extras}, {torch.get_num_threads()} threads"
    else:
        cpu_detail = _BACKEND_ERRORS["cpu"]
    cuda_reason = _cuda_reason()
    triton_reason = _triton_reason()
    return {
        "cpu": {"available": _compiled(), "detail": cpu_detail},
        "cuda": {"available": cuda_reason is None, "detail": cuda_reason or torch.cuda.get_device_name()},
        "triton": {"available": triton_reason is None, "detail": triton_reason or "ready"},
        "reference": {"available": True, "detail": "pure torch (comptrust.reference)"},
    }


def _serves(device: torch.device) -> bool:
    if device.type == "cpu":
        return _compiled()
    if device.type == "cuda":
        return _cuda_reason() is None
    return False


def gemm_tiled(x: torch.Tensor, tiled: TiledWeight, act_bits: int | None = None) -> torch.Tensor:
    """y[..., n] = x[..., k] @ W^T on the CPU kernels, W in their tiled layout (comptrust.formats.cpu_tiles).
    act_bits=8 quantizes x to int8 per row and block of 32 inputs first (w4a8/w3a8, as llama.cpp runs
    low-bit models): integer dot products, numerics differ from float activations by that rounding."""
    if not _compiled():
        raise RuntimeError(f"gemm_tiled needs the compiled CPU ops: {_BACKEND_ERRORS['cpu']}")
    return torch.ops.comptrust.gemm_tiled(x, tiled.weight, tiled.zeros, tiled.scales, tiled.bits,
                                          tiled.group_size, act_bits or 0)


def gemm_tiled_many(x: torch.Tensor, tiled: list[TiledWeight], act_bits: int | None = None) -> list[torch.Tensor]:
    """[gemm_tiled(x, t, act_bits) for t in tiled] as one op: at batch 1 the layers' products share one
    parallel region (a decoder's q/k/v or gate/up). The weights must share bits, group size and k."""
    return bind_gemm_tiled_many(tiled, act_bits)(x)


def bind_gemm_tiled_many(tiled: list[TiledWeight], act_bits: int | None = None):
    """gemm_tiled_many with its weights checked and its argument lists built once: x -> outputs (for the
    decode loop, where rebuilding them each call costs as much as a small layer's product)."""
    if not _compiled():
        raise RuntimeError(f"gemm_tiled_many needs the compiled CPU ops: {_BACKEND_ERRORS['cpu']}")
    if not tiled:
        raise ValueError("gemm_tiled_many: no weights")
    formats = {(t.bits, t.group_size) for t in tiled}
    if len(formats) != 1:
        raise ValueError(f"gemm_tiled_many: the weights must share bits and group size, got {sorted(formats)}")
    bits, group_size = formats.pop()
    weights, zeros, scales = [t.weight for t in tiled], [t.zeros for t in tiled], [t.scales for t in tiled]
    op = torch.ops.comptrust.gemm_tiled_many.default
    return lambda x: op(x, weights, zeros, scales, bits, group_size, act_bits or 0)


def sparse24_tiled(x: torch.Tensor, tiled: TiledSparse24, act_bits: int | None = None) -> torch.Tensor:
    """y[..., n] = x[..., k] @ W^T on the CPU 2:4 kernels, W in their tiled layout (TiledSparse24). With int4
    kept values, act_bits=8 quantizes x to int8 first, per row and block of 32 inputs within each group of
    2 * group_size inputs (reference.sparse24_int4_gemm_a8): integer dot products."""
    if not _compiled():
        raise RuntimeError(f"sparse24_tiled needs the compiled CPU ops: {_BACKEND_ERRORS['cpu']}")
    if act_bits not in (None, 8):
        raise ValueError(f"sparse24_tiled: act_bits={act_bits} must be None (float activations) or 8")
    if tiled.int4 is None:
        if act_bits:
            raise ValueError("sparse24_tiled: act_bits=8 needs int4 kept values (tile_sparse24_int4)")
        return torch.ops.comptrust.sparse24_gemm_tiled(x, tiled.values, tiled.meta)
    q = tiled.int4
    return torch.ops.comptrust.sparse24_int4_gemm_tiled(x, q.weight, tiled.meta, q.zeros, q.scales, q.group_size,
                                                        act_bits or 0)


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """y[m, n] = x[m, k] @ W^T for W in the GPTQ v1 int4 layout (comptrust.formats.int4); y has x's dtype.
    On CPU this tiles W on every call: layers that run many times keep a TiledWeight (QuantLinear does)."""
    if _serves(x.device):
        return torch.ops.comptrust.int4_gemm(x, qweight, qzeros, scales, group_size)
    _check_int4_gemm_args(x, qweight, qzeros, scales, group_size)
    return reference.int4_gemm(x, qweight, qzeros, scales, group_size)


def int4_gemm_a8(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """int4_gemm with x quantized to int8 first (see gemm_tiled); comptrust.reference.int4_gemm_a8 is exact."""
    _check_int4_gemm_args(x, qweight, qzeros, scales, group_size)
    if x.device.type == "cpu" and _compiled():
        return torch.ops.comptrust.int4_gemm_a8(x, qweight, qzeros, scales, group_size)
    return reference.int4_gemm_a8(x, qweight, qzeros, scales, group_size)


def int3_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """y[m, n] = x[m, k] @ W^T for W in the GPTQ v1 int3 layout (comptrust.formats.int3); y has x's dtype."""
    if _serves(x.device):
        return torch.ops.comptrust.int3_gemm(x, qweight, qzeros, scales, group_size)
    _check_int3_gemm_args(x, qweight, qzeros, scales, group_size)
    return reference.int3_gemm(x, qweight, qzeros, scales, group_size)


def sparse24_gemm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """y[m, n] = x[m, k] @ W^T for a 2:4 weight W given as kept values [n, k/2] and meta [n, k/8] uint8
    (comptrust.formats.sparse24). On CPU this tiles W on every call: Sparse24Linear keeps the tiles."""
    _check_sparse24_gemm_args(x, values, meta)
    if _serves(x.device):
        return torch.ops.comptrust.sparse24_gemm(x, values, meta)
    return reference.sparse24_gemm(x, values, meta)


def sparse24_int4_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                       meta: torch.Tensor, group_size: int) -> torch.Tensor:
    """y = x @ W^T for a 2:4 weight whose kept values are int4 (GPTQ v1 tensors over the compact [n, k/2]
    matrix, group_size counted in kept values) with meta [n, k/8] uint8."""
    _check_sparse24_int4_gemm_args(x, qweight, qzeros, scales, meta, group_size)
    if _serves(x.device):
        return torch.ops.comptrust.sparse24_int4_gemm(x, qweight, qzeros, scales, meta, group_size)
    return reference.sparse24_int4_gemm(x, qweight, qzeros, scales, meta, group_size)


def bitmap_sparse_gemm(x: torch.Tensor, packed: BitmapPacked) -> torch.Tensor:
    """y [..., n] = x [..., k] @ W^T for an unstructured sparse weight in the bitmap layout
    (comptrust.formats.bitmap_sparse): the C++ kernel for fp32 x on the CPU, else F.linear on the unpacked weight."""
    if x.dim() == 0 or x.shape[-1] != packed.in_features:
        raise ValueError(f"bitmap_sparse_gemm: x must be [..., k={packed.in_features}], got {tuple(x.shape)}")
    if x.device.type == "cpu" and x.dtype == torch.float32 and packed.values.device.type == "cpu" and _compiled():
        return torch.ops.comptrust.bitmap_sparse_gemm(x, packed.values, packed.mask, packed.row_start,
                                                      packed.in_features)
    if x.device != packed.values.device:
        raise ValueError(f"bitmap_sparse_gemm: x is on {x.device} but the weight is on {packed.values.device}")
    return torch.nn.functional.linear(x, unpack_bitmap(packed).to(x.dtype))


def hessian_block_update(w: torch.Tensor, hinv: torch.Tensor, scales: torch.Tensor | None = None,
                         zeros: torch.Tensor | None = None, col_group: torch.Tensor | None = None, bits: int = 0,
                         mask: torch.Tensor | None = None, prune_n: int = 0,
                         prune_m: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ / SparseGPT's error-feedback pass over one block of columns (schema in csrc/ops.cpp).
    w [n, B] float32 becomes the quantized / pruned block in place. bits=0 skips quantization; otherwise
    column i uses the grid scales/zeros[:, col_group[i]]. mask [n, B] (True = pruned) is read and, with
    prune_n > 0, filled per group of prune_m columns. Returns (err [n, B], loss [n], mask)."""
    n, width = w.shape if w.dim() == 2 else (0, 0)
    if mask is None:
        mask = torch.zeros((n, width), dtype=torch.bool, device=w.device)
    if bits == 0:
        scales = zeros = torch.empty((n, 0), dtype=torch.float32, device=w.device)
        col_group = torch.empty(0, dtype=torch.int32, device=w.device)
    elif scales is None or zeros is None or col_group is None:
        raise ValueError(f"hessian_block_update: bits={bits} needs scales, zeros and col_group")
    if _serves(w.device):  # the C++ CPU op, or the CUDA op in a CUDA build
        err, loss = torch.ops.comptrust.hessian_block_update(w, hinv, scales, zeros, col_group, bits, mask,
                                                              prune_n, prune_m)
    elif w.device.type == "cuda" and _triton_reason() is None:
        from comptrust.kernels.hessian_update import hessian_block_update as triton_update

        err, loss = triton_update(w, hinv, scales, zeros, col_group, bits, mask, prune_n, prune_m)
    else:
        if w.dim() != 2 or hinv.shape != (width, width) or mask.shape != w.shape:
            raise ValueError(f"hessian_block_update: w {tuple(w.shape)}, hinv {tuple(hinv.shape)} and mask "
                             f"{tuple(mask.shape)} must be [n, B], [B, B] and [n, B]")
        err, loss = reference.hessian_block_update(w, hinv, scales, zeros, col_group.long(), bits, mask, prune_n,
                                                   prune_m)
    return err, loss, mask


def residual_rms_norm(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                      eps: float) -> torch.Tensor:
    """hidden += delta in place (when given), then LlamaRMSNorm of hidden [..., width] with weight [width]:
    the decoder's residual step fused (comptrust.lean_decode). Contiguous tensors of one float dtype."""
    if hidden.device.type == "cpu" and _compiled():
        return torch.ops.comptrust.residual_rms_norm(hidden, delta, weight, eps)
    return reference.residual_rms_norm(hidden, delta, weight, eps)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
                     value_cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position: int,
                     scale: float) -> torch.Tensor:
    """One new token's attention (schema in csrc/ops.cpp): rotary embedding on q [heads * head_dim] and
    k [kv_heads * head_dim] with cos/sin [head_dim] of `position`, k and v appended to the caches
    [kv_heads, max_len, head_dim] there, then attention over positions 0..position. Returns q's shape."""
    if q.device.type == "cpu" and _compiled():
        return torch.ops.comptrust.decode_attention(q, k, v, key_cache, value_cache, cos, sin, position, scale)
    return reference.decode_attention(q, k, v, key_cache, value_cache, cos, sin, position, scale)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up in one pass (the Llama MLP's activation; schema in csrc/ops.cpp), each step rounded to
    the dtype as torch rounds it; contiguous tensors of one shape and float dtype."""
    if gate.device.type == "cpu" and _compiled():
        return torch.ops.comptrust.silu_mul(gate, up)
    return reference.silu_mul(gate, up)


def dense_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., k] holding one row times a dense weight [n, k] of x's dtype: y [..., n], summed in fp32 with the
    rows shared among threads (schema in csrc/ops.cpp); F.linear where the C++ op does not serve."""
    if x.device.type == "cpu" and _compiled():
        return torch.ops.comptrust.dense_gemv(x, weight)
    return torch.nn.functional.linear(x, weight)


def _check_same_device(name: str, tensors: dict[str, torch.Tensor], shape_note: str) -> None:
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"{name}: {', '.join(tensors)} must share a device, got {sorted(map(str, devices))} "
                         f"({shape_note})")


def _check_sparse24_x(name: str, x: torch.Tensor, n_desc: str) -> tuple[int, int]:
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be 2-D [m, k], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name}: x must be float32, bfloat16 or float16, got {x.dtype}")
    m, k = x.shape
    if k <= 0 or k % 8:
        raise ValueError(f"{name}: k={k} (x.size(1)) must be a positive multiple of 8 (m={m}, {n_desc})")
    return m, k


def _check_sparse24_meta(name: str, meta: torch.Tensor, n: int, k: int) -> None:
    if meta.dtype != torch.uint8:
        raise ValueError(f"{name}: meta must be uint8, got {meta.dtype}")
    if tuple(meta.shape) != (n, k // 8):
        raise ValueError(f"{name}: meta is {tuple(meta.shape)}, expected [n={n}, k/8={k // 8}] for k={k}")


def _check_sparse24_gemm_args(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> None:
    """Raise ValueError naming the tensor, m, n, k and the expected shape (csrc/sparse24_checks.h mirrors it)."""
    if values.dim() != 2:
        raise ValueError(f"sparse24_gemm: values must be 2-D [n, k/2], got shape {tuple(values.shape)}")
    n = values.shape[0]
    m, k = _check_sparse24_x("sparse24_gemm", x, f"n={n}")
    if values.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"sparse24_gemm: values must be float32, bfloat16 or float16, got {values.dtype}")
    if n <= 0 or values.shape[1] != k // 2:
        raise ValueError(f"sparse24_gemm: values is {tuple(values.shape)}, expected [n, k/2={k // 2}] with n > 0 "
                         f"for x of k={k} (m={m})")
    _check_sparse24_meta("sparse24_gemm", meta, n, k)
    _check_same_device("sparse24_gemm", {"x": x, "values": values, "meta": meta}, f"m={m}, n={n}, k={k}")


def _check_sparse24_int4_gemm_args(x, qweight, qzeros, scales, meta, group_size) -> None:
    """The int4 tensors quantize the compact [n, k/2] values: _check_int4_gemm_args on a k/2-wide view."""
    if qweight.dim() != 2:
        raise ValueError(f"sparse24_int4_gemm: qweight must be 2-D [k/16, n], got shape {tuple(qweight.shape)}")
    n = qweight.shape[1]
    m, k = _check_sparse24_x("sparse24_int4_gemm", x, f"n={n}")
    if k % 16:
        raise ValueError(f"sparse24_int4_gemm: k={k} must be a multiple of 16 (k/2 kept values, 8 per int32 word)")
    try:
        _check_int4_gemm_args(torch.empty((m, k // 2), dtype=x.dtype, device="meta"), qweight, qzeros, scales, group_size)
    except ValueError as exc:
        raise ValueError(f"sparse24_int4_gemm (over the compact [n, k/2={k // 2}] values): "
                         f"{str(exc).removeprefix('int4_gemm: ')}") from None
    _check_sparse24_meta("sparse24_int4_gemm", meta, n, k)
    _check_same_device("sparse24_int4_gemm", {"x": x, "qweight": qweight, "qzeros": qzeros, "scales": scales,
                                              "meta": meta}, f"m={m}, n={n}, k={k}, group_size={group_size}")


def _check_int3_gemm_args(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                         group_size: int) -> None:
    """Raise ValueError naming m, n, k, the group size and the expected shape (as csrc/int3_checks.h does)."""
    if x.dim() != 2:
        raise ValueError(f"int3_gemm: x must be 2-D [m, k], got shape {tuple(x.shape)}")
    if qweight.dim() != 2:
        raise ValueError(f"int3_gemm: qweight must be 2-D [k/32*3, n], got shape {tuple(qweight.shape)}")
    m, k = x.shape
    n = qweight.shape[1]
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"int3_gemm: x must be float32, bfloat16 or float16, got {x.dtype}")
    for name, t, dtype in (("qweight", qweight, torch.int32), ("qzeros", qzeros, torch.int32),
                           ("scales", scales, torch.float16)):
        if t.dtype != dtype:
            raise ValueError(f"int3_gemm: {name} must be {str(dtype).removeprefix('torch.')}, got {t.dtype}")
    if k <= 0 or k % 32:
        raise ValueError(f"int3_gemm: k={k} (x.size(1)) must be a positive multiple of 32 (m={m}, n={n})")
    if qweight.shape[0] != k // 32 * 3:
        raise ValueError(f"int3_gemm: qweight is {tuple(qweight.shape)} but x has k={k} "
                         f"(expected [{k // 32 * 3}, n])")
    if n <= 0 or n % 32:
        raise ValueError(f"int3_gemm: n={n} (qweight.size(1)) must be a positive multiple of 32 (m={m}, k={k})")
    if group_size <= 0 or group_size % 32:
        raise ValueError(f"int3_gemm: group_size={group_size} must be a positive multiple of 32 "
                         f"(m={m}, n={n}, k={k})")
    groups = -(-k // group_size)
    if tuple(scales.shape) != (groups, n):
        raise ValueError(f"int3_gemm: scales is {tuple(scales.shape)}, expected [{groups}, {n}] "
                         f"for k={k}, n={n}, group_size={group_size}")
    if tuple(qzeros.shape) != (groups, n // 32 * 3):
        raise ValueError(f"int3_gemm: qzeros is {tuple(qzeros.shape)}, expected [{groups}, {n // 32 * 3}] "
                         f"for k={k}, n={n}, group_size={group_size}")
    devices = {t.device for t in (x, qweight, qzeros, scales)}
    if len(devices) != 1:
        raise ValueError(f"int3_gemm: x, qweight, qzeros and scales must share a device, got "
                         f"{sorted(map(str, devices))} (m={m}, n={n}, k={k}, group_size={group_size})")


def _check_int4_gemm_args(x, qweight, qzeros, scales, group_size) -> None:
    """The same checks the C++ entry makes (csrc/int4_checks.h), for the reference path."""
    if x.dim() != 2 or qweight.dim() != 2:
        raise ValueError(f"int4_gemm: x must be 2-D [m, k] and qweight 2-D [k/8, n]; got {tuple(x.shape)}, "
                         f"{tuple(qweight.shape)}")
    m, k = x.shape
    n = qweight.shape[1]
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"int4_gemm: x must be float32, bfloat16 or float16, got {x.dtype}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or scales.dtype != torch.float16:
        raise ValueError(f"int4_gemm: need qweight/qzeros int32 and scales float16; got {qweight.dtype}, "
                         f"{qzeros.dtype}, {scales.dtype}")
    if k % 8 or qweight.shape[0] * 8 != k:
        raise ValueError(f"int4_gemm: x has k={k} but qweight is {tuple(qweight.shape)} (expected [{k // 8}, n])")
    if n <= 0 or n % 8:
        raise ValueError(f"int4_gemm: n={n} must be a positive multiple of 8")
    if group_size <= 0 or group_size % 8:
        raise ValueError(f"int4_gemm: group_size={group_size} must be a positive multiple of 8 (m={m}, n={n}, k={k})")
    groups = -(-k // group_size)
    if tuple(scales.shape) != (groups, n) or tuple(qzeros.shape) != (groups, n // 8):
        raise ValueError(f"int4_gemm: scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} must be "
                         f"[{groups}, {n}] / [{groups}, {n // 8}] for k={k}, group_size={group_size}")


if _C is not None:
    @torch.library.register_fake("comptrust::int4_gemm")
    def _int4_gemm_fake(x, qweight, qzeros, scales, group_size):
        return x.new_empty((x.shape[0], qweight.shape[1]))

    @torch.library.register_fake("comptrust::int4_gemm_a8")
    def _int4_gemm_a8_fake(x, qweight, qzeros, scales, group_size):
        return x.new_empty((x.shape[0], qweight.shape[1]))

    @torch.library.register_fake("comptrust::int3_gemm")
    def _int3_gemm_fake(x, qweight, qzeros, scales, group_size):
        return x.new_empty((x.shape[0], qweight.shape[1]))

    @torch.library.register_fake("comptrust::gemm_tiled")
    def _gemm_tiled_fake(x, weight, zeros, scales, bits, group_size, act_bits):
        return x.new_empty((*x.shape[:-1], weight.shape[0] * 8))

    @torch.library.register_fake("comptrust::residual_rms_norm")
    def _residual_rms_norm_fake(hidden, delta, weight, eps):
        return torch.empty_like(hidden)

    @torch.library.register_fake("comptrust::silu_mul")
    def _silu_mul_fake(gate, up):
        return torch.empty_like(gate)

    @torch.library.register_fake("comptrust::decode_attention")
    def _decode_attention_fake(q, k, v, key_cache, value_cache, cos, sin, position, scale):
        return torch.empty_like(q)

    @torch.library.register_fake("comptrust::gemm_tiled_many")
    def _gemm_tiled_many_fake(x, weights, zeros, scales, bits, group_size, act_bits):
        return [x.new_empty((*x.shape[:-1], w.shape[0] * 8)) for w in weights]

    @torch.library.register_fake("comptrust::bitmap_sparse_gemm")
    def _bitmap_sparse_gemm_fake(x, values, mask, row_start, k):
        return x.new_empty((*x.shape[:-1], mask.shape[0]))

    @torch.library.register_fake("comptrust::sparse24_gemm")
    def _sparse24_gemm_fake(x, values, meta):
        return x.new_empty((x.shape[0], values.shape[0]))

    @torch.library.register_fake("comptrust::sparse24_int4_gemm")
    def _sparse24_int4_gemm_fake(x, qweight, qzeros, scales, meta, group_size):
        return x.new_empty((x.shape[0], qweight.shape[1]))

    @torch.library.register_fake("comptrust::sparse24_gemm_tiled")
    def _sparse24_gemm_tiled_fake(x, values, meta):
        return x.new_empty((*x.shape[:-1], meta.shape[0] * 8))

    @torch.library.register_fake("comptrust::sparse24_int4_gemm_tiled")
    def _sparse24_int4_gemm_tiled_fake(x, weight, meta, zeros, scales, group_size, act_bits=0):
        return x.new_empty((*x.shape[:-1], meta.shape[0] * 8))

    # The GPTQ-layout ops on CPU: tile, then run the tiled kernels (one CPU implementation of each product).
    @torch.library.impl("comptrust::int4_gemm", "CPU")
    def _int4_gemm_cpu(x, qweight, qzeros, scales, group_size):
        _check_int4_gemm_args(x, qweight, qzeros, scales, group_size)
        return gemm_tiled(x, tile_int4(Int4Packed(qweight, qzeros, scales, group_size)))

    @torch.library.impl("comptrust::int4_gemm_a8", "CPU")
    def _int4_gemm_a8_cpu(x, qweight, qzeros, scales, group_size):
        _check_int4_gemm_args(x, qweight, qzeros, scales, group_size)
        return gemm_tiled(x, tile_int4(Int4Packed(qweight, qzeros, scales, group_size)), act_bits=8)

    @torch.library.impl("comptrust::int3_gemm", "CPU")
    def _int3_gemm_cpu(x, qweight, qzeros, scales, group_size):
        _check_int3_gemm_args(x, qweight, qzeros, scales, group_size)
        return gemm_tiled(x, tile_int3(Int3Packed(qweight, qzeros, scales, group_size)))

    # The 2:4 storage-layout ops on CPU: tile, then run the tiled kernels.
    @torch.library.impl("comptrust::sparse24_gemm", "CPU")
    def _sparse24_gemm_cpu(x, values, meta):
        _check_sparse24_gemm_args(x, values, meta)
        return sparse24_tiled(x, tile_sparse24(Sparse24Packed(values, meta)))

    @torch.library.impl("comptrust::sparse24_int4_gemm", "CPU")
    def _sparse24_int4_gemm_cpu(x, qweight, qzeros, scales, meta, group_size):
        _check_sparse24_int4_gemm_args(x, qweight, qzeros, scales, meta, group_size)
        packed = Sparse24Int4Packed(Int4Packed(qweight, qzeros, scales, group_size), meta)
        return sparse24_tiled(x, tile_sparse24_int4(packed))
