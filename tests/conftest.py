import os

import torch

# Triton decides between compiling and interpreting when it is imported and when @triton.jit runs, and
# other libraries (transformers) may import it first: choose the CPU interpreter before any of that.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM


def _cpu_isas() -> list[str]:
    from quant_cases import available_isas

    try:
        return available_isas()
    except ImportError:  # no compiled extension: the tests that take `isa` are skipped (no parameters)
        return []


@pytest.fixture(params=_cpu_isas())
def isa(request, monkeypatch):
    """Each CPU SIMD path this machine runs (avx512, avx2, scalar), forced in turn via COMPTRUST_CPU_ISA."""
    from comptrust import _C

    monkeypatch.setenv("COMPTRUST_CPU_ISA", request.param)
    assert _C.cpu_isa() == request.param
    return request.param


def _bf16_engines() -> list[str]:
    try:
        from comptrust import _C
    except ImportError:
        return []
    if _C is None:
        return []
    return [name for name, usable in (("amx", _C.cpu_amx_bf16()), ("avx512-bf16", _C.cpu_avx512_bf16())) if usable]


@pytest.fixture(params=_bf16_engines())
def bf16_engine(request, monkeypatch):
    """Each engine this machine runs the bf16 panel products on: the AMX tile unit, and AVX512-BF16's vdpbf16ps
    (forced on an AMX CPU with COMPTRUST_CPU_AMX=0). No parameters, so the tests are skipped, without either."""
    from comptrust import _C

    if request.param == "avx512-bf16":
        monkeypatch.setenv("COMPTRUST_CPU_AMX", "0")
    assert _C.cpu_amx_bf16() == (request.param == "amx")
    return request.param


@pytest.fixture(scope="session")
def tiny_llama():
    """A randomly initialised Llama small enough for unit tests; layer sizes are multiples of 8 but not
    powers of two, vocabulary matches SmolLM2's tokenizer so real text can be fed to it."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from comptrust.models import load_model

    return load_model("default").tokenizer  # from the de-quantized model's cache once it is there (pad token set)


@pytest.fixture(scope="session")
def triton_compile_check():
    """The output of scripts/compile_check_triton.py (every Triton kernel to PTX for sm_80), run once per
    session without the interpreter; tests of each kernel module look for their own lines in it."""
    import subprocess
    import sys

    from triton_cases import ROOT, env_without_interpret

    script = ROOT / "scripts" / "compile_check_triton.py"
    return subprocess.run([sys.executable, str(script)], env=env_without_interpret(), capture_output=True,
                          text=True, timeout=600)
