"""The cache-free reference for decoding tests: what the KV cache, the batched engine and the
server must reproduce exactly."""

from __future__ import annotations

import torch

from gpt2.model import GPT


@torch.no_grad()
def cache_free_greedy(model: GPT, prompt: list[int], n: int, keep: int | None = None) -> list[int]:
    """The definition: each token is the argmax of a full forward pass over the context.

    The context is every token since the last slide; when it would pass block_size tokens it
    restarts from the newest ``keep`` (the sliding-window rule of `gpt2.decode`)."""
    block = model.config.block_size
    keep = keep or block // 2
    seq, start = list(prompt), 0
    for _ in range(n):
        if len(seq) - start > block:
            start = len(seq) - keep
        logits, _ = model(torch.tensor([seq[start:]]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]
