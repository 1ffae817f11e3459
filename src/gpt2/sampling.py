"""How the next token is chosen from the model's logits, for a batch of sequences at once.

`SamplingParams` holds one sequence's settings: those of the library and the command line and
those of OpenAI's API are one set. `sample` takes the logits of a decode step (B, V), one row per
sequence, each row with its own `Sampler` (settings, random stream, tokens so far), and applies, in
the order Hugging Face's ``generate`` uses:

1. logit bias, then penalties on the raw logits: the CTRL repetition penalty (Keskar et al. 2019:
   a logit of a token already in the prompt or the output is divided by the penalty if positive,
   multiplied if negative), then OpenAI's presence and frequency penalties (subtract ``presence``
   once and ``frequency`` per occurrence, for tokens generated so far, not the prompt's);
2. greedy (temperature 0): the most likely token;
3. otherwise temperature, then top-k, top-p (nucleus, Holtzman et al. 2019: the fewest most likely
   tokens whose probabilities sum to at least ``top_p``), then min-p (tokens at least ``min_p``
   times as likely as the most likely one), then one draw: the inverse of the kept tokens'
   cumulative distribution at a uniform number from the sequence's own generator.

One uniform per row and step from the row's own generator makes a seeded sequence give the same
tokens alone or in any batch (up to the float rounding of batched products), and the same in the
library, the command line and the server. Reported log probabilities are the model's own (a
log-softmax of the raw logits), before bias, penalties and temperature, as OpenAI reports them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpt2.errors import UserError

SEED_MODULUS = 2**64  # torch.Generator takes seeds in [-2**63, 2**64)


@dataclass(frozen=True)
class SamplingParams:
    """Everything that decides one sequence's tokens. Defaults: plain sampling, 128 tokens."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None  # None or 0: no top-k
    top_p: float = 1.0  # 1: no nucleus cut
    min_p: float = 0.0  # 0: no min-p cut
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages repeats (CTRL rule)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # top alternatives reported per token; None: no log probabilities
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one found
    ignore_eot: bool = False  # keep going past the end-of-text token
    seed: int | None = None  # None: drawn from torch's default generator
    num_return_sequences: int = 1  # sequence j of a prompt samples with seed + j
    num_beams: int = 1  # > 1: beam search (deterministic; temperature etc. are not used)
    length_penalty: float = 1.0  # beam search: a finished beam scores logprob / length**this
    early_stopping: bool = False  # beam search: stop once num_beams beams have finished

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "logit_bias", tuple(self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def validate(self) -> SamplingParams:
        """Raise `UserError` naming the first setting out of range; return self."""

        def bad(name: str, rule: str) -> UserError:
            return UserError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        def number(name: str) -> float:
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise bad(name, "a finite number")
            return float(value)

        def integer(name: str, low: int | None) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, "an integer")
            if low is not None and value < low:
                raise bad(name, f"an integer >= {low}")

        integer("max_new_tokens", 0)
        if number("temperature") < 0:
            raise bad("temperature", "0 (greedy) or positive")
        if self.top_k is not None:
            integer("top_k", 0)
        if not 0.0 < number("top_p") <= 1.0:
            raise bad("top_p", "in (0, 1]")
        if not 0.0 <= number("min_p") <= 1.0:
            raise bad("min_p", "in [0, 1]")
        if number("repetition_penalty") <= 0:
            raise bad("repetition_penalty", "positive (1 is off)")
        number("presence_penalty")
        number("frequency_penalty")
        if self.logprobs is not None:
            integer("logprobs", 0)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UserError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        if self.seed is not None:
            integer("seed", None)
        integer("num_return_sequences", 1)
        integer("num_beams", 1)
        number("length_penalty")
        if self.num_beams > 1:
            if self.num_return_sequences > self.num_beams:
                raise UserError(
                    f"num_return_sequences ({self.num_return_sequences}) must not exceed num_beams ({self.num_beams})"
                )
            if self.penalised or self.logit_bias:
                raise UserError("penalties are not supported with beam search (num_beams > 1)")
        return self


def default_seed() -> int:
    """A seed taken from torch's default generator: ``torch.manual_seed`` makes runs repeat."""
    return int(torch.randint(0, 2**62, (1,)).item())


@dataclass(frozen=True)
class Sampled:
    """A chosen token with its log probability (NaN unless asked) and the top alternatives."""

    token: int
    logprob: float = math.nan
    top: tuple[tuple[int, float], ...] | None = None


class Sampler:
    """The sampling state of one sequence: its settings, its random stream, its tokens so far."""

    def __init__(self, params: SamplingParams, prompt: Sequence[int], seed: int) -> None:
        self.params = params
        self.prompt = list(prompt)
        self.generated: list[int] = []
        self.generator = torch.Generator(device="cpu").manual_seed(seed % SEED_MODULUS)
        self._seen: torch.Tensor | None = None  # (V,) bool: in the prompt or the output
        self._counts: torch.Tensor | None = None  # (V,) occurrences in the output

    def add(self, token: int) -> None:
        self.generated.append(token)
        if self._counts is not None:
            self._seen[token] = True
            self._counts[token] += 1

    def adjust_(self, logits: torch.Tensor) -> None:
        """Logit bias and penalties on this sequence's row of logits (V,), in place."""
        p = self.params
        if p.logit_bias:
            ids = torch.tensor([i for i, _ in p.logit_bias], device=logits.device)
            bias = torch.tensor([v for _, v in p.logit_bias], device=logits.device)
            logits.index_add_(0, ids, bias.to(logits.dtype))
        if not p.penalised:
            return
        if self._counts is None:  # built once, then kept up to date by `add`
            self._seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
            self._seen[torch.tensor(self.prompt + self.generated, dtype=torch.long)] = True
            ids = torch.tensor(self.generated, dtype=torch.long, device=logits.device)
            self._counts = torch.bincount(ids, minlength=logits.numel()).to(logits.dtype)
        r = p.repetition_penalty
        if r != 1.0:
            logits.copy_(
                torch.where(self._seen, torch.where(logits > 0, logits / r, logits * r), logits)
            )
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            counts = self._counts
            logits -= counts * p.frequency_penalty + (counts > 0) * p.presence_penalty


