"""Replace a model's nn.Linear layers with compressed modules."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn
from tqdm.auto import tqdm

from comptrust.memory import return_freed_heap


def name_matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or name.split(".")[-1] == p for p in patterns)


def replace_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module],
                    skip: tuple[str, ...] = ("lm_head",),
                    eligible: Callable[[str, nn.Linear], str | None] | None = None,
                    progress: bool = True) -> tuple[list[str], dict[str, str]]:
    """Swap every nn.Linear (except those in `skip`, by full or last-component name) for make(name, layer).

    `eligible(name, layer)` returns None when the layer can be converted, else the reason it stays dense.
    Returns (replaced names, {kept name: reason}). The dense weight is released as each layer is replaced and
    the heap its conversion freed handed back (memory.return_freed_heap), so peak memory grows by one layer, not
    one model.
    """
    candidates, kept = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name_matches(name, skip):
            kept[name] = "skipped by configuration"
            continue
        reason = eligible(name, module) if eligible else None
        if reason:
            kept[name] = reason
        else:
            candidates.append(name)

    for name in tqdm(candidates, desc="compressing layers", disable=not progress, leave=False):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(name, getattr(parent, child)))
        return_freed_heap()
    return candidates, kept
