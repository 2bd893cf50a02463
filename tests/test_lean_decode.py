"""The lean batch-1 decoder computes what transformers' Llama forward computes, on dense and compressed layers;
its decode steps' C++ program (csrc/cpu/decode_program.cpp) computes bit for bit what its Python loop does."""
import copy

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from comptrust import _C, compress_
from comptrust.compress import config_from_tag
from comptrust.efficiency import measure_speed
from comptrust.lean_decode import LeanDecoder, decode_program, unsupported_reason
from comptrust.models import cache_keyword, load_model
from quant_cases import available_isas


def _transformers_logits(model, chunks):
    """Last-position logits after each chunk of ids, fed in turn through transformers with its cache."""
    cache = {cache_keyword(model): DynamicCache(config=model.config)}
    with torch.inference_mode():
        return [model(input_ids=ids, use_cache=True, **cache).logits[:, -1] for ids in chunks]


def _lean_logits(model, chunks, max_positions=None):
    decoder = LeanDecoder(model, max_positions or sum(ids.shape[1] for ids in chunks))
    return [decoder.forward(ids) for ids in chunks]


def _assert_close(got, expected, rel):
    for step, (a, b) in enumerate(zip(got, expected)):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= rel * scale, f"step {step}: {(a - b).abs().max().item()} vs {scale}"


def _greedy_chunks(model, prompt, steps):
    """The prompt and then `steps` single tokens: transformers' own greedy continuation."""
    chunks = [prompt]
    cache = {cache_keyword(model): DynamicCache(config=model.config)}
    with torch.inference_mode():
        token = model(input_ids=prompt, use_cache=True, **cache).logits[:, -1:].argmax(-1)
        for _ in range(steps):
            chunks.append(token)
            token = model(input_ids=token, use_cache=True, **cache).logits[:, -1:].argmax(-1)
    return chunks


def test_matches_transformers_prefill_and_decode(tiny_llama):
    torch.manual_seed(1)
    chunks = _greedy_chunks(tiny_llama, torch.randint(0, 49152, (1, 19)), 6)
    _assert_close(_lean_logits(tiny_llama, chunks), _transformers_logits(tiny_llama, chunks), 1e-5)


