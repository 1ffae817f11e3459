"""Sampling the next token for a batch of sequences, each with its own settings.

One decode step gives logits for every active sequence at once (B, V); each row belongs to a
different request with its own temperature, top_p, penalties and seed. The work is done on the
whole batch where the settings allow (one softmax, one cumulative sum) and row by row only where
they differ (penalties, logit bias). Each sequence draws its uniform numbers from its own
generator, so a seeded request gives the same text whatever else is in the batch (up to the float
rounding of batched matrix products).

Reported log probabilities are those of the model itself (a log-softmax of the raw logits), before
temperature, top_p and penalties, as OpenAI reports them.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import torch

SEED_MODULUS = 2**64  # torch.Generator takes seeds in [-2**63, 2**64)


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens (OpenAI's fields, already validated)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # top alternatives per token; None: no log probabilities
    echo_logprobs: bool = False  # also score the prompt's own tokens
    stop_token: int | None = None  # end of text: ends the sequence, not part of its text

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_p == 0.0

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class Sampled:
    """A chosen token with its log probability and, if asked, the top alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] | None = None


@dataclass
class SequenceSampler:
    """The sampling state of one sequence: its settings, its generator, its tokens so far."""

    params: SamplingParams
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device="cpu").manual_seed(seed % SEED_MODULUS)

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))


@torch.no_grad()
def sample(logits: torch.Tensor, rows: list[SequenceSampler]) -> list[Sampled]:
    """One token for each row of ``logits`` (B, V), chosen by the settings of ``rows[b]``.

    ``logits`` is changed in place (bias and penalties): pass a tensor that is not needed after.
    Rows that did not ask for log probabilities get ``logprob`` NaN and no alternatives: the
    (B, V) log-softmax is a large part of a step's sampling cost, so it is done only where asked.
    """
    logits = logits.float().contiguous()  # (an expanded view cannot be written in place)
    B = len(rows)
    scored = [b for b, r in enumerate(rows) if r.params.logprobs is not None]
    logprobs = None
    if scored:  # (s, V), the model's own distribution, before any adjustment
        logprobs = torch.log_softmax(logits if len(scored) == B else logits[scored], dim=-1)
    _adjust_(logits, rows)
    tokens = [0] * B

    greedy = [b for b, r in enumerate(rows) if r.params.greedy]
    if greedy:
        picked = (logits if len(greedy) == B else logits[greedy]).argmax(dim=-1)
        for b, t in zip(greedy, picked.tolist(), strict=True):
            tokens[b] = t
    drawn = [b for b, r in enumerate(rows) if not r.params.greedy]
    if drawn:
        device = logits.device
        temps = torch.tensor([rows[b].params.temperature for b in drawn], device=device)
        probs = torch.softmax(
            (logits if len(drawn) == B else logits[drawn]) / temps[:, None], dim=-1
        )
        u = torch.tensor([rows[b].uniform() for b in drawn], device=device)  # (b,)
        top_p = torch.tensor([rows[b].params.top_p for b in drawn], device=device)
        for b, t in zip(drawn, _draw(probs, u, top_p), strict=True):
            tokens[b] = t

    picks = [Sampled(t, math.nan) for t in tokens]
    if logprobs is not None:
        ids = torch.tensor([tokens[b] for b in scored], device=logits.device)[:, None]
        chosen = logprobs.gather(1, ids)[:, 0].tolist()
        tops = _top_alternatives(logprobs, [rows[b].params.logprobs or 0 for b in scored])
        for b, lp, top in zip(scored, chosen, tops, strict=True):
            picks[b] = Sampled(tokens[b], lp, top)
    return picks


def _adjust_(logits: torch.Tensor, rows: list[SequenceSampler]) -> None:
    """Logit bias, then OpenAI's penalties on the tokens generated so far, in place:
    ``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``."""
    vocab = logits.size(-1)
    for b, r in enumerate(rows):
        p = r.params
        if p.logit_bias:
            ids = torch.tensor([i for i, _ in p.logit_bias], device=logits.device)
            bias = torch.tensor([v for _, v in p.logit_bias], device=logits.device)
            logits[b].index_add_(0, ids, bias.to(logits.dtype))
        if p.penalised and r.generated:
            seen = torch.tensor(r.generated, device=logits.device)
            counts = torch.bincount(seen, minlength=vocab).to(logits.dtype)  # (V,)
            logits[b] -= counts * p.frequency_penalty + (counts > 0) * p.presence_penalty


def _draw(probs: torch.Tensor, u: torch.Tensor, top_p: torch.Tensor) -> list[int]:
    """Inverse-CDF sampling of one token per row of ``probs`` (b, V), given uniforms ``u`` (b,).

    Rows with ``top_p < 1`` are sorted and cut to their nucleus: the most likely tokens whose
    mass before them is below ``top_p`` (so the first token is always kept). The others skip the
    sort, which costs more than everything else in a decode step of a small model.
    """
    out = [0] * probs.size(0)
    nucleus = (top_p < 1.0).nonzero()[:, 0].tolist()
    full = (top_p >= 1.0).nonzero()[:, 0].tolist()
    if full:
        for b, t in zip(full, _inverse_cdf(probs[full], u[full]).tolist(), strict=True):
            out[b] = t
    if nucleus:
        sorted_p, order = torch.sort(probs[nucleus], dim=-1, descending=True)  # (k, V)
        mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_before >= top_p[nucleus][:, None], 0.0)
        rank = _inverse_cdf(sorted_p, u[nucleus])  # (k,) positions in sorted order
        picked = order.gather(1, rank[:, None])[:, 0].tolist()
        for b, t in zip(nucleus, picked, strict=True):
            out[b] = t
    return out


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i of each row with cdf[i-1] <= u * total < cdf[i]: never a zero-weight token."""
    cdf = torch.cumsum(weights, dim=-1)  # (b, V)
    target = (u * cdf[:, -1]).unsqueeze(1)  # (b, 1)
    idx = torch.searchsorted(cdf, target, right=True)[:, 0]
    return idx.clamp_(max=weights.size(-1) - 1)


def _top_alternatives(
    logprobs: torch.Tensor, counts: list[int]
) -> list[tuple[tuple[int, float], ...] | None]:
    """The ``counts[i]`` most likely tokens of row i of ``logprobs`` (s, V), with their scores."""
    k = max(counts)
    if k == 0:
        return [() for _ in counts]
    values, ids = torch.topk(logprobs, k, dim=-1)  # (s, k)
    return [
        tuple(zip(i[:n], v[:n], strict=True))
        for n, v, i in zip(counts, values.tolist(), ids.tolist(), strict=True)
    ]


@torch.no_grad()
def prompt_logprobs(logits: torch.Tensor, ids: list[int], k: int) -> list[Sampled | None]:
    """How likely each prompt token was given the ones before it; ``logits`` (T, V) come from
    the prefill of ``ids`` (T tokens). The first token has no context, so no score (None)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
    targets = torch.tensor(ids[1:], device=logits.device)  # (T-1,)
    chosen = logprobs[:-1].gather(1, targets[:, None])[:, 0].tolist()
    scored: list[Sampled | None] = [None]
    if k:
        values, top_ids = torch.topk(logprobs[:-1], k, dim=-1)  # (T-1, k)
        for t, lp, v, i in zip(ids[1:], chosen, values.tolist(), top_ids.tolist(), strict=True):
            scored.append(Sampled(t, lp, tuple(zip(i, v, strict=True))))
    else:
        scored.extend(Sampled(t, lp, ()) for t, lp in zip(ids[1:], chosen, strict=True))
    return scored
