"""Shared test inputs for the int4/int3/int8 formats and kernels."""
from __future__ import annotations

import torch

from comptrust.formats import pack_int3, pack_int4, pack_int8

# (n, k): tiny, odd multiples of 8, and SmolLM2-135M's real layer shapes (q/o, k/v, MLP up/gate, down)
ODD_SHAPES = ((24, 40), (200, 136), (8, 200), (40, 96))
MODEL_SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))
M_SIZES = (1, 3, 7, 13, 118)


def _random_grouped(pack, bits: int, n: int, k: int, group_size: int, seed: int, scale: float):
    """Random packed weights covering every code (0..2^bits-1) and every storable zero point (1..2^bits)."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // group_size)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    zeros = torch.randint(1, 2**bits + 1, (n, groups), generator=g)
    scales = torch.rand(n, groups, generator=g) * scale + scale / 20
    return pack(codes, zeros, scales, group_size), codes, zeros, scales


def random_int4(n: int, k: int, group_size: int, seed: int = 0):
    return _random_grouped(pack_int4, 4, n, k, group_size, seed, 0.02)


def random_int3(n: int, k: int, group_size: int, seed: int = 0):
    return _random_grouped(pack_int3, 3, n, k, group_size, seed, 0.02)


def random_int8(n: int, k: int, group_size: int, seed: int = 0):
    return _random_grouped(pack_int8, 8, n, k, group_size, seed, 0.002)


def available_isas() -> list[str]:
    """The CPU SIMD paths this machine can run (COMPTRUST_CPU_ISA values), widest first."""
    import os

    from comptrust import _C

    found = []
    for isa in ("avx512", "avx2", "scalar"):
        os.environ["COMPTRUST_CPU_ISA"] = isa
        try:
            _C.cpu_isa()
            found.append(isa)
        except RuntimeError:
            pass
        finally:
            os.environ.pop("COMPTRUST_CPU_ISA", None)
    return found


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()




def full_precision_one_hot_rows(m: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] with one nonzero per row, at input columns[r], whose value uses all 24 bits of an fp32
    significand (random signs and exponents): a kernel that rounds x anywhere, or drops part of it, changes
    the product x @ W^T of a 0/1 weight, which is otherwise exact."""
    gen = torch.Generator().manual_seed(seed)
    mantissa = (torch.randint(1 << 23, 1 << 24, (m,), generator=gen) | 1).double()  # odd: bit 24 is set
    sign = torch.randint(0, 2, (m,), generator=gen).double() * 2 - 1
    exponent = torch.randint(-30, 30, (m,), generator=gen).double()
    columns = torch.randint(0, k, (m,), generator=gen)
    x = torch.zeros(m, k)
    x[torch.arange(m), columns] = (sign * mantissa * torch.pow(2.0, exponent - 23)).float()
    return x, columns


def wide_range_rows(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """fp32 activations spanning about 10^-2.6..10^2.6 within a row, so that every bit of each value matters."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen) * torch.exp(torch.empty(m, k).uniform_(-6, 6, generator=gen))


def fp32_paths_only(monkeypatch) -> None:
    """Turn both bf16 panel engines (AMX, AVX512-BF16) off: bf16 activations take the fp32 kernels or BLAS."""
    monkeypatch.setenv("COMPTRUST_CPU_AMX", "0")
    monkeypatch.setenv("COMPTRUST_CPU_BF16", "0")


def rows_before_guard_page(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random fp32 x [m, k] whose last byte is the last before a page the process may not touch (mprotect
    PROT_NONE): a kernel that reads past x's last row crashes here every time, instead of reading whatever lies
    there (harmless garbage in padded rows, or a crash only when the allocator happens to end a mapping there)."""
    import ctypes
    import mmap

    page, nbytes = mmap.PAGESIZE, m * k * 4
    total = (nbytes + page - 1) // page * page + page
    buffer = mmap.mmap(-1, total, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.mprotect(address + total - page, page, 0) != 0:  # PROT_NONE (mmap has no name for it)
        raise OSError(ctypes.get_errno(), "mprotect of the guard page failed")
    x = torch.frombuffer(buffer, dtype=torch.float32, count=m * k, offset=total - page - nbytes).view(m, k)
    x.copy_(torch.randn(m, k, generator=torch.Generator().manual_seed(seed)))
    return x
