"""Beam search: keep the ``num_beams`` most likely continuations at every step.

The rules are those of Hugging Face's ``generate(num_beams=N, do_sample=False)``, so that both give
the same sequences for the same weights:

- each step ranks ``2 * num_beams`` candidates (beam, token) by their summed log-probability;
- a candidate among the best ``num_beams`` that ends (the end-of-text token, or the length limit)
  joins the finished pool with score ``sum_logprob / generated_length ** length_penalty``; the pool
  keeps the best ``num_beams``; the best candidates that did not end continue as the beams;
- search stops when the length limit is reached, when ``early_stopping`` is set and the pool is
  full, or when the pool is full and the best running beam, scored as if it ended now, cannot beat
  the pool's worst;
- the answer is the pool, best first.

With ``num_beams >= vocab_size ** (n - 1)`` nothing is ever pruned and the best of the pool is the
most likely sequence of ``n`` tokens, which the tests check against an exhaustive search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpt2.errors import UserError
from gpt2.kv_cache import KVCache
from gpt2.model import GPT
from gpt2.sampling import mask_ids_from


@dataclass(frozen=True)
class Beam:
    """A finished beam: its generated tokens (end-of-text included if it ended so) and score."""

    tokens: list[int]
    score: float  # sum of log-probabilities / len(tokens) ** length_penalty


@torch.no_grad()
def beam_search(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    eot_token: int | None = None,
    vocab_limit: int | None = None,
) -> list[Beam]:
    """The finished beams for ``prompt``, best first (at most ``num_beams``); ids from
    ``vocab_limit`` on (a padded vocabulary's, which have no text) are never chosen."""
    block_size = model.config.block_size
    if not prompt:
        raise UserError("beam search needs a prompt of at least one token")
    if len(prompt) + max_new_tokens > block_size:
        raise UserError(
            f"beam search needs prompt + max_new_tokens <= the context ({len(prompt)} + "
            f"{max_new_tokens} > {block_size}); it does not slide the window"
        )
    if max_new_tokens == 0:
        return [Beam([], 0.0)]
    device = model.transformer.wte.weight.device
    cache = KVCache.for_model(model, num_beams, len(prompt) + max_new_tokens)
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    logits, _ = model(idx, cache=cache.select([0]), last_only=True)  # (1, 1, V)
    beams: list[list[int]] = [[]]  # generated tokens of each running beam
    scores = torch.zeros(1, device=device)  # (n,) summed log-probabilities
    finished: list[Beam] = []  # the pool, best first
    can_improve = True
    n_candidates = 2 * num_beams
    for step in range(1, max_new_tokens + 1):
        last = mask_ids_from(logits[:, -1, :].float(), vocab_limit)  # (n, V)
        logprobs = F.log_softmax(last, dim=-1)  # (n, V)
        V = logprobs.size(-1)
        total = (scores[:, None] + logprobs).view(-1)  # (n * V,)
        top_scores, top_index = torch.topk(total, min(n_candidates, total.numel()))
        next_beams, next_scores, sources = [], [], []
        closed = early_stopping and len(finished) == num_beams  # as of the previous step
        for rank, (score, index) in enumerate(
            zip(top_scores.tolist(), top_index.tolist(), strict=True)
        ):
            source, token = divmod(index, V)
            tokens = [*beams[source], token]
            if token == eot_token or step == max_new_tokens:
                if rank < num_beams and can_improve and not closed:
                    finished.append(Beam(tokens, score / step**length_penalty))
                    finished.sort(key=lambda b: b.score, reverse=True)
                    del finished[num_beams:]
            elif len(next_beams) < num_beams:
                next_beams.append(tokens)
                next_scores.append(score)
                sources.append(source)
        pool_full = len(finished) == num_beams
        if not next_beams or step == max_new_tokens or (early_stopping and pool_full):
            break
        if pool_full:
            # The best running beam, scored as if it ended now, against the pool's worst.
            best_possible = next_scores[0] / step**length_penalty
            can_improve = can_improve and best_possible > finished[-1].score
        if not can_improve:
            break
        # Row i of the cache continues beam sources[i]; then all rows take their new token.
        n = len(next_beams)
        cache.reorder(sources + [0] * (num_beams - n))
        beams, scores = next_beams, torch.tensor(next_scores, device=device)
        idx = torch.tensor([[b[-1]] for b in beams], dtype=torch.long, device=device)  # (n, 1)
        logits, _ = model(idx, cache=cache.select(list(range(n))), last_only=True)  # (n, 1, V)
    return finished
