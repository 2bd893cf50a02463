"""The model interface the evaluators use: batched generation and batched log-likelihood of continuations,
prompt building (chat template for chat models, plain text otherwise), and an optional output cache
(evals/cache.py) so an interrupted evaluation resumes where it stopped."""
from __future__ import annotations

import hashlib

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from comptrust.evals.cache import OutputCache, request_key
from comptrust.evals.shared_prefix import plan_batches, shared_length
from comptrust.models import cache_keyword


class LanguageModel:
    def __init__(self, model, tokenizer, chat: bool, batch_size: int = 16, max_length: int | None = None,
                 cache: OutputCache | None = None, fingerprint: str | None = None):
        """max_length: the longest token sequence the model is given (default: its max_position_embeddings, or
        2048 when its config has none). cache: reuse and store outputs there, keyed by `fingerprint`, which
        must then identify the weights *and* their compression (a compressed model answers differently from
        its dense source)."""
        if max_length is None:
            max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
        if cache is not None and not fingerprint:
            raise ValueError("LanguageModel: a cache needs the model's fingerprint (weights + compression)")
        self.model, self.tokenizer, self.chat = model, tokenizer, chat
        self.batch_size, self.max_length = batch_size, max_length
        self.cache, self.fingerprint = cache, fingerprint

    def prompt(self, user: str, system: str | None = None) -> str:
        """The text the model sees before its answer: the chat template with the assistant turn opened,
        or, for base models, the user text as is."""
        if not self.chat:
            return user if system is None else f"{system}\n\n{user}"
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prompt_messages(self, messages: list[dict]) -> str:
        """The text before the model's answer to a conversation ([{"role", "content"}], e.g. few-shot
        demonstrations as user/assistant turns): the chat template with the assistant turn opened, or, for
        base models, the turns as plain text, each answer following its question after a space."""
        if self.chat:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = ""
        for message in messages:
            if message["role"] == "assistant":
                text += " " + message["content"]
            else:
                text += ("\n\n" if text else "") + message["content"]
        return text

    def _encode(self, text: str, is_context: bool) -> list[int]:
        # Chat templates already spell out their special tokens; base models get the tokenizer's BOS.
        special = is_context and not self.chat
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _left_padded(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """[batch, width] input ids and attention mask, each sequence right-aligned."""
        width = max(len(ids) for ids in sequences)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        return input_ids, attention

    @torch.inference_mode()
    def generate(self, prompts: list[str], max_new_tokens: int = 64, *, temperature: float = 0.0, top_p: float = 1.0,
                 n: int = 1, seed: int = 0, stop: tuple[str, ...] = (), batch_size: int | None = None,
                 desc: str = "generating", progress: bool = True) -> list[list[str]]:
        """n completions of each prompt (already built with prompt()), in batches with left padding and a KV
        cache. temperature 0 is greedy (n must be 1); otherwise sampling with top_p, seeded per batch so the
        same prompts and settings give the same answers. Each completion ends at end-of-sequence or is cut at
        the first `stop` string; a finished row leaves the batch (see _decode)."""
        if n < 1 or max_new_tokens < 1:
            raise ValueError(f"generate: n={n} and max_new_tokens={max_new_tokens} must be at least 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"generate: temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
        if temperature == 0 and n > 1:
            raise ValueError("generate: greedy decoding (temperature 0) gives one answer; n > 1 needs temperature > 0")
        if max_new_tokens >= self.max_length:
            raise ValueError(f"generate: max_new_tokens={max_new_tokens} leaves no room for the prompt in "
                             f"max_length={self.max_length}")
        params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "n": n,
                  "seed": seed, "stop": list(stop), "chat": self.chat}
        results: list[list[str] | None] = [None] * len(prompts)
        keys = [request_key(self.fingerprint, "generate", p, params) for p in prompts] if self.cache is not None else []
        if self.cache is not None:
            found = self.cache.get_many(keys)
            results = [found.get(key) for key in keys]

        todo = [i for i, r in enumerate(results) if r is None]
        # A prompt longer than max_length - max_new_tokens keeps its end, where the question is.
        encoded = {i: self._encode(prompts[i], True)[-(self.max_length - max_new_tokens):] for i in todo}
        empty = [i for i in todo if not encoded[i]]
        if empty:
            raise ValueError(f"generate: prompt {empty[0]} ({prompts[empty[0]]!r}) encodes to no tokens")
        order = sorted(todo, key=lambda i: -len(encoded[i]))  # similar lengths share a batch: less padding
        size = batch_size or self.batch_size
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            # The seed follows the batch's prompts, not its position in the run: a resumed run draws the same.
            digest = hashlib.sha256("\0".join(prompts[i] for i in batch).encode()).digest()
            generator = torch.Generator().manual_seed(seed * 1_000_003 + int.from_bytes(digest[:6], "little"))
            texts = self._decode([encoded[i] for i in batch], n, max_new_tokens, temperature, top_p, stop, generator)
            for row, i in enumerate(batch):
                results[i] = [_cut_at_stop(text, stop) for text in texts[row * n:(row + 1) * n]]
            if self.cache is not None:
                self.cache.put_many("generate", {keys[i]: results[i] for i in batch})
        return results

    def _eos_ids(self) -> set[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos = self.tokenizer.eos_token_id if eos is None else eos
        return set(eos) if isinstance(eos, (list, tuple)) else {eos} if eos is not None else set()

    def _decode(self, sequences: list[list[int]], n: int, max_new_tokens: int, temperature: float, top_p: float,
                stop: tuple[str, ...], generator: torch.Generator) -> list[str]:
        """n continuations of each token sequence (sequence-major: sequence 0's n, then sequence 1's...), decoded
        together with one KV cache. Each sequence is prefilled once, its cache and last logits then copied to its
        n rows, and the batch's common beginning (a system prompt) once for all (_prefill).

        Our own loop rather than model.generate: a row that reaches end-of-sequence (or a stop string) leaves
        the batch and the cache, so short answers stop costing compute (with generate, a batch runs as long
        as its longest answer at full width; on the embedded model's probes half the rows were finished)."""
        logits, cache, attention, positions = self._prefill(sequences, self._shared_tokens(sequences, max_new_tokens))
        if n > 1:
            cache.batch_repeat_interleave(n)
            logits, attention, positions = (t.repeat_interleave(n, 0) for t in (logits, attention, positions))
        cache_arg = cache_keyword(self.model)
        rows = torch.arange(len(sequences) * n)  # which sample each row of the shrinking batch is
        produced: list[list[int]] = [[] for _ in range(len(sequences) * n)]
        eos = self._eos_ids()
        for step in range(max_new_tokens):
            tokens = _pick_tokens(logits.float(), temperature, top_p, generator).tolist()
            done = []
            for row, token in zip(rows.tolist(), tokens):
                ended = token in eos
                if not ended:
                    produced[row].append(token)
                    ended = bool(stop) and any(s in self.tokenizer.decode(produced[row], skip_special_tokens=True)
                                               for s in stop if s)
                done.append(ended)
            keep = ~torch.tensor(done)
            if step == max_new_tokens - 1 or not keep.any():
                break
            ids = torch.tensor(tokens).unsqueeze(1)
            attention = torch.cat([attention, torch.ones(len(tokens), 1, dtype=attention.dtype)], dim=1)
            positions = positions + 1
            if not keep.all():
                index = keep.nonzero().squeeze(1)
                cache.batch_select_indices(index)
                ids, attention, positions, rows = ids[index], attention[index], positions[index], rows[index]
            logits = self.model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True,
                                logits_to_keep=1, **{cache_arg: cache}).logits[:, -1]
        return self.tokenizer.batch_decode(produced, skip_special_tokens=True)

    def _prefill(self, sequences: list[list[int]], shared: int
                 ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor, torch.Tensor]:
        """Runs the token sequences through the model, left-padded, into a new KV cache. Their first `shared`
        tokens, the same in every sequence, run once, in a cache then copied to every row; the rest of each
        sequence is left-padded after them (padding masked out in the middle of a row changes nothing, as at
        its start). Returns the last position's logits [rows, vocab], the cache, the attention mask [rows,
        width] and each row's last position id [rows, 1] (every sequence starts at position 0)."""
        cache = DynamicCache(config=self.model.config)
        cache_arg = cache_keyword(self.model)
        if shared:
            self.model(input_ids=torch.tensor([sequences[0][:shared]]), use_cache=True, logits_to_keep=1,
                       **{cache_arg: cache})
            cache.batch_repeat_interleave(len(sequences))
        input_ids, rest = self._left_padded([ids[shared:] for ids in sequences])
        attention = torch.cat([torch.ones(len(sequences), shared, dtype=rest.dtype), rest], 1)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **{cache_arg: cache}).logits[:, -1]
        return logits, cache, attention, positions[:, -1:]

    def _shared_tokens(self, sequences: list[list[int]], extra: int) -> int:
        """How many tokens at the start of `sequences` _prefill runs once (shared_length); 0 on a model with
        sliding-window layers unless the longest sequence plus `extra` tokens to come fit one window: the
        window is counted in cache slots, and padding in the middle of a row would stretch it."""
        shared = shared_length([tuple(ids) for ids in sequences])
        window = getattr(self.model.config, "sliding_window", None)
        return shared if window is None or max(len(ids) for ids in sequences) + extra <= window else 0

    @torch.inference_mode()
    def loglikelihood(self, requests: list[tuple[str, str]], desc: str = "scoring",
                      progress: bool = True) -> list[tuple[float, int]]:
        """Sum of log p(continuation tokens | context) and the continuation's token count, per request.

        Requests that share a context (the answer choices of one item) share its forward pass: each distinct
        context runs once, with a KV cache, and its continuations then run together on copies of that cache.
        An item with k choices costs one context pass instead of k. Contexts that share a beginning (a chat
        template's system turn, few-shot demonstrations) are batched together where that pays, and a batch's
        common beginning runs once (evals/shared_prefix.py)."""
        contexts, continuations = [], []
        for context, continuation in requests:
            ctx, cont = self._encode(context, True), self._encode(continuation, False)
            if not ctx or not cont:
                raise ValueError(f"loglikelihood needs a non-empty context and continuation; got {context[-40:]!r}, "
                                 f"{continuation!r}")
            if len(cont) >= self.max_length:
                raise ValueError(f"continuation of {len(cont)} tokens does not fit max_length={self.max_length}")
            contexts.append(ctx)
            continuations.append(cont)

        results: list[tuple[float, int] | None] = [None] * len(requests)
        keys = []
        if self.cache is not None:
            keys = [request_key(self.fingerprint, "loglikelihood", list(r), {"chat": self.chat}) for r in requests]
            found = self.cache.get_many(keys)
            results = [tuple(found[key]) if key in found else None for key in keys]
        groups: dict[tuple[int, ...], list[int]] = {}  # distinct context -> the requests that continue it
        for i, result in enumerate(results):
            if result is None:
                groups.setdefault(tuple(contexts[i]), []).append(i)
        for batch in tqdm(plan_batches(list(groups), self.batch_size), desc=desc, disable=not progress, leave=False):
            members = [(row, i) for row, context in enumerate(batch) for i in groups[context]]
            scores = self._score_continuations(batch, [(row, continuations[i]) for row, i in members])
            for (_, i), score in zip(members, scores):
                results[i] = (score, len(continuations[i]))
            if self.cache is not None:
                self.cache.put_many("loglikelihood", {keys[i]: list(results[i]) for _, i in members})
        return results

    def _score_continuations(self, contexts: list[tuple[int, ...]], continuations: list[tuple[int, list[int]]]
                             ) -> list[float]:
        """log p(continuation | context) for each (context row, continuation token ids).

        Pass 1 prefills the contexts (_prefill: their common beginning once), keeping the KV cache and the last
        position's logits, which give every continuation's first token. Pass 2 copies each context's cache once
        per continuation that has more tokens and feeds those tokens (right-padded: padding after a sequence
        cannot change it)."""
        # A context too long for max_length keeps its end, leaving room for its longest continuation.
        room = {row: self.max_length - max(len(cont) for r, cont in continuations if r == row)
                for row in range(len(contexts))}
        kept = [list(context)[-room[row]:] for row, context in enumerate(contexts)]
        longest = max(len(cont) for _, cont in continuations)
        last, cache, attention, positions = self._prefill(kept, self._shared_tokens(kept, longest))
        first = torch.log_softmax(last.float(), -1)  # [contexts, vocab]
        scores = [first[row, cont[0]].item() for row, cont in continuations]

        longer = [k for k, (_, cont) in enumerate(continuations) if len(cont) > 1]
        if not longer:
            return scores
        rows = torch.tensor([continuations[k][0] for k in longer])
        cache.batch_select_indices(rows)  # one copy of its context's cache per continuation
        rest = [continuations[k][1][:-1] for k in longer]  # the tokens that predict tokens 2..n
        width = max(len(tokens) for tokens in rest)
        tokens = torch.full((len(longer), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(longer), width), dtype=attention.dtype)
        for j, fed in enumerate(rest):
            tokens[j, :len(fed)] = torch.tensor(fed)
            mask[j, :len(fed)] = 1
        logits = self.model(input_ids=tokens, attention_mask=torch.cat([attention[rows], mask], 1),
                            position_ids=positions[rows] + 1 + torch.arange(width), use_cache=True,
                            **{cache_keyword(self.model): cache}).logits
        logprobs = torch.log_softmax(logits.float(), -1)  # [continuations, width, vocab]
        for j, k in enumerate(longer):
            targets = torch.tensor(continuations[k][1][1:])
            scores[k] += logprobs[j, torch.arange(len(targets)), targets].sum().item()
        return scores


def _pick_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Greedy (temperature 0) or nucleus sampling from [rows, vocab] logits; one token per row."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        # Drop a token when the more likely ones already cover top_p (the most likely one always stays).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text
