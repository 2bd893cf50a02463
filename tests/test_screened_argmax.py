"""The greedy screen of an fp32 output projection (csrc/cpu/screened_argmax.h): an int8 copy picks the few rows that
can hold the largest logit, the fp32 kernel computes those again, and the answer must be torch.argmax of
dense_gemv's logits exactly, ties to the first row included; where it cannot decide cheaply it says so (-1)."""
import copy
from pathlib import Path

import pytest
import torch

from comptrust import _C
from comptrust.lean_decode import LeanDecoder

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"

pytestmark = pytest.mark.skipif(_C is None or not _C.cpu_avx512_vnni(),
                                reason="the screen runs on AVX-512 VNNI only (elsewhere greedy reads every row)")


def _full_argmax(weight: torch.Tensor, x: torch.Tensor) -> int:
    return int(torch.ops.comptrust.dense_gemv(x, weight).argmax())


def _screen(weight: torch.Tensor):
    return torch.classes.comptrust.ScreenedArgmax(weight, False)


def _assert_same_choices(weight: torch.Tensor, xs, *, decided_at_least: float = 0.0) -> None:
    screen = _screen(weight)
    decided = 0
    for x in xs:
        index, rescored = screen.first_argmax(x)
        if index >= 0:
            assert index == _full_argmax(weight, x)
            assert 1 <= rescored <= screen.max_rescored()
            decided += 1
    assert decided >= decided_at_least * len(xs)


@pytest.fixture(scope="module")
def embedded():
    from comptrust.models import load_model

    return load_model()