@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 2.0}, {"rope_type": "llama3", "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rotary_table_rows_are_the_modules_own_angles(tiny_llama, rope):
    """The decoder's table of rotary angles holds, bit for bit, what the model's rotary module returns for each
    position on its own (the call a step would make), for the rope types it runs (dynamic and longrope, whose
    frequencies change with the length reached, are refused: test_unsupported_configs_fall_back_to_transformers)."""
    model = tiny_llama
    if rope is not None:
        config = copy.deepcopy(tiny_llama.config)
        config.rope_parameters = {**config.rope_parameters, **rope}
        model = LlamaForCausalLM(config).eval()
    decoder = LeanDecoder(model, 300)
    probe = torch.empty(1, 1, 1)
    for position in (0, 1, 17, 299):
        cos, sin = model.model.rotary_emb(probe, torch.tensor([[position]]))
        assert torch.equal(decoder._cos_sin[0][:, position:position + 1], cos)
        assert torch.equal(decoder._cos_sin[1][:, position:position + 1], sin)


def test_chunks_after_earlier_tokens_are_causal(tiny_llama):
    """A chunk of several tokens after a prefill sees the earlier tokens and none after itself."""
    torch.manual_seed(2)
    ids = torch.randint(0, 49152, (1, 23))
    chunks = [ids[:, :9], ids[:, 9:10], ids[:, 10:23]]
    _assert_close(_lean_logits(tiny_llama, chunks, max_positions=40), _transformers_logits(tiny_llama, chunks), 1e-5)
    whole = _lean_logits(tiny_llama, [ids])[0]
    _assert_close([_lean_logits(tiny_llama, chunks)[-1]], [whole], 1e-5)


def test_bf16_model_matches_transformers_to_bf16_precision(tiny_llama):
    model = LlamaForCausalLM(tiny_llama.config).eval().to(torch.bfloat16)
    model.load_state_dict(tiny_llama.state_dict())
    torch.manual_seed(3)
    chunks = _greedy_chunks(model, torch.randint(0, 49152, (1, 12)), 3)
    got = _lean_logits(model, chunks)
    assert got[0].dtype == torch.bfloat16
    _assert_close(got, _transformers_logits(model, chunks), 0.05)


def test_refuses_what_it_cannot_run_and_keeps_its_state(tiny_llama):
    decoder = LeanDecoder(tiny_llama, 8)
    decoder.forward(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="reach 9 tokens; this decoder holds 8"):
        decoder.forward(torch.arange(6).unsqueeze(0))
    for bad in (torch.tensor([1, 2]), torch.ones(2, 1, dtype=torch.long), torch.ones(1, 0, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"input_ids must be \[1, T\]"):
            decoder.forward(bad)
    assert decoder.position == 3
    decoder.forward(torch.tensor([[4]]))  # the sequence goes on where it was
    assert decoder.position == 4
    with pytest.raises(ValueError, match="max_positions"):
        LeanDecoder(tiny_llama, 0)


def _variant(tiny_llama, **changes):
    config = LlamaConfig(**{**tiny_llama.config.to_dict(), **changes})
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("changes, reason", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "activation 'gelu'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "dynamic"),
])
def test_unsupported_configs_fall_back_to_transformers(tiny_llama, changes, reason):
    model = _variant(tiny_llama, **changes)
    assert reason in unsupported_reason(model)
    with pytest.raises(ValueError, match="cannot run this model"):
        LeanDecoder(model, 8)
    with pytest.raises(ValueError, match="lean runtime cannot run"):
        measure_speed(model, torch.randint(0, 1000, (6,)), decode_tokens=2, repeats=1, runtime="lean")
    result = measure_speed(model, torch.randint(0, 1000, (6,)), decode_tokens=2, repeats=1)
    assert result.runtime == "hf" and reason in result.runtime_note


def test_other_architectures_are_named():
    assert "is not llama" in unsupported_reason(torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def embedded():
    return load_model("default")  # loaded once for the module


@pytest.mark.slow
@pytest.mark.parametrize("tag", [None, "rtn-w4g128", "rtn-w3g128", "mag-24-w4g64", "mag-24"])
def test_embedded_model_decodes_as_with_transformers(embedded, tag):
    """The real embedded model, dense and on each compressed kernel family: same logits, same greedy tokens."""
    model = copy.deepcopy(embedded.model)
    if tag:
        compress_(model, config_from_tag(tag), progress=False)
    prompt = embedded.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    chunks = _greedy_chunks(model, prompt, 8)
    expected = _transformers_logits(model, chunks)
    got = _lean_logits(model, chunks)
    _assert_close(got, expected, 1e-4)
    assert [g.argmax().item() for g in got] == [e.argmax().item() for e in expected]


def _program_and_loop_logits(model, prompt, steps):
    """Logits of the prompt and `steps` greedy tokens, decoded with the C++ program and with the Python loop."""
    with_program, without = LeanDecoder(model, 64), LeanDecoder(model, 64, use_program=False)
    assert with_program.program is not None and without.program is None
    got, expected = [with_program.forward(prompt)], [without.forward(prompt)]
    for _ in range(steps):
        token = expected[-1].argmax(-1, keepdim=True)
        got.append(with_program.forward(token))
        expected.append(without.forward(token))
    return got, expected


@pytest.mark.parametrize("tag", [None, "rtn-w4g128", "rtn-w4g128-a8", "rtn-w3g128-a8", "mag-24", "mag-24-w4g64",
                                 "mag-24-w4g64-a8", "mag-50"])
def test_program_is_bit_identical_to_the_python_loop(tiny_llama, tag):
    """Dense (nn.Linear), int4/int3 tiled layers through gemm_tiled_many, 2:4 float and int4 layers one op each;
    float and int8 activations."""
    model = copy.deepcopy(tiny_llama)
    if tag:
        compress_(model, config_from_tag(tag), progress=False)
    got, expected = _program_and_loop_logits(model, torch.randint(0, 49152, (1, 11)), 6)
    for step, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"{tag} step {step}"


@pytest.mark.parametrize("tag", ["mag-24", "mag-24-w4g64", "mag-24-w4g64-a8", "rtn-w4g128", "rtn-w4g128-a8"])
def test_program_is_bit_identical_on_wide_layers(tag):
    """gate/up 1048 wide (131 tiles of 8): the ops run fp32 2:4 layers of 128+ tiles four tiles per task (int4 values
    on int8 activations two tile pairs per task), which the program's bound products must match bit for bit tile by
    tile, the odd tiles at the end included."""
    torch.manual_seed(2)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=1048, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    compress_(model, config_from_tag(tag), progress=False)
    got, expected = _program_and_loop_logits(model, torch.randint(0, 49152, (1, 5)), 3)
    for step, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"{tag} step {step}"


def test_program_is_bit_identical_in_bf16(tiny_llama):
    model = copy.deepcopy(tiny_llama).to(torch.bfloat16)
    got, expected = _program_and_loop_logits(model, torch.randint(0, 49152, (1, 7)), 4)
    assert got[-1].dtype == torch.bfloat16 and all(torch.equal(a, b) for a, b in zip(got, expected))


def _program_and_loop_tokens(model, prompt, count, max_positions=64):
    """Greedy tokens (and the caches after them) with whole steps in the program and with forward + argmax."""
    with_program, without = LeanDecoder(model, max_positions), LeanDecoder(model, max_positions, use_program=False)
    assert with_program._greedy_in_program and not without._greedy_in_program
    got, expected = with_program.greedy_tokens(prompt, count), without.greedy_tokens(prompt, count)
    assert torch.equal(with_program.keys, without.keys) and torch.equal(with_program.values, without.values)
    assert with_program.position == without.position == prompt.shape[1] + count - 1
    return got, expected


@pytest.mark.parametrize("tag", [None, "rtn-w4g128", "rtn-w3g128-a8", "mag-24", "rtn-w4g128-head", "mag-50"])
def test_whole_greedy_steps_choose_the_python_loops_tokens(tiny_llama, tag):
    """DecodeProgram.greedy (embedding, layers, final norm, output projection, argmax in one call) against
    LeanDecoder.forward + torch's argmax: the same tokens and bit-identical caches, with a dense or an int4 output
    projection ("-head")."""
    model = copy.deepcopy(tiny_llama)
    if tag:
        compress_(model, config_from_tag(tag), progress=False)
    got, expected = _program_and_loop_tokens(model, torch.randint(0, 49152, (1, 9)), 12)
    assert got == expected


def test_whole_greedy_steps_break_ties_and_nans_as_torch_argmax(tiny_llama):
    """Equal logits: the first index, as torch.argmax; a NaN logit: its index (torch counts NaN as the largest)."""
    model = copy.deepcopy(tiny_llama)
    model.config.tie_word_embeddings = False
    head = torch.nn.Linear(96, 49152, bias=False)
    head.weight.data.zero_()  # every logit 0 ...
    head.weight.data[3::5] = model.lm_head.weight.data[3]  # ... but rows 3, 8, 13, ...: one other value, repeated
    model.lm_head = head
    prompt = torch.randint(0, 49152, (1, 5))
    got, expected = _program_and_loop_tokens(model, prompt, 4)
    assert got == expected and set(got[1:]) <= {0, 3}  # the first of whichever tie is larger
    head.weight.data[40000] = float("nan")
    head.weight.data[45000] = float("nan")
    got, expected = _program_and_loop_tokens(model, prompt, 3)
    assert got == expected == [40000, 40000, 40000]


def test_first_argmax_is_torch_argmax(isa):
    """The greedy step's argmax (two AVX-512 passes, or a scalar loop) on each ISA against torch.argmax: odd lengths (vector
    tails), ties, -0 against +0, all -inf, NaNs anywhere (torch takes the first NaN), bf16 logits."""
    first_argmax = torch.classes.comptrust.DecodeProgram.first_argmax
    gen = torch.Generator().manual_seed(5)
    cases = []
    for n in (1, 5, 16, 17, 31, 1003, 49152):
        x = torch.randn(n, generator=gen)
        cases += [x, x.round(), torch.zeros(n), torch.full((n,), float("-inf")), x.bfloat16()]
        for at in {0, n // 2, n - 1}:
            nan = x.clone()
            nan[at] = float("nan")
            cases.append(nan)
        if n > 1:
            zeros = torch.zeros(n)
            zeros[0] = -0.0
            cases.append(zeros)
            cases.append(torch.cat([x[:-1], x.max().reshape(1) + 1]))
    for logits in cases:
        assert first_argmax(logits.view(1, -1)) == int(logits.view(1, -1).argmax(-1)), logits
    with pytest.raises(RuntimeError, match="no logits"):
        first_argmax(torch.zeros(1, 0))


def test_whole_greedy_steps_refuse_bad_calls(tiny_llama):
    decoder = LeanDecoder(tiny_llama, 6)
    decoder.greedy_tokens(torch.randint(0, 49152, (1, 4)), 3)
    with pytest.raises(ValueError, match="would reach 7 tokens; this decoder holds 6"):
        decoder.next_token(5)
    cos, sin = decoder._cos_sin
    with pytest.raises(RuntimeError, match="token 49152 is outside the vocabulary of 49152"):
        decoder.program.greedy(49152, decoder.keys, decoder.values, cos, sin, 0)
    with pytest.raises(RuntimeError, match="position 6 is outside the rotary tables"):
        decoder.program.greedy(1, decoder.keys, decoder.values, cos, sin, 6)
    bare = torch.classes.comptrust.DecodeProgram(1e-6, 1.0)
    with pytest.raises(RuntimeError, match="needs set_embedding and one output projection"):
        bare.greedy(0, decoder.keys, decoder.values, cos, sin, 0)
    with pytest.raises(RuntimeError, match=r"embedding must be contiguous \[vocab, d\]"):
        bare.set_embedding(torch.zeros(4, 8), torch.ones(7))


class _Doubled(torch.nn.Module):
    """A linear the program has no call for: its forward is not nn.Linear's nor a tiled op's."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x) * 2


def test_layers_the_program_cannot_call_keep_the_python_loop(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    model.model.layers[1].mlp.down_proj = _Doubled(model.model.layers[1].mlp.down_proj)
    assert decode_program(list(model.model.layers), 1e-6, 1.0, torch.float32) is None
    decoder = LeanDecoder(model, 16)
    assert decoder.program is None
    chunks = _greedy_chunks(model, torch.randint(0, 49152, (1, 5)), 3)
    _assert_close([decoder.forward(ids) for ids in chunks], _transformers_logits(model, chunks), 1e-5)
    act_order = copy.deepcopy(tiny_llama)
    compress_(act_order, config_from_tag("rtn-w4g128"), progress=False)
    linear = act_order.model.layers[0].self_attn.o_proj
    linear.__class__ = type("Subclassed", (type(linear),), {"forward": lambda self, x: type(linear).forward(self, x)})
    assert decode_program(list(act_order.model.layers), 1e-6, 1.0, torch.float32) is None  # an overridden forward is not called


@pytest.mark.parametrize("tag", [None, "rtn-w4g128", "mag-24", "mag-24-w4g64", "mag-50"])
def test_program_binds_its_fp32_linears(tiny_llama, tag):
    """Where an fp32 row can take a product bound once to its weights (bound_gemv.h: dense rows; tiled and 2:4
    layers on the AVX-512 kernels), the program runs it without the dispatcher, and the q/k/v and gate/up of a
    layer become one call (one parallel region). A bf16 model keeps the ops."""
    model = copy.deepcopy(tiny_llama)
    if tag:
        compress_(model, config_from_tag(tag), progress=False)
    how = "bound" if tag in (None, "mag-50") or "avx512" in available_isas() else "op"  # mag-50: bitmap or dense
    parts = (("qkv", 3), ("o", 1), ("gate_up", 2), ("down", 1))
    if how == "op" and tag.startswith("mag-24"):
        # No bound 2:4 product here (an AVX2 CPU, the portable build): one op call a layer. The tiny model's down
        # projection (k = 200) stays dense under w4g64 (groups of 128 inputs), and dense rows always bind.
        down = "1 bound" if tag == "mag-24-w4g64" else "1 op"
        expected = [line for i in range(2) for part, n in parts
                    for line in ([f"layer {i} down: {down}"] if part == "down" else [f"layer {i} {part}: 1 op"] * n)]
    else:
        expected = [f"layer {i} {part}: {n} {how}" for i in range(2) for part, n in parts]
    program = LeanDecoder(model, 16).program
    screen = ", greedy screen (int8 copy, 7.1 MB)" if _C.cpu_avx512_vnni() else ""  # test_screened_argmax.py
    assert program.describe() == expected + ["head: 1 bound" + screen]
    assert program.float_steps() == (how == "bound")  # then whole steps run on raw buffers, no op calls
    bf16 = LeanDecoder(copy.deepcopy(tiny_llama).to(torch.bfloat16), 16).program
    assert bf16.describe()[:4] == ["layer 0 qkv: 3 op", "layer 0 o: 1 op", "layer 0 gate_up: 2 op", "layer 0 down: 1 op"]
    assert not bf16.float_steps()


def test_program_binds_int8_activation_layers(tiny_llama):
    """w4a8 layers take the one-stream kernels' bound product (VNNI) where k and the group size are multiples
    of 16; the tiny model's down projection (k = 200) keeps the op and its two-tile kernel. 2:4 int4 layers on
    int8 activations take the a8 kernel's bound product (VNNI and VBMI), every layer."""
    model = copy.deepcopy(tiny_llama)
    compress_(model, config_from_tag("rtn-w4g128-a8"), progress=False)
    how = "bound" if "avx512" in available_isas() and _C.cpu_avx512_vnni() else "op"
    assert LeanDecoder(model, 16).program.describe()[:4] == [
        f"layer 0 qkv: 3 {how}", f"layer 0 o: 1 {how}", f"layer 0 gate_up: 2 {how}", "layer 0 down: 1 op"]
    sparse = copy.deepcopy(tiny_llama)
    compress_(sparse, config_from_tag("mag-24-w4g64-a8"), progress=False)
    if "avx512" in available_isas() and _C.cpu_avx512_vnni_vbmi():
        expected = ["layer 0 qkv: 3 bound", "layer 0 o: 1 bound", "layer 0 gate_up: 2 bound", "layer 0 down: 1 bound"]
    else:  # no bound 2:4 product here: one op call a layer
        expected = ["layer 0 qkv: 1 op"] * 3 + ["layer 0 o: 1 op"]
    assert LeanDecoder(sparse, 16).program.describe()[:4] == expected


def test_float_steps_refuse_caches_and_positions_the_ops_refuse(tiny_llama):
    """Where the caches or the position do not fit, the step takes the ops, which raise their own errors."""
    decoder = LeanDecoder(tiny_llama, 8)
    assert decoder.program.float_steps()
    hidden, (cos, sin) = torch.randn(1, 1, 96), (table[:, :1] for table in decoder._cos_sin)
    wide = torch.zeros(2, 2, 8, 26)
    with pytest.raises(RuntimeError, match="k and v must hold one token's 2 x 26 values"):
        decoder.program.step(hidden, wide, wide.clone(), cos, sin, 0)
    with pytest.raises(RuntimeError, match="position 8 is outside the cache's 8 positions"):
        decoder.program.step(hidden, decoder.keys, decoder.values, cos, sin, 8)
    with pytest.raises(RuntimeError, match="cos and sin must hold 24 values"):
        decoder.program.step(hidden, decoder.keys, decoder.values, cos[..., :12], sin[..., :12], 0)
    tables = [torch.cat([table, table]) for table in decoder._cos_sin]  # two [max_positions, head_dim] tables
    with pytest.raises(RuntimeError, match="decode_attention: cos must be contiguous"):  # its rows two tables apart
        decoder.program.greedy(5, decoder.keys, decoder.values, *tables, 0)


def test_program_rejects_bad_use_with_clear_errors(tiny_llama):
    program = torch.classes.comptrust.DecodeProgram(1e-6, 1.0)
    with pytest.raises(RuntimeError, match="add_layer before its linears"):
        program.add_dense("o", torch.zeros(4, 4))
    program.add_layer(torch.ones(4), torch.ones(4))
    with pytest.raises(RuntimeError, match="unknown part 'mlp'"):
        program.add_dense("mlp", torch.zeros(4, 4))
    with pytest.raises(RuntimeError, match="sparse24_gemm_tiled takes 3 arguments, got x, 1 tensors and 2 ints"):
        program.add_op("o", "comptrust::sparse24_gemm_tiled", [torch.zeros(1)], [3, 4])
    with pytest.raises(RuntimeError, match="argument meta is Tensor, not the int given there"):
        program.add_op("o", "comptrust::sparse24_gemm_tiled", [torch.zeros(1)], [3])
    with pytest.raises(RuntimeError, match="comptrust::no_such_op"):
        program.add_op("o", "comptrust::no_such_op", [], [])
    with pytest.raises(RuntimeError, match=r"gemm_tiled: zeros is \[2, 1, 8\], expected \[2, 2, 8\]"):
        program.add_many("qkv", [torch.zeros(2, 4, 8, dtype=torch.int32)], [torch.zeros(2, 1, 8, dtype=torch.uint8)],
                         [torch.zeros(2, 1, 8, dtype=torch.float16)], 4, 16, 0)
    with pytest.raises(RuntimeError, match="missing a linear"):
        program.step(torch.zeros(1, 1, 4), torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4), torch.ones(1, 1, 4),
                     torch.zeros(1, 1, 4), 0)
    with pytest.raises(RuntimeError, match="caches must be"):
        program.step(torch.zeros(1, 1, 4), torch.zeros(2, 1, 8, 4), torch.zeros(2, 1, 8, 4), torch.ones(1, 1, 4),
                     torch.zeros(1, 1, 4), 0)
