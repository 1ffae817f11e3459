"""Text generation: extend a prompt one token at a time by sampling from the model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt2.model import GPT


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Append ``max_new_tokens`` sampled tokens to each row of ``idx`` (B, T).

    ``temperature`` 0 picks the most likely token (greedy). The model sees at most its last
    ``block_size`` tokens, so a prompt longer than the context is cropped from the left.
    """
    if temperature < 0:
        raise ValueError(f"temperature must not be negative, got {temperature}")
    block_size = model.config.block_size
    for _ in range(max_new_tokens):
        context = idx[:, -block_size:]
        logits, _ = model(context)
        logits = logits[:, -1, :]  # only the last position predicts the next token
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.size(-1):
                kth = torch.topk(logits, top_k).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)
        idx = torch.cat((idx, next_id), dim=1)
    return idx
