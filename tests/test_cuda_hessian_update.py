"""CUDA GPTQ / SparseGPT block update (csrc/cuda/hessian_update_cuda.cu) against the pure-torch reference,
bit for bit. Skipped unless torch sees a CUDA device and comptrust._C registered the CUDA kernel (the nvcc
compile check of the source is test_cuda_int4.py::test_compile_check_cuda_sources)."""
from __future__ import annotations

import pytest
import torch

from comptrust import reference
from gptq_oracle import block_case


def _unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    from comptrust import ops

    if ops._C is None:
        return "comptrust._C is not built"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("comptrust::hessian_block_update", "CUDA"):
        return "comptrust._C was built without CUDA"
    return None


_REASON = _unavailable()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

CASES = [  # n, width, bits, prune_n, prune_m, preset mask
    (1, 1, 4, 0, 0, False), (7, 128, 4, 0, 0, False), (33, 64, 3, 2, 4, False), (300, 128, 4, 0, 0, True),
    (16, 128, 0, 2, 4, False), (5, 24, 4, 4, 8, False), (64, 96, 8, 2, 4, False), (13, 37, 2, 0, 0, True),
    (4096, 128, 4, 0, 0, False), (9, 1024, 4, 0, 0, False),
]


@pytest.mark.parametrize("n,width,bits,prune_n,prune_m,preset", CASES)
def test_cuda_block_update_is_bit_exact_with_the_reference(n, width, bits, prune_n, prune_m, preset):
    w, hinv, scales, zeros, col_group, mask = block_case(n, width, bits, prune_n, prune_m, preset, seed=n + width)
    w_ref, mask_ref = w.clone(), mask.clone()
    err_ref, loss_ref = reference.hessian_block_update(w_ref, hinv, scales, zeros, col_group.long(), bits, mask_ref,
                                                       prune_n, prune_m)
    w_gpu, mask_gpu = w.cuda(), mask.cuda()
    empty = torch.empty((n, 0), device="cuda")
    args = (scales.cuda(), zeros.cuda(), col_group.cuda()) if bits else (empty, empty,
                                                                          torch.empty(0, dtype=torch.int32, device="cuda"))
    err, loss = torch.ops.comptrust.hessian_block_update(w_gpu, hinv.cuda(), *args, bits, mask_gpu, prune_n, prune_m)
    assert torch.equal(w_gpu.cpu(), w_ref) and torch.equal(err.cpu(), err_ref) and torch.equal(mask_gpu.cpu(), mask_ref)
    torch.testing.assert_close(loss.cpu(), loss_ref, rtol=1e-5, atol=1e-6)


def test_cuda_block_update_rejects_bad_input():
    w = torch.zeros(4, 8, device="cuda")
    mask = torch.zeros(4, 8, dtype=torch.bool, device="cuda")
    none = torch.empty((4, 0), device="cuda")
    with pytest.raises(RuntimeError, match="mask must be"):
        torch.ops.comptrust.hessian_block_update(w, torch.eye(8, device="cuda"), none, none,
                                                 torch.empty(0, dtype=torch.int32, device="cuda"), 0, mask.cpu(), 0, 0)
    with pytest.raises(RuntimeError, match="launch failed"):
        torch.ops.comptrust.hessian_block_update(w, torch.eye(8, device="cuda"), none, none,
                                                 torch.empty(0, dtype=torch.int32, device="cuda"), 0, mask, 2, 3)
