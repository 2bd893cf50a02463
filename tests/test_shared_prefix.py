import contextlib
import random

import pytest
import torch

from comptrust.evals import LanguageModel
from comptrust.evals.shared_prefix import CALL_COST_TOKENS, batch_cost, plan_batches, shared_length
from comptrust.models import cache_keyword


def _direct_loglik(model, tokenizer, context_ids, continuation):
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([context_ids + cont])).logits[0].float(), -1)
    return sum(logprobs[len(context_ids) + j - 1, t].item() for j, t in enumerate(cont))


def test_shared_length_leaves_every_context_a_token_of_its_own():
    head = tuple(range(100, 100 + 2 * CALL_COST_TOKENS))
    assert shared_length([head + (1, 2), head + (1, 3, 4)]) == len(head) + 1
    assert shared_length([head, head + (5, 6)]) == len(head) - 1  # one context is the other's beginning
    assert shared_length([head + (1,)]) == 0  # alone: nothing to share
    assert batch_cost([head + (1,), head + (2,)]) < batch_cost([head + (1,), head + (2,)], shared=0)
    # A shared pass must save more than the call it costs: 20 tokens saved once do not pay, twice do.
    short = head[:20]
    assert shared_length([short + (1,), short + (2,)]) == 0
    assert shared_length([short + (1,), short + (2,), short + (3,)]) == 20


def test_plans_keep_every_context_once_and_group_shared_beginnings():
    rng = random.Random(0)
    header = tuple(range(1, 21))  # every context: like a chat template's system turn
    demos = [tuple(rng.randrange(50, 5000) for _ in range(150)) for _ in range(3)]  # three few-shot sets
    contexts = list({header + demos[i % 3] + tuple(rng.randrange(50, 5000) for _ in range(rng.randrange(5, 40)))
                     for i in range(45)})
    contexts += [header + tuple(rng.randrange(50, 5000) for _ in range(rng.randrange(10, 60))) for _ in range(20)]
    plan = plan_batches(contexts, batch_size=8)
    flat = [c for batch in plan for c in batch]
    assert sorted(flat) == sorted(contexts) and all(1 <= len(batch) <= 8 for batch in plan)
    # Each few-shot context runs in a batch that shares its demonstrations: their 150 tokens are paid once per
    # batch, not once per context.
    for batch in plan:
        if len(batch[0]) > 170 and len(batch) > 1:
            assert shared_length(batch) >= len(header) + 150
    by_length = sorted(contexts, key=len, reverse=True)
    naive = sum(batch_cost(by_length[i:i + 8]) for i in range(0, len(by_length), 8))
    assert sum(batch_cost(batch) for batch in plan) < 0.6 * naive
    # Nothing shared: the plan is the length-sorted one (least padding).
    plain = [tuple(rng.randrange(50, 5000) for _ in range(n)) for n in range(5, 45)]
    assert plan_batches(plain, 8) == [sorted(plain, key=len, reverse=True)[i:i + 8] for i in range(0, 40, 8)]
    with pytest.raises(ValueError, match="batch_size"):
        plan_batches(plain, 0)


@contextlib.contextmanager
def fed_tokens(model):
    """The number of tokens each forward call of `model` is fed while inside (its input_ids' size)."""
    fed = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs["input_ids"].numel()),
                                             with_kwargs=True)
    try:
        yield fed
    finally:
        handle.remove()


@pytest.mark.parametrize("batch_size", [2, 4, 16])
def test_loglikelihood_over_shared_beginnings_equals_one_at_a_time(tiny_llama, smollm2_tokenizer, batch_size):
    lm = LanguageModel(tiny_llama, smollm2_tokenizer, chat=False, batch_size=batch_size)
    demos = ("You are a careful assistant. Answer each question with yes or no, as in these examples.\n"
             "Q: Is the sky blue on a clear day? A: yes\nQ: Do fish climb trees? A: no\n")
    contexts = [demos + "Q: Is water wet? A:", demos + "Q: Can a cat read the newspaper aloud to its owner? A:",
                demos + "Q: Is ice cold?", demos + "Q: Is ice cold? A:", demos, "Unrelated short context:",
                demos + "Q: Do birds fly south in winter, or do they all stay? A:"]
    requests = [(c, answer) for c in contexts for answer in (" yes", " no", " not at all, I would say")]
    with fed_tokens(tiny_llama) as fed:
        scores = lm.loglikelihood(requests, progress=False)
    for (context, continuation), (value, _) in zip(requests, scores):
        ids = smollm2_tokenizer(context)["input_ids"]  # as _encode: a base model's context gets the BOS
        assert value == pytest.approx(_direct_loglik(tiny_llama, smollm2_tokenizer, ids, continuation), abs=1e-4)
    context_tokens = sum(len(smollm2_tokenizer(c)["input_ids"]) for c in contexts)
    assert sum(fed) < context_tokens  # the demonstrations ran fewer times than there are contexts


