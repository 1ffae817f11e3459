"""Text generation with a KV cache: prefill the prompt once, then one cheap step per token.

The library's API, over the decode loop of `gpt2.decode` (which the command line and the server
use too):

``SamplingParams`` (`gpt2.sampling`)
    One request's settings: greedy or temperature, top-k, top-p, min-p, repetition/presence/
    frequency penalties, logit bias, log probabilities, max_new_tokens, stop strings,
    end-of-text, seed, num_return_sequences, beam search (num_beams, length_penalty,
    early_stopping). ``validate()`` explains bad values.
``complete(model, prompts, params, tokenizer)``
    Whole completions (`Completion`: tokens, text, finish reason) for a batch of prompts of any
    lengths; each prompt's result equals generating it alone.
``stream(model, tokenizer, prompt, params)``
    An iterator of text pieces as they are generated; a piece never ends inside a multi-byte
    UTF-8 character, never shows a stop string, and the pieces join to ``complete``'s text.
``generate(model, idx, max_new_tokens, temperature, top_k, generator)``
    The tensor-in, tensor-out loop of nanoGPT, same signature: ``idx`` (B, T) with exactly
    ``max_new_tokens`` tokens appended per row (it never stops early).

Rules worth knowing (the rest are `gpt2.decode`'s):

- Seeds: sequence ``j`` of a prompt draws from its own generator seeded ``seed + j``, so a prompt
  gives the same samples alone or in a batch, streamed or not, here, from ``gpt2 sample`` and from
  the server. Without a seed, one is drawn from torch's default generator (``torch.manual_seed``
  makes runs repeat).
- An empty prompt starts from the end-of-text token (GPT-2's document separator).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from gpt2.beam_search import beam_search
from gpt2.decode import Decoder, DecodeSequence, KVCacheEngine, Step
from gpt2.detokenize import IncrementalText
from gpt2.errors import UserError
from gpt2.model import GPT
from gpt2.sampling import Sampler, SamplingParams, default_seed
from gpt2.tokenizer import Tokenizer

__all__ = [
    "Completion",
    "KVCacheEngine",
    "SamplingParams",
    "complete",
    "generate",
    "stream",
]


@dataclass
class Completion:
    """One generated sequence."""

    prompt_index: int  # which prompt it continues
    tokens: list[int]  # generated ids (a final end-of-text included if it ended so)
    text: str | None  # their text (without end-of-text or stop string); None without a tokenizer
    finish_reason: str  # "length", "eot" (end of text), or "stop" (a stop string)
    score: float | None = None  # beam search: the beam's length-penalised log-probability


def _check_params(params: SamplingParams, tokenizer: Tokenizer | None) -> None:
    params.validate()
    if params.stop and tokenizer is None:
        raise UserError("stop strings need a tokenizer to read the generated text")


def _prompt_ids(
    model: GPT,
    prompts: Sequence[str | Sequence[int]] | str,
    tokenizer: Tokenizer | None,
    eot: int | None,
) -> list[list[int]]:
    """Token ids of each prompt: text is encoded, an empty prompt becomes end-of-text."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]  # one prompt given bare
    if not prompts:
        raise UserError("no prompts given")
    result = []
    block_size = model.config.block_size
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise UserError("a text prompt needs a tokenizer")
            ids = tokenizer.encode(p) if p else []
        else:
            ids = [int(t) for t in p]
        if not ids:
            if eot is None:
                raise UserError(
                    "the prompt is empty and this vocabulary has no end-of-text token to start from"
                )
            ids = [eot]
        if len(ids) > block_size:
            raise UserError(
                f"prompt {i} has {len(ids)} tokens; the model's context holds {block_size}"
            )
        vocab = model.config.vocab_size
        if not all(0 <= t < vocab for t in ids):
            raise UserError(f"prompt {i} has token ids outside the vocabulary (0..{vocab - 1})")
        result.append(ids)
    return result


def _decoder(
    model: GPT,
    prompts: list[list[int]],
    params: SamplingParams,
    tokenizer: Tokenizer | None,
    eot: int | None,
    window_keep: int | None,
    seeds: list[list[int]],
) -> tuple[Decoder, list[DecodeSequence]]:
    """A decoder sized for ``prompts``, and one sequence per seed of ``seeds[i]`` for prompt i."""
    block_size = model.config.block_size
    T = max(len(p) for p in prompts)
    # Room for each row's left padding plus the most it will hold before the window slides.
    max_len = max(T - len(p) + min(block_size, len(p) + params.max_new_tokens) for p in prompts)
    limit = tokenizer.vocab_size if tokenizer is not None else None
    n = sum(len(s) for s in seeds)
    engine = KVCacheEngine(model, n, max_len, window_keep, limit)
    seqs = [
        DecodeSequence(
            Sampler(params, prompt, seed),
            IncrementalText(tokenizer, params.stop) if tokenizer is not None else None,
        )
        for prompt, row in zip(prompts, seeds, strict=True)
        for seed in row
    ]
    return Decoder(engine, eot), seqs


def _run(decoder: Decoder, steps: list[Step]) -> Iterator[str]:
    """Decode the admitted sequences to their ends (``steps``: what admitting them did); the
    text each step releases."""
    while True:
        for step in steps:
            if step.piece is not None and step.piece.text:
                yield step.piece.text
        if not decoder.active:
            return
        steps = decoder.step()


