"""The model interface the evaluators use: batched log-likelihood of continuations, and prompt building
(chat template for chat models, plain text otherwise)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm


class LanguageModel:
    def __init__(self, model, tokenizer, chat: bool, batch_size: int = 16, max_length: int = 2048):
        self.model, self.tokenizer, self.chat = model, tokenizer, chat
        self.batch_size, self.max_length = batch_size, max_length

    def prompt(self, user: str, system: str | None = None) -> str:
        """The text the model sees before its answer: the chat template with the assistant turn opened,
        or, for base models, the user text as is."""
        if not self.chat:
            return user if system is None else f"{system}\n\n{user}"
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _encode(self, text: str, is_context: bool) -> list[int]:
        # Chat templates already spell out their special tokens; base models get the tokenizer's BOS.
        special = is_context and not self.chat
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    @torch.inference_mode()
    def loglikelihood(self, requests: list[tuple[str, str]], desc: str = "scoring",
                      progress: bool = True) -> list[tuple[float, int]]:
        """Sum of log p(continuation tokens | context) and the continuation's token count, per request."""
        encoded = []
        for context, continuation in requests:
            ctx, cont = self._encode(context, True), self._encode(continuation, False)
            if not ctx or not cont:
                raise ValueError(f"loglikelihood needs a non-empty context and continuation; got {context[-40:]!r}, "
                                 f"{continuation!r}")
            if len(cont) >= self.max_length:
                raise ValueError(f"continuation of {len(cont)} tokens does not fit max_length={self.max_length}")
            ids = (ctx + cont)[-self.max_length:]
            encoded.append((ids, len(cont)))

        results: list[tuple[float, int] | None] = [None] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))  # similar lengths share a batch
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        pad = self.tokenizer.pad_token_id or 0
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            # Left padding puts every continuation at the end, so only the last `keep` positions need
            # logits: [batch, keep, vocab] instead of [batch, width, vocab] (the vocabulary dominates memory).
            width = max(len(encoded[i][0]) for i in batch)
            keep = max(encoded[i][1] for i in batch) + 1
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids = encoded[i][0]
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention[row, width - len(ids):] = 1
            positions = (attention.cumsum(-1) - 1).clamp(min=0)  # each sequence starts at position 0
            logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                                logits_to_keep=keep).logits
            logprobs = torch.log_softmax(logits.float(), -1)  # [batch, keep, vocab]; last row predicts nothing
            for row, i in enumerate(batch):
                n_cont = encoded[i][1]
                targets = torch.tensor(encoded[i][0][-n_cont:])
                # logits at kept position t predict the token at t+1; the continuation's tokens are the
                # last n_cont, predicted from kept positions keep-1-n_cont .. keep-2
                rows = torch.arange(keep - 1 - n_cont, keep - 1)
                results[i] = (logprobs[row, rows, targets].sum().item(), n_cont)
        return results
