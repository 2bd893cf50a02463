"""Which log-likelihood contexts run together, and how much of their beginning they share.

Evaluation prompts repeat their openings: every chat prompt starts with the template's system turn, every item
of a scenario with its system prompt and instructions (stereotype and fairness: ~230-290 tokens per batch on the
embedded model; machine ethics' few-shot items only their ~49-token opening, as each draws its own
demonstrations), every jailbreak item with its jailbreak text.
LanguageModel runs a batch's shared beginning once and only the rest of each sequence on copies of its KV cache
(LanguageModel._prefill); this module measures what a batch shares and chooses log-likelihood batches.

Two plans are costed and the cheaper one is taken: contexts sorted by length (as before sharing: little
padding, sharing whatever a batch happens to share) and contexts in token order, cut greedily where
joining the next one would cost more than starting a new batch (contexts with the same beginning are
neighbours there). The cost counts tokens fed to the model, plus a fixed cost per forward call."""
from __future__ import annotations

import os

# A forward call's fixed cost, in tokens of compute. The embedded model through transformers on 2 cores: one
# token 64 ms, 32 tokens 139 ms, 512 tokens 1014 ms (~2 ms a token): a call costs about 30 tokens. A shared
# beginning runs in a call of its own, so it pays only when it saves more than that; and the plans do not cut
# batches into tiny ones.
CALL_COST_TOKENS = 32

Context = tuple[int, ...]


def shared_length(batch: list[Context]) -> int:
    """Tokens at the start of every context of `batch` that run once for all of them: their common prefix,
    less one token so that each context keeps a token of its own (its last position gives the first
    continuation token's logits); 0 when running it once saves less than the call it needs costs."""
    shared = min(len(os.path.commonprefix(batch)), min(len(c) for c in batch) - 1)
    return shared if (len(batch) - 1) * shared > CALL_COST_TOKENS else 0


def batch_cost(batch: list[Context], shared: int | None = None) -> int:
    """Tokens one batch feeds the model (the shared prefix once, each context's rest padded to the longest),
    plus CALL_COST_TOKENS per forward call."""
    shared = shared_length(batch) if shared is None else shared
    widest = max(len(c) for c in batch)
    calls = 2 if shared else 1
    return shared + len(batch) * (widest - shared) + calls * CALL_COST_TOKENS


def _by_length(contexts: list[Context], batch_size: int) -> list[list[Context]]:
    order = sorted(contexts, key=len, reverse=True)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _by_prefix(contexts: list[Context], batch_size: int) -> list[list[Context]]:
    batches: list[list[Context]] = []
    batch: list[Context] = []
    for context in sorted(contexts):
        if batch and len(batch) < batch_size and batch_cost(batch + [context]) <= batch_cost(batch) + batch_cost([context]):
            batch.append(context)
        else:
            if batch:
                batches.append(batch)
            batch = [context]
    if batch:
        batches.append(batch)
    return batches


def plan_batches(contexts: list[Context], batch_size: int) -> list[list[Context]]:
    """The distinct `contexts` in batches of at most batch_size, whichever of the two plans costs less."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    plans = [_by_length(contexts, batch_size), _by_prefix(contexts, batch_size)]
    return min(plans, key=lambda plan: sum(batch_cost(batch) for batch in plan))
