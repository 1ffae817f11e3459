"""Next-token logits for many sequences at once: what the scheduler needs from the model.

The scheduler thinks in *slots*: a sequence is prefilled into a free slot, then every decode step
feeds the last token of each active slot and gets back one row of logits per slot. Any engine with
these three methods will do (`DecodeEngine`).

`make_engine` picks the KV-cache engine of `gpt2.generate` (``KVCacheEngine``: each step feeds one
token per slot) and falls back to `RecomputeEngine` where that module has none.

`RecomputeEngine` is the simplest exact one: it keeps each slot's tokens and runs the model over
all of them at every step, right-padded into one batch. Under a causal mask a position never sees
the positions after it, so the padding cannot change a row's last logits; no attention mask is
needed. It costs a full forward pass per step (no KV cache), which the batching amortises.
"""

from __future__ import annotations

from typing import Protocol

import torch

from gpt2.model import GPT
from gpt2.sampling import mask_ids_from


class DecodeEngine(Protocol):
    slots: int  # how many sequences can be active at once
    context: int  # the most tokens one sequence may hold (prompt + completion)

    def prefill(self, slot: int, ids: list[int], all_positions: bool = False) -> torch.Tensor:
        """Put ``ids`` in ``slot``; logits (T, V) for every position, or (1, V) for the last."""
        ...

    def decode(self, slots: list[int], ids: list[int]) -> torch.Tensor:
        """Append ``ids[i]`` to ``slots[i]``; next-token logits (B, V), one row per slot."""
        ...

    def release(self, slot: int) -> None:
        """Forget the slot's sequence; it may be prefilled again."""
        ...


def make_engine(model: GPT, slots: int, vocab_limit: int | None = None) -> DecodeEngine:
    """The fastest engine available for ``model`` with ``slots`` slots; ids from
    ``vocab_limit`` on (a padded vocabulary's) get -inf logits."""
    try:
        from gpt2.generate import KVCacheEngine
    except ImportError:
        return RecomputeEngine(model, slots, vocab_limit)
    return KVCacheEngine(model, slots, vocab_limit=vocab_limit)


class RecomputeEngine:
    """An exact, cache-free `DecodeEngine`: every step reruns the model over each slot's tokens."""

    def __init__(self, model: GPT, slots: int, vocab_limit: int | None = None) -> None:
        self.model = model.eval()
        self.vocab_limit = vocab_limit
        self.slots = slots
        self.context = model.config.block_size
        self.device = next(model.parameters()).device
        self._tokens: dict[int, list[int]] = {}

    @torch.no_grad()
    def prefill(self, slot: int, ids: list[int], all_positions: bool = False) -> torch.Tensor:
        if not 0 < len(ids) <= self.context:
            raise ValueError(f"a prompt must have 1..{self.context} tokens, got {len(ids)}")
        self._tokens[slot] = list(ids)
        hidden = self._hidden([ids])[0]  # (T, C)
        logits = self.model.lm_head(hidden if all_positions else hidden[-1:])  # (T or 1, V)
        return mask_ids_from(logits, self.vocab_limit)

    @torch.no_grad()
    def decode(self, slots: list[int], ids: list[int]) -> torch.Tensor:
        rows = []
        for slot, token in zip(slots, ids, strict=True):
            tokens = self._tokens[slot]
            if len(tokens) >= self.context:
                raise ValueError(f"slot {slot} is full ({self.context} tokens)")
            tokens.append(token)
            rows.append(tokens)
        hidden = self._hidden(rows)  # (B, T, C)
        last = torch.tensor([len(r) - 1 for r in rows], device=self.device)  # (B,)
        logits = self.model.lm_head(hidden[torch.arange(len(rows), device=self.device), last])
        return mask_ids_from(logits, self.vocab_limit)

    def release(self, slot: int) -> None:
        self._tokens.pop(slot, None)

    def _hidden(self, rows: list[list[int]]) -> torch.Tensor:
        """The final hidden states (B, T, C) of right-padded ``rows``; the output head is applied
        only where logits are needed (with GPT-2's 50257-token head it costs as much as the rest
        of a small model)."""
        T = max(len(r) for r in rows)
        idx = torch.zeros((len(rows), T), dtype=torch.long)  # padding id 0, never attended to
        for b, r in enumerate(rows):
            idx[b, : len(r)] = torch.tensor(r)
        idx = idx.to(self.device)
        tr = self.model.transformer
        x = tr.wte(idx) + tr.wpe(torch.arange(T, device=self.device))  # (B, T, C)
        for block in tr.h:
            x = block(x)
        return tr.ln_f(x)