def test_embedded_model_head_on_real_text(embedded):
    """The embedded model's tied projection (49152 x 576) on its own final hidden states over real text: every
    position decided by the screen, the fp32 argmax every time, and few rows computed again."""
    model, tokenizer = embedded.model, embedded.tokenizer
    fallback = "The capital of France is Paris. " * 40
    text = WIKITEXT.read_text(encoding="utf-8")[:6000] if WIKITEXT.is_file() else fallback
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :160]
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1][0]  # after the final norm
    weight = model.lm_head.weight.detach().contiguous()
    screen = _screen(weight)
    assert screen.bytes() < weight.numel() * 4 // 3  # int8 codes and four floats per row
    rescored = []
    for x in hidden:
        x = x.contiguous()
        index, count = screen.first_argmax(x)
        assert index == _full_argmax(weight, x)
        rescored.append(count)
    assert sorted(rescored)[len(rescored) // 2] <= 16  # median: measured 3 on WikiText-2


def test_near_ties_are_decided_by_the_fp32_logits():
    """150 rows within about one int8 step of each other (the screen's estimates cannot order them) and exact
    duplicates; inputs plain and with one feature 300 times the rest (the two int8 limbs then resolve the others
    coarsely, so |x - x~| matters): the winner is the fp32 logits' first largest. Dropping either term of the
    bound, |x| |w_j - s_j q_j| or |x - x~| |s_j q_j|, fails this."""
    torch.manual_seed(1)
    k = 300
    base = torch.randn(k)
    weight = torch.randn(3000, k)
    weight[1000:1150] = base + 1e-2 * torch.randn(150, k) * base.abs().max()
    weight[2000:2003] = base  # exact duplicates after row 1000's near-copies
    weight[1500] = base
    weight[:, 0] = 0.0  # the outlier feature adds the same to every logit
    xs = [base + 0.05 * torch.randn(k) for _ in range(40)] + [base.clone() for _ in range(3)]
    for x in xs[:20]:
        spiked = x.clone()
        spiked[0] = 300 * x.abs().max()
        xs.append(spiked)
    _assert_same_choices(weight.contiguous(), xs, decided_at_least=0.9)


def _rows_on_a_grid(x: torch.Tensor, generator) -> torch.Tensor:
    """Codes (of one scale 2^-7 below; exact in int8 as column 0 holds 127 in every row and x[0] = 0) for 1000
    rows of x's k = 24 (few terms: a small gamma_k, so the tests below need the terms they test): random small
    ones, and row 10 = 20 sign(x) on features 8..23, above them all."""
    codes = torch.randint(-10, 11, (1000, x.numel()), generator=generator).float()
    codes[10] = 0
    codes[10, 8:24] = 20 * torch.sign(x[8:24])
    codes[:, 0] = 127
    return codes


def test_bound_covers_the_weights_rounding():
    """x exact in the screen's limbs (integers, largest 127); rows exact in int8 but two: row A is row 10 plus
    0.49 step on a feature where x = 127 (its codes drop it: estimate as row 10's, fp32 logit 62 steps more),
    row B plus 0.51 step where x = 100 (its codes gain a whole step: estimate 100 steps more, logit 51). A wins
    in fp32 and B in the estimates; the bound's |x| |w_j - s_j q_j| term keeps A."""
    generator = torch.Generator().manual_seed(8)
    for trial in range(10):
        x = torch.randint(-50, 51, (24,), generator=generator).float()
        x[:3] = torch.tensor([0.0, 127.0, 100.0])
        weight = _rows_on_a_grid(x, generator) * 2.0 ** -7
        weight[20], weight[30] = weight[10], weight[10]
        weight[20, 1] += 0.49 * 2.0 ** -7
        weight[30, 2] += 0.51 * 2.0 ** -7
        index, _ = _screen(weight).first_argmax(x)
        assert index == _full_argmax(weight, x) == 20, f"trial {trial}"


def test_bound_covers_the_inputs_rounding():
    """Rows exact in int8; x with one feature (5) 1000 where the rest are under 3, so its limbs resolve them in
    steps d = 1000 / 127 / 254. Row A is row 10 plus codes 127, -127 on two features 0.2 d apart that round alike,
    row B the same on two 0.1 d apart across a rounding edge: A wins in fp32 (25 d against 13) and B in the
    estimates (127 d against 0); the bound's |x - x~| |s_j q_j| term keeps A."""
    generator = torch.Generator().manual_seed(9)
    step = float(torch.tensor(1000.0) / 127 / 254)  # d1 as the screen works it out in fp32
    for trial in range(10):
        x = 3 * (2 * torch.rand(24, generator=generator) - 1)  # under half of d0 = 7.9: their first limb is 0
        x[0], x[5] = 0.0, 1000.0
        x[1:5] = torch.tensor([10.2, 10.0, 20.55, 20.45]) * step
        codes = _rows_on_a_grid(x, generator)
        codes[:, 5] = 0  # the large feature adds nothing to any logit
        codes[20], codes[30] = codes[10], codes[10]
        codes[20, 1:3] = torch.tensor([127.0, -127.0])
        codes[30, 3:5] = torch.tensor([127.0, -127.0])
        weight = codes * 2.0 ** -7
        index, _ = _screen(weight).first_argmax(x)
        assert index == _full_argmax(weight, x) == 20, f"trial {trial}"


def test_duplicate_winning_rows_go_to_the_first():
    torch.manual_seed(2)
    weight = torch.randn(500, 64)
    weight[[7, 300, 499]] = weight[250].clone()
    screen = _screen(weight)
    x = weight[250].clone()
    index, rescored = screen.first_argmax(x)
    assert index == 7 == _full_argmax(weight, x)
    assert rescored >= 4  # rows 7, 250, 300 and 499 at least


def test_seeded_sweep_of_shapes_and_scales():
    """300 seeded cases: vocabularies 1-2500, k 1-700 (odd, under and over a 64-byte block), rows and inputs of
    normal, heavy-tailed, tiny (1e-30) and huge (1e15) scales, zero rows, outlier features."""
    generator = torch.Generator().manual_seed(3)
    decided = 0
    for case in range(300):
        vocab = int(torch.randint(1, 2500, (1,), generator=generator))
        k = int(torch.randint(1, 700, (1,), generator=generator))
        weight = torch.randn(vocab, k, generator=generator)
        kind = case % 5
        if kind == 1:
            weight = weight ** 3  # heavy tails
        elif kind == 2:
            weight[torch.rand(vocab, generator=generator) < 0.3] *= 1e-30
        elif kind == 3:
            weight[torch.rand(vocab, generator=generator) < 0.1] = 0.0
        elif kind == 4:
            weight *= 1e15
        x = torch.randn(k, generator=generator) * (1e-30 if case % 7 == 0 else 1.0)
        if case % 3 == 0:
            x[torch.randint(0, k, (max(1, k // 50),), generator=generator)] *= 100.0  # outlier features
        screen = _screen(weight.contiguous())
        index, _ = screen.first_argmax(x)
        if index >= 0:
            assert index == _full_argmax(weight, x), f"case {case}: vocab {vocab}, k {k}"
            decided += 1
    assert decided >= 250


def test_inputs_it_leaves_to_the_full_projection():
    torch.manual_seed(4)
    weight = torch.randn(1000, 96)
    screen = _screen(weight)
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(96)
        x[5] = bad
        assert screen.first_argmax(x) == (-1, 0)
    assert screen.first_argmax(torch.full((96,), 1e36)) == (-1, 0)  # a logit could overflow
    assert screen.first_argmax(torch.zeros(96)) == (-1, 0)  # every row ties: more than max_rescored
    same = _screen(weight[:1].expand(200, 96).contiguous())
    assert same.first_argmax(torch.randn(96)) == (-1, 0)  # 200 equal rows > max_rescored (64)
    x = torch.randn(96)
    assert screen.first_argmax(x)[0] == _full_argmax(weight, x)
    weight[3].mul_(2.0)  # written in place: the codes are stale, so the screen steps aside
    assert screen.first_argmax(x) == (-1, 0)
    for wrong in (torch.randn(95), torch.randn(96, dtype=torch.float64), torch.randn(192)[::2]):
        with pytest.raises(RuntimeError, match="x must be 96 contiguous fp32 CPU values"):
            screen.first_argmax(wrong)


def test_weights_it_refuses(monkeypatch):
    for weight, message in ((torch.tensor([[1.0, float("nan")]]), "non-finite"),
                            (torch.tensor([[1.0, float("inf")]]), "non-finite"),
                            (torch.randn(4, 6, dtype=torch.float64), "contiguous fp32 CPU matrix"),
                            (torch.randn(6, 4).t(), "contiguous fp32 CPU matrix"),
                            (torch.randn(8), "contiguous fp32 CPU matrix"),
                            (torch.randn(2, 32769), "k <= 32768"),
                            (torch.randn(0, 8), "vocab > 0")):
        with pytest.raises(RuntimeError, match=message):
            _screen(weight)
    monkeypatch.setenv("COMPTRUST_CPU_ISA", "avx2")
    with pytest.raises(RuntimeError, match="not AVX-512 with VNNI"):
        _screen(torch.randn(4, 8))


def _resident_bytes_of_mapping(tensor: torch.Tensor) -> int:
    """Rss of the mapping of this process that holds `tensor` (/proc/self/smaps)."""
    address, inside = tensor.data_ptr(), False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and ":" in head[3]:
            start, end = (int(part, 16) for part in head[0].split("-"))
            inside = start <= address < end
        elif inside and head[0] == "Rss:":
            return int(head[1]) * 1024
    raise AssertionError("no mapping holds the tensor")


@pytest.mark.parametrize("vocab, k", [(8192, 576), (3001, 200)])
def test_screen_of_a_file_view_hands_its_pages_back_as_it_goes(tmp_path, vocab, k):
    """Built with release_read_pages over a safetensors view, the screen leaves the table unmapped (never all
    resident at once: pieces are released as they are done) and chooses exactly as one built over memory does."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(vocab)
    weight = torch.randn(vocab, k) * torch.rand(vocab, 1)
    save_file({"head": weight}, str(tmp_path / "head.safetensors"))
    view = safe_open(str(tmp_path / "head.safetensors"), framework="pt").get_tensor("head")
    table_bytes = vocab * k * 4
    kept = torch.classes.comptrust.ScreenedArgmax(view, False)
    assert _resident_bytes_of_mapping(view) >= table_bytes * 0.9  # read whole, and left mapped
    from comptrust.memory import release_mapped_file

    release_mapped_file(view)
    released = torch.classes.comptrust.ScreenedArgmax(view, True)
    assert _resident_bytes_of_mapping(view) < table_bytes // 8
    xs = [torch.randn(k) for _ in range(12)] + [weight[j] for j in (0, vocab // 2, vocab - 1)]
    for x in xs:
        index, rescored = released.first_argmax(x)
        assert (index, rescored) == tuple(kept.first_argmax(x))
        assert index == -1 or index == _full_argmax(weight, x)
    assert torch.equal(view, weight)  # the pages come back from the file


def test_program_greedy_screens_its_dense_head(tiny_llama, monkeypatch):
    """DecodeProgram keeps a screen for a dense fp32 head (describe says so, with its bytes) and greedy's tokens
    are the Python loop's argmax, also after the head is written in place; built under another ISA, the program
    has no screen and the same tokens."""
    prompt = torch.randint(0, 49152, (1, 6), generator=torch.Generator().manual_seed(5))
    decoder = LeanDecoder(tiny_llama, 40)
    assert decoder.program.describe()[-1].startswith("head: 1 bound, greedy screen (int8 copy, ")
    assert decoder.greedy_head == "screened"
    assert LeanDecoder(copy.deepcopy(tiny_llama).to(torch.bfloat16), 40).greedy_head == "full"  # an fp32 head only
    tokens = decoder.greedy_tokens(prompt, 24)
    loop = LeanDecoder(tiny_llama, 40, use_program=False)
    assert tokens == loop.greedy_tokens(prompt, 24)
    model = copy.deepcopy(tiny_llama)
    changed = LeanDecoder(model, 40)
    with torch.no_grad():
        model.lm_head.weight[:, :48].mul_(-1.5)  # tied: the embeddings change too, and the screen's codes go stale
    assert changed.greedy_tokens(prompt, 24) == LeanDecoder(model, 40, use_program=False).greedy_tokens(prompt, 24)
    monkeypatch.setenv("COMPTRUST_CPU_ISA", "avx2")
    unscreened = LeanDecoder(tiny_llama, 40)
    assert unscreened.program.describe()[-1] == "head: 1 bound" and unscreened.greedy_head == "full"
    monkeypatch.delenv("COMPTRUST_CPU_ISA")
    assert unscreened.greedy_tokens(prompt, 24) == tokens
