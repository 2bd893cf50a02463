import math

import pytest
import torch

from comptrust.evals import LanguageModel, perplexity
from comptrust.evals.perplexity import builtin_text
from comptrust.evals.schema import MetricResult, accuracy_with_interval, compare_to_reference


def test_wilson_interval_worked_example():
    # 60 of 100: Wilson 95% interval [50.20, 69.06] (center 59.63, half-width 9.43), by hand.
    score, stderr, (low, high) = accuracy_with_interval(60, 100)
    assert score == 60.0
    assert stderr == pytest.approx(100 * math.sqrt(0.24 / 100))
    assert low == pytest.approx(50.20, abs=0.01) and high == pytest.approx(69.06, abs=0.01)
    with pytest.raises(ValueError):
        accuracy_with_interval(0, 0)


def test_above_chance_flag():
    base = dict(dimension="d", task="t", metric="accuracy", score=60.0, n=100, scorer="s", chance=50.0)
    assert MetricResult(ci95=(50.2, 69.1), **base).above_chance is True
    assert MetricResult(ci95=(45.0, 69.1), **base).above_chance is False
    assert MetricResult(**{**base, "chance": None}).above_chance is None


def test_flip_rate_and_kl_worked_example():
    reference = [{"id": "a", "prediction": 1, "choice_prob": [0.2, 0.8]},
                 {"id": "b", "prediction": 0, "choice_prob": [0.5, 0.5]}]
    samples = [{"id": "a", "prediction": 0, "choice_prob": [0.6, 0.4]},
               {"id": "b", "prediction": 0, "choice_prob": [0.5, 0.5]}]
    flips, kl = compare_to_reference(samples, reference)
    assert flips == 0.5
    expected_a = 0.2 * math.log(0.2 / 0.6) + 0.8 * math.log(0.8 / 0.4)
    assert kl == pytest.approx(expected_a / 2)
    with pytest.raises(ValueError, match="lack items"):
        compare_to_reference([{"id": "zz", "prediction": 0, "choice_prob": [1, 0]}], reference)


def _direct_loglik(model, tokenizer, context, continuation):
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(logprobs[len(ctx) + j - 1, t].item() for j, t in enumerate(cont))


def test_batched_loglikelihood_equals_one_at_a_time(tiny_llama, smollm2_tokenizer):
    lm = LanguageModel(tiny_llama, smollm2_tokenizer, chat=True, batch_size=3)
    # shared contexts with continuations of 1, 2 and several tokens share one context pass
    requests = [("The cat sat on", " the mat"), ("A much longer context that needs left padding in its batch,",
                " and a two-part continuation"), ("Short", " x"), ("Reaction: This is", " not wrong"),
                ("Reaction: This is", " wrong"), ("The cat sat on", " a"), ("Reaction: This is", " not wrong at all, "
                "I would say"), ("Short", " y z")]
    batched = lm.loglikelihood(requests, progress=False)
    for (context, continuation), (value, n_tokens) in zip(requests, batched):
        assert value == pytest.approx(_direct_loglik(tiny_llama, smollm2_tokenizer, context, continuation), abs=1e-3)
        assert n_tokens == len(smollm2_tokenizer(continuation, add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match="non-empty"):
        lm.loglikelihood([("", " x")], progress=False)


def test_perplexity_matches_cross_entropy(tiny_llama, smollm2_tokenizer):
    text = builtin_text()
    result = perplexity(tiny_llama, smollm2_tokenizer, text, seq_len=64, max_tokens=130, progress=False)
    ids = smollm2_tokenizer(text, return_tensors="pt")["input_ids"][0, :130]
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in (0, 64, 128):
            window = ids[start:start + 64]
            logits = tiny_llama(window.unsqueeze(0)).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
            count += len(window) - 1
    assert result.n == count == 63 + 63 + 1
    assert result.score == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert not result.higher_is_better
    # A random model is near-uniform over 49152 tokens.
    assert 1e3 < result.score < 2e5


# ------------------------------------------------------------------------------ generation and cache
PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a", "2 + 2 =",
           "A much longer prompt, so that the others in its batch need left padding before they start:", "Hi"]


def _greedy_one(model, tokenizer, prompt, max_new_tokens):
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_batched_greedy_generation_equals_one_prompt_at_a_time(tiny_llama, smollm2_tokenizer):
    lm = LanguageModel(tiny_llama, smollm2_tokenizer, chat=True, batch_size=3)
    batched = lm.generate(PROMPTS, max_new_tokens=8, progress=False)
    assert [len(r) for r in batched] == [1] * len(PROMPTS)
    for prompt, (text,) in zip(PROMPTS, batched):
        assert text == _greedy_one(tiny_llama, smollm2_tokenizer, prompt, 8)


