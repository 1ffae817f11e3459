"""How the next token is chosen from the model's logits: the decoding settings and their rules.

`SamplingParams` holds one request's settings. `choose_token` applies them to one row of logits, in
this order, the order Hugging Face's ``generate`` uses:

1. penalties on the raw logits: the CTRL repetition penalty (Keskar et al. 2019: a logit of a token
   already in the prompt or the output is divided by the penalty if positive, multiplied if
   negative), then OpenAI's presence and frequency penalties (subtract ``presence`` once and
   ``frequency`` per occurrence, for tokens generated so far, not the prompt's);
2. greedy (temperature 0): the most likely token;
3. otherwise temperature, then top-k, top-p (nucleus, Holtzman et al. 2019: the fewest most likely
   tokens whose probabilities sum to at least ``top_p``), then min-p (tokens at least ``min_p``
   times as likely as the most likely one), then one draw from the sequence's own generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpt2.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    """Everything that decides one request's tokens. Defaults: plain sampling, 128 tokens."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None  # None or 0: no top-k
    top_p: float = 1.0  # 1: no nucleus cut
    min_p: float = 0.0  # 0: no min-p cut
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages repeats (CTRL rule)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one found
    ignore_eot: bool = False  # keep going past the end-of-text token
    seed: int | None = None  # None: drawn from torch's default generator
    num_return_sequences: int = 1
    num_beams: int = 1  # > 1: beam search (deterministic; temperature etc. are not used)
    length_penalty: float = 1.0  # beam search: a finished beam scores logprob / length**this
    early_stopping: bool = False  # beam search: stop once num_beams beams have finished

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a single stop string given bare
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))

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

        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
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
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UserError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        if self.seed is not None:
            integer("seed", 0)
        integer("num_return_sequences", 1)
        integer("num_beams", 1)
        number("length_penalty")
        if self.num_beams > 1:
            if self.num_return_sequences > self.num_beams:
                raise UserError(
                    f"num_return_sequences ({self.num_return_sequences}) must not exceed num_beams ({self.num_beams})"
                )
            if self.penalised:
                raise UserError("penalties are not supported with beam search (num_beams > 1)")
        return self


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator of its own for one sequence, so that its draws do not depend on the others."""
    return torch.Generator(device=device).manual_seed(seed)


def default_seed() -> int:
    """A seed taken from torch's default generator: ``torch.manual_seed`` makes runs repeat."""
    return int(torch.randint(0, 2**62, (1,)).item())


class PenaltyState:
    """Which tokens a sequence has seen (prompt and output) and how often it generated each."""

    def __init__(self, prompt: list[int], vocab_size: int, device: torch.device | str) -> None:
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # (V,)
        self.seen[torch.tensor(prompt, dtype=torch.long, device=device)] = True
        self.counts = torch.zeros(vocab_size, device=device)  # (V,) generated occurrences

    def add(self, token: int) -> None:
        self.seen[token] = True
        self.counts[token] += 1


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, state: PenaltyState
) -> torch.Tensor:
    """The penalised logits (V,) of one sequence (a new tensor)."""
    p = params.repetition_penalty
    if p != 1.0:
        penalised = torch.where(logits > 0, logits / p, logits * p)
        logits = torch.where(state.seen, penalised, logits)
    if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
        logits = (
            logits
            - params.presence_penalty * (state.counts > 0).to(logits.dtype)
            - params.frequency_penalty * state.counts
        )
    return logits


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on one row (V,); removed tokens get -inf."""
    logits = logits / params.temperature
    V = logits.size(-1)
    if params.top_k and params.top_k < V:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
        cut = before >= params.top_p  # already enough without this token (never the first)
        logits = logits.scatter(0, order, sorted_logits.masked_fill(cut, float("-inf")))
    if params.min_p > 0.0:
        probs = F.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def mask_ids_from(logits: torch.Tensor, limit: int | None) -> torch.Tensor:
    """``logits`` (..., V) with every id from ``limit`` on set to -inf, in place, so that it is
    never chosen: the ids a vocabulary padded for speed (`--pad-vocab`) has past its tokenizer's,
    which have no text. ``limit`` None or >= V changes nothing."""
    if limit is not None and limit < logits.size(-1):
        logits[..., limit:] = float("-inf")
    return logits


def choose_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    penalties: PenaltyState | None = None,
) -> int:
    """The next token for one sequence from its logits (V,)."""
    logits = logits.float()
    if penalties is not None:
        logits = apply_penalties(logits, params, penalties)
    if params.greedy:
        return int(torch.argmax(logits))
    probs = F.softmax(warp(logits, params), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