def test_truncated_or_sliding_window_batches_do_not_share(tiny_llama, smollm2_tokenizer):
    demos = "A long common beginning that every context of this test repeats word for word, " * 3
    requests = [(demos + tail, " yes") for tail in ("first", "second one", "third, longest of them")]
    lengths = [len(smollm2_tokenizer(c)["input_ids"]) for c, _ in requests]
    # max_length below the longest context: the longest keeps its end, so the beginnings differ; nothing is shared
    short = LanguageModel(tiny_llama, smollm2_tokenizer, chat=False, max_length=max(lengths) - 2)
    with fed_tokens(tiny_llama) as fed:
        scores = short.loglikelihood(requests, progress=False)
    for (context, continuation), (value, _) in zip(requests, scores):
        ids = smollm2_tokenizer(context)["input_ids"][-(max(lengths) - 2 - 1):]
        assert value == pytest.approx(_direct_loglik(tiny_llama, smollm2_tokenizer, ids, continuation), abs=1e-4)
    assert len(fed) == 1  # one pass, no separate shared one
    # A sliding window narrower than the batch: padding in the middle of a row would count towards it.
    tiny_llama.config.sliding_window = max(lengths)
    try:
        with fed_tokens(tiny_llama) as fed:
            LanguageModel(tiny_llama, smollm2_tokenizer, chat=False).loglikelihood(requests, progress=False)
    finally:
        tiny_llama.config.sliding_window = None
    assert len(fed) == 1
    with fed_tokens(tiny_llama) as fed:
        LanguageModel(tiny_llama, smollm2_tokenizer, chat=False).loglikelihood(requests, progress=False)
    assert len(fed) == 2 and sum(fed) < sum(lengths)


SYSTEM = ("You are a patient assistant for a library. You answer questions about opening hours, borrowing rules "
          "and events briefly and politely, and you never make up a rule you were not told.")
QUESTIONS = ["When do you open?", "Can I borrow ten books at once, or is there a limit on how many?", "Events?",
             "Is the reading room quiet on Sunday afternoons?", "Do I need a card?"]


def test_generation_over_a_shared_system_prompt_equals_one_prompt_at_a_time(tiny_llama, smollm2_tokenizer):
    from test_evals import _greedy_one

    lm = LanguageModel(tiny_llama, smollm2_tokenizer, chat=True, batch_size=4)
    prompts = [lm.prompt(question, system=SYSTEM) for question in QUESTIONS]
    with fed_tokens(tiny_llama) as fed:
        answers = lm.generate(prompts, max_new_tokens=8, progress=False)
    for prompt, (text,) in zip(prompts, answers):
        assert text == _greedy_one(tiny_llama, smollm2_tokenizer, prompt, 8)
    # The prefill calls (more than one token per row) took fewer tokens than the prompts hold: the system turn
    # ran once per batch.
    prompt_tokens = sum(len(smollm2_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    decode_steps = len(answers) * 8  # at most one token per row per step
    assert sum(fed) - decode_steps < prompt_tokens - len(SYSTEM.split())


def test_samples_of_one_prompt_share_its_prefill(tiny_llama, smollm2_tokenizer):
    lm = LanguageModel(tiny_llama, smollm2_tokenizer, chat=True, batch_size=8)
    prompts = [lm.prompt(question) for question in QUESTIONS[:2]]
    with fed_tokens(tiny_llama) as fed:
        first = lm.generate(prompts, max_new_tokens=4, temperature=1.0, n=5, seed=3, progress=False)
    assert [len(samples) for samples in first] == [5, 5] and len({s for samples in first for s in samples}) > 2
    longest = max(len(smollm2_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    # The prefill: each prompt once (padded), not once per sample; then 3 steps of one token for each of 10 rows.
    assert fed[0] <= len(prompts) * longest and sum(fed[1:]) <= 3 * 2 * 5
    assert first == lm.generate(prompts, max_new_tokens=4, temperature=1.0, n=5, seed=3, progress=False)


def test_prefill_with_a_shared_beginning_gives_each_sequence_its_own_logits(tiny_llama, smollm2_tokenizer):
    lm = LanguageModel(tiny_llama, smollm2_tokenizer, chat=True)
    sequences = [smollm2_tokenizer(lm.prompt(q, system=SYSTEM), add_special_tokens=False)["input_ids"]
                 for q in QUESTIONS]
    shared = lm._shared_tokens(sequences, 0)
    assert shared > 40  # the system turn
    with torch.inference_mode():
        last, cache, attention, positions = lm._prefill(sequences, shared)
        following = last.argmax(-1)
        # One step further from the cache, as _decode takes it.
        step = tiny_llama(input_ids=following[:, None], attention_mask=torch.cat(
            [attention, torch.ones(len(sequences), 1, dtype=attention.dtype)], 1), position_ids=positions + 1,
            use_cache=True, **{cache_keyword(tiny_llama): cache}).logits[:, -1]
        for row, ids in enumerate(sequences):
            alone = tiny_llama(torch.tensor([ids + [following[row].item()]])).logits[0]
            assert positions[row, 0] == len(ids) - 1
            assert torch.allclose(last[row], alone[-2], atol=1e-5, rtol=0)
            assert torch.allclose(step[row], alone[-1], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def smollm2():
    from comptrust.models import load_model

    return load_model("default")


def test_greedy_answers_of_the_embedded_model_over_a_shared_system_prompt(smollm2):
    # The real model's answers follow its context closely (a random model's barely do): a wrong position or
    # mask anywhere in the shared prefill or the decode steps would change them.
    lm = LanguageModel(smollm2.model, smollm2.tokenizer, chat=True, batch_size=3)
    prompts = [lm.prompt(question, system=SYSTEM) for question in QUESTIONS]
    answers = lm.generate(prompts, max_new_tokens=10, progress=False)
    assert lm._shared_tokens([smollm2.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[:3]], 10)
    for prompt, (text,) in zip(prompts, answers):
        ids = smollm2.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            out = smollm2.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                         pad_token_id=smollm2.tokenizer.pad_token_id)
        assert text == smollm2.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
