"""The Triton GPTQ / SparseGPT column loop (kernels/hessian_update.py) under TRITON_INTERPRET=1 against the
pure-torch reference, bit for bit, and its ahead-of-time compile to PTX."""
from __future__ import annotations

import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from comptrust import reference  # noqa: E402
from comptrust.kernels import hessian_update as K  # noqa: E402
from gptq_oracle import block_case  # noqa: E402

CASES = [  # n, width, bits, prune_n, prune_m, preset mask
    (1, 1, 4, 0, 0, False), (7, 128, 4, 0, 0, False), (33, 64, 3, 2, 4, False), (16, 128, 0, 2, 4, False),
    (5, 24, 4, 4, 8, False), (20, 37, 2, 0, 0, True), (17, 32, 8, 2, 4, False), (3, 16, 0, 0, 0, True),
]


@pytest.mark.parametrize("n,width,bits,prune_n,prune_m,preset", CASES)
def test_triton_block_update_is_bit_exact_with_the_reference(n, width, bits, prune_n, prune_m, preset):
    w, hinv, scales, zeros, col_group, mask = block_case(n, width, bits, prune_n, prune_m, preset, seed=7 * n + width)
    w_ref, mask_ref = w.clone(), mask.clone()
    err, loss = K.hessian_block_update(w, hinv, scales, zeros, col_group, bits, mask, prune_n, prune_m)
    err_ref, loss_ref = reference.hessian_block_update(w_ref, hinv, scales, zeros, col_group.long(), bits, mask_ref,
                                                       prune_n, prune_m)
    assert torch.equal(w, w_ref) and torch.equal(err, err_ref) and torch.equal(mask, mask_ref)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)


def test_triton_block_update_rejects_bad_input():
    w = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="contiguous float32"):
        K.hessian_block_update(w.double(), torch.eye(8), None, None, None, 0, torch.zeros(4, 8, dtype=torch.bool), 0, 0)
    with pytest.raises(ValueError, match="mask must be"):
        K.hessian_block_update(w, torch.eye(8), None, None, None, 0, torch.zeros(4, 8), 0, 0)
    with pytest.raises(ValueError, match="divisible by M"):
        K.hessian_block_update(w, torch.eye(8), None, None, None, 0, torch.zeros(4, 8, dtype=torch.bool), 2, 3)


def test_aot_compile_check_covers_the_kernel(triton_compile_check):
    out = triton_compile_check
    assert out.returncode == 0, out.stdout + out.stderr
    ours = [line for line in out.stdout.splitlines() if "kernels/hessian_update.py sm_80" in line]
    assert len(ours) == len(K.AOT_CONFIGS), out.stdout
    assert all(line.startswith("ok ") for line in ours), out.stdout