def test_rows_that_stop_early_leave_the_batch_without_changing_the_others(tiny_llama, smollm2_tokenizer):
    from comptrust.evals.lm import _cut_at_stop

    lm = LanguageModel(tiny_llama, smollm2_tokenizer, chat=True, batch_size=5)
    full = [_greedy_one(tiny_llama, smollm2_tokenizer, p, 12) for p in PROMPTS]
    # The random model repeats its first token, so these stop three rows after 1, 2 and 3 tokens, one by one,
    # while the other two run to the end.
    stop = (full[2][:2], full[3][:2], full[4][:6])
    stopped = lm.generate(PROMPTS, max_new_tokens=12, stop=stop, progress=False)
    assert [answers[0] for answers in stopped] == [_cut_at_stop(text, stop) for text in full]
    assert [len(answers[0]) for answers in stopped].count(len(full[0])) >= 1 and stopped[2] == [""]


def test_sampling_is_seeded_and_gives_n_answers(tiny_llama, smollm2_tokenizer):
    lm = LanguageModel(tiny_llama, smollm2_tokenizer, chat=True, batch_size=2)
    first = lm.generate(PROMPTS[:3], max_new_tokens=6, temperature=1.0, n=4, seed=7, progress=False)
    assert [len(r) for r in first] == [4, 4, 4]
    assert first == lm.generate(PROMPTS[:3], max_new_tokens=6, temperature=1.0, n=4, seed=7, progress=False)
    assert len({text for answers in first for text in answers}) > 3  # a random model samples varied text
    assert first != lm.generate(PROMPTS[:3], max_new_tokens=6, temperature=1.0, n=4, seed=8, progress=False)


def test_generation_arguments_are_checked(tiny_llama, smollm2_tokenizer):
    lm = LanguageModel(tiny_llama, smollm2_tokenizer, chat=True)
    for kwargs, message in (({"n": 2}, "greedy"), ({"n": 0}, "at least 1"), ({"temperature": -1}, "temperature"),
                            ({"temperature": 1.0, "top_p": 0}, "top_p"), ({"max_new_tokens": 2048}, "no room")):
        with pytest.raises(ValueError, match=message):
            lm.generate(["x"], **kwargs)
    with pytest.raises(ValueError, match="prompt 1 .* encodes to no tokens"):
        lm.generate(["x", ""], progress=False)
    assert lm.generate([], progress=False) == []
    with pytest.raises(ValueError, match="fingerprint"):
        LanguageModel(tiny_llama, smollm2_tokenizer, chat=True, cache=object())


def test_stop_strings_cut_the_completion():
    from comptrust.evals.lm import _cut_at_stop

    assert _cut_at_stop("yes. And then\nmore", ("\n", ".")) == "yes"
    assert _cut_at_stop("no stop here", ("\n",)) == "no stop here"


def test_cache_resumes_an_interrupted_run_and_makes_a_rerun_free(tiny_llama, smollm2_tokenizer, tmp_path):
    from comptrust.evals.cache import OutputCache

    cache = OutputCache(tmp_path / "outputs.sqlite")
    lm = LanguageModel(tiny_llama, smollm2_tokenizer, chat=True, batch_size=2, cache=cache, fingerprint="tiny")
    expected = LanguageModel(tiny_llama, smollm2_tokenizer, chat=True, batch_size=2).generate(
        PROMPTS, max_new_tokens=5, progress=False)

    calls = {"n": 0}
    real_decode = lm._decode

    def dies_on_the_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_decode(*args, **kwargs)

    lm._decode = dies_on_the_second_batch
    with pytest.raises(KeyboardInterrupt):
        lm.generate(PROMPTS, max_new_tokens=5, progress=False)
    assert len(cache) == 2  # the first batch (2 prompts) was committed before the crash
    calls["n"] = 10  # no more crashes
    resumed = lm.generate(PROMPTS, max_new_tokens=5, progress=False)
    assert resumed == expected and calls["n"] == 10 + 2  # only the 3 missing prompts: 2 batches
    assert lm.generate(PROMPTS, max_new_tokens=5, progress=False) == expected and calls["n"] == 12  # free
    # Other settings, another model, or log-likelihoods are different records.
    assert len(cache) == len(PROMPTS)
    lm.generate(PROMPTS[:1], max_new_tokens=6, progress=False)
    LanguageModel(tiny_llama, smollm2_tokenizer, chat=True, cache=cache, fingerprint="other").generate(
        PROMPTS[:1], max_new_tokens=5, progress=False)
    assert len(cache) == len(PROMPTS) + 2
    requests = [("The cat sat on", " the mat"), ("Short", " x")]
    scores = lm.loglikelihood(requests, progress=False)
    assert len(cache) == len(PROMPTS) + 4
    cache.close()
    reopened = LanguageModel(tiny_llama, smollm2_tokenizer, chat=True, cache=OutputCache(tmp_path / "outputs.sqlite"),
                             fingerprint="tiny")
    assert reopened.loglikelihood(requests, progress=False) == scores


def test_a_file_that_is_not_a_cache_is_refused(tmp_path):
    from comptrust.evals.cache import OutputCache

    bad = tmp_path / "outputs.sqlite"
    bad.write_bytes(b"this is not an SQLite database, just some bytes" * 100)
    with pytest.raises(ValueError, match="not a comptrust output cache"):
        OutputCache(bad)
    assert bad.read_bytes().startswith(b"this is not")  # left as it was