@torch.no_grad()
def sample(logits: torch.Tensor, rows: Sequence[Sampler]) -> list[Sampled]:
    """One token for each row of ``logits`` (B, V) by the settings of ``rows[b]``, added to it.

    ``logits`` may be changed in place (bias and penalties): pass a tensor not needed after. The
    (B, V) log-softmax costs as much as the rest of a small model's sampling, so it is done only
    for rows that asked for log probabilities.
    """
    logits = logits.float()
    B = len(rows)
    scored = [b for b, r in enumerate(rows) if r.params.logprobs is not None]
    logprobs = None
    if scored:  # (s, V), the model's own distribution, before any adjustment
        logprobs = torch.log_softmax(logits if len(scored) == B else logits[scored], dim=-1)
    for b, r in enumerate(rows):
        if r.params.logit_bias or r.params.penalised:
            r.adjust_(logits[b])
    tokens = [0] * B
    greedy = [b for b, r in enumerate(rows) if r.params.greedy]
    if greedy:
        picked = (logits if len(greedy) == B else logits[greedy]).argmax(dim=-1)
        for b, t in zip(greedy, picked.tolist(), strict=True):
            tokens[b] = t
    drawn = [b for b, r in enumerate(rows) if not r.params.greedy]
    if drawn:
        weights = kept_probs(
            logits if len(drawn) == B else logits[drawn], [rows[b].params for b in drawn]
        )
        u = torch.tensor([float(torch.rand((), generator=rows[b].generator)) for b in drawn])
        for b, t in zip(drawn, inverse_cdf(weights, u.to(weights.device)).tolist(), strict=True):
            tokens[b] = t
    picks = [Sampled(t) for t in tokens]
    if logprobs is not None:
        ids = torch.tensor([tokens[b] for b in scored], device=logits.device)[:, None]
        chosen = logprobs.gather(1, ids)[:, 0].tolist()
        tops = _top_alternatives(logprobs, [rows[b].params.logprobs or 0 for b in scored])
        for b, lp, top in zip(scored, chosen, tops, strict=True):
            picks[b] = Sampled(tokens[b], lp, top)
    for r, t in zip(rows, tokens, strict=True):
        r.add(t)
    return picks


def kept_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on rows of ``logits`` (b, V), each by its own
    settings: the probabilities (b, V), 0 for the tokens cut (the rest not renormalised)."""
    V = logits.size(-1)
    device = logits.device
    temps = {p.temperature for p in params}
    if len(temps) == 1:  # the usual case (one sequence, or one request's): no (b,) tensors
        logits = logits / temps.pop()
    else:
        logits = logits / torch.tensor([p.temperature for p in params], device=device)[:, None]
    ks = [p.top_k if p.top_k and p.top_k < V else V for p in params]
    if min(ks) < V:
        values = torch.topk(logits, max(k for k in ks if k < V), dim=-1).values  # (b, kmax)
        if len(set(ks)) == 1:
            kth = values[:, -1:]
        else:
            at = torch.tensor([[min(k, values.size(1)) - 1] for k in ks], device=device)
            kth = values.gather(1, at)
            kth[torch.tensor([k == V for k in ks], device=device)] = float("-inf")
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    nucleus = [b for b, p in enumerate(params) if p.top_p < 1.0]
    if nucleus:
        top_p = torch.tensor([params[b].top_p for b in nucleus], device=device)[:, None]
        sorted_p, order = torch.sort(probs[nucleus], dim=-1, descending=True)  # (k, V)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # never the first token
        probs[nucleus] = torch.zeros_like(sorted_p).scatter_(1, order, sorted_p)
    cut = [b for b, p in enumerate(params) if p.min_p > 0.0]
    if cut:
        min_p = torch.tensor([params[b].min_p for b in cut], device=device)[:, None]
        rows = probs[cut]
        probs[cut] = rows.masked_fill(rows < min_p * rows.max(dim=-1, keepdim=True).values, 0.0)
    return probs


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i of each row of ``weights`` (b, V) with cdf[i-1] <= u * total < cdf[i], for
    uniforms ``u`` (b,): never a zero-weight token."""
    cdf = torch.cumsum(weights, dim=-1)  # (b, V)
    target = (u * cdf[:, -1]).unsqueeze(1)  # (b, 1)
    idx = torch.searchsorted(cdf, target, right=True)[:, 0]
    return idx.clamp_(max=weights.size(-1) - 1)


def _top_alternatives(
    logprobs: torch.Tensor, counts: list[int]
) -> list[tuple[tuple[int, float], ...]]:
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
    tops = _top_alternatives(logprobs[:-1], [k] * (len(ids) - 1)) if len(ids) > 1 else []
    scored: list[Sampled | None] = [None]
    scored.extend(Sampled(t, lp, top) for t, lp, top in zip(ids[1:], chosen, tops, strict=True))
    return scored


def mask_ids_from(logits: torch.Tensor, limit: int | None) -> torch.Tensor:
    """``logits`` (..., V) with every id from ``limit`` on set to -inf, in place, so that it is
    never chosen: the ids a vocabulary padded for speed (`--pad-vocab`) has past its tokenizer's,
    which have no text. ``limit`` None or >= V changes nothing."""
    if limit is not None and limit < logits.size(-1):
        logits[..., limit:] = float("-inf")
    return logits