def _seeds(params: SamplingParams, prompts: int) -> list[list[int]]:
    base = params.seed if params.seed is not None else default_seed()
    return [[base + j for j in range(params.num_return_sequences)] for _ in range(prompts)]


def complete(
    model: GPT,
    prompts: Sequence[str | Sequence[int]] | str,
    params: SamplingParams | None = None,
    tokenizer: Tokenizer | None = None,
    *,
    eot_token: int | None = None,
    window_keep: int | None = None,
) -> list[Completion]:
    """Completions for each prompt (text or token ids), ``num_return_sequences`` per prompt,
    in prompt order. ``eot_token`` defaults to the tokenizer's end-of-text id."""
    params = params or SamplingParams()
    _check_params(params, tokenizer)
    eot = eot_token if eot_token is not None else (tokenizer.eot_token if tokenizer else None)
    ids = _prompt_ids(model, prompts, tokenizer, eot)
    if params.num_beams > 1:
        return _complete_beams(model, ids, params, tokenizer, eot)
    decoder, seqs = _decoder(
        model, ids, params, tokenizer, eot, window_keep, _seeds(params, len(ids))
    )
    for _ in _run(decoder, decoder.admit(seqs)):
        pass
    n = params.num_return_sequences
    return [
        Completion(k // n, s.tokens, s.text.text if s.text else None, s.finish_reason or "length")
        for k, s in enumerate(seqs)
    ]


def _complete_beams(
    model: GPT,
    prompts: list[list[int]],
    params: SamplingParams,
    tokenizer: Tokenizer | None,
    eot: int | None,
) -> list[Completion]:
    """Beam search, one prompt at a time; the best ``num_return_sequences`` beams of each."""
    out = []
    for i, prompt in enumerate(prompts):
        beams = beam_search(
            model,
            prompt,
            params.max_new_tokens,
            params.num_beams,
            params.length_penalty,
            params.early_stopping,
            None if params.ignore_eot else eot,
            tokenizer.vocab_size if tokenizer is not None else None,
        )
        for beam in beams[: params.num_return_sequences]:
            ended = bool(beam.tokens) and beam.tokens[-1] == eot and not params.ignore_eot
            body = beam.tokens[:-1] if ended else beam.tokens
            text, reason = None, "eot" if ended else "length"
            if tokenizer is not None:
                detok = IncrementalText(tokenizer, params.stop)
                for t in body:
                    detok.add(t)
                detok.finish()
                text = detok.text
                reason = "stop" if detok.stopped else reason
            out.append(Completion(i, beam.tokens, text, reason, beam.score))
    return out


def stream(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    params: SamplingParams | None = None,
    *,
    window_keep: int | None = None,
) -> Iterator[str]:
    """Text pieces of one completion as they are generated (see the module docstring).

    Settings and prompt are checked, and the prompt prefilled, before this returns."""
    params = params or SamplingParams()
    _check_params(params, tokenizer)
    if params.num_beams > 1 or params.num_return_sequences > 1:
        raise UserError("streaming gives one sequence: use num_beams=1 and num_return_sequences=1")
    eot = tokenizer.eot_token
    ids = _prompt_ids(model, [prompt], tokenizer, eot)
    decoder, seqs = _decoder(model, ids, params, tokenizer, eot, window_keep, _seeds(params, 1))
    return _run(decoder, decoder.admit(seqs))  # prefilled now: a failure shows here


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    **options: object,
) -> torch.Tensor:
    """Append ``max_new_tokens`` tokens to each row of ``idx`` (B, T); returns (B, T + new).

    ``temperature`` 0 is greedy. Row ``b`` samples with seed ``s + b``, ``s`` drawn from
    ``generator`` (or torch's default one). Further `SamplingParams` fields may be given by name
    (``top_p=0.9``, ``repetition_penalty=1.3``, ``num_beams=4``...); end-of-text does not stop a
    row here, so that every row has the same length.
    """
    if idx.dim() != 2 or idx.size(0) == 0:
        raise UserError(f"idx must be a (B, T) tensor of token ids, got shape {tuple(idx.shape)}")
    device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        ignore_eot=True,
        **options,  # type: ignore[arg-type]
    ).validate()
    if params.num_return_sequences != 1:
        raise UserError("generate() returns one sequence per row: repeat rows of idx instead")
    if params.stop:
        raise UserError(
            "generate() reads no text: use complete() with a tokenizer for stop strings"
        )
    prompts = _prompt_ids(model, idx.tolist(), None, None)
    if params.num_beams > 1:
        rows = [c.tokens for c in _complete_beams(model, prompts, params, None, None)]
    else:
        seeds = [[seed + b] for b in range(len(prompts))]  # row b: seed + b
        decoder, seqs = _decoder(model, prompts, params, None, None, None, seeds)
        for _ in _run(decoder, decoder.admit(seqs)):
            pass
        rows = [s.tokens for s in seqs]
    new = torch.tensor(rows, dtype=torch.long, device=idx.device).view(idx.size(0), -1)
    return torch.cat((idx, new), dim=1)
