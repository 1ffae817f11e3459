"""Text generation with a KV cache: prefill the prompt once, then one cheap step per token.

The API, from the lowest level to the highest:

``KVCacheEngine(model, slots, max_len)``
    Next-token logits for up to ``slots`` sequences at once, each in its own cache row ("slot").
    ``prefill(slot, ids)`` runs a prompt into a free slot and returns its last logits;
    ``prefill_batch(slots, prompts)`` does several prompts in one forward pass (left padding, an
    attention mask and per-row position ids); ``decode(slots, ids)`` appends one token to each
    listed slot and returns their next-token logits (B, V) in ONE batched forward pass, whatever
    each slot's length; ``release(slot)`` frees a slot; ``copy_slot`` forks one. This is what a
    server batches concurrent requests with: admit a request by prefilling it into a free slot,
    call ``decode`` for all active slots each step, sample each row with its request's settings
    (`gpt2.sampling.choose_token`), release slots as requests end. It has the same methods as
    `gpt2.serve.engine.DecodeEngine`.
``SamplingParams`` (`gpt2.sampling`)
    One request's settings: greedy or temperature, top-k, top-p, min-p, repetition/presence/
    frequency penalties, max_new_tokens, stop strings, end-of-text, seed, num_return_sequences,
    beam search (num_beams, length_penalty, early_stopping). ``validate()`` explains bad values.
``complete(model, prompts, params, tokenizer)``
    Whole completions (`Completion`: tokens, text, finish reason) for a batch of prompts of any
    lengths; each prompt's result equals generating it alone.
``stream(model, tokenizer, prompt, params)``
    An iterator of text pieces as they are generated; a piece never ends inside a multi-byte
    UTF-8 character, never shows a stop string, and the pieces join to ``complete``'s text.
``generate(model, idx, max_new_tokens, temperature, top_k, generator)``
    The tensor-in, tensor-out loop of nanoGPT, same signature: ``idx`` (B, T) with exactly
    ``max_new_tokens`` tokens appended per row (it never stops early), for training samples.

Rules worth knowing:

- Seeds: sequence ``i`` of a prompt draws from its own generator seeded ``seed + i``, so a prompt
  gives the same samples alone or in a batch, streamed or not. Without a seed, one is drawn from
  torch's default generator (``torch.manual_seed`` makes runs repeat).
- Past the context window (prompt + generated > block_size): when a sequence fills the context,
  its oldest tokens are dropped, keeping the newest ``window_keep`` (default block_size // 2), and
  its cache is rebuilt by one prefill of those; positions start again from 0. The model then sees
  between ``window_keep`` and block_size tokens, never more, and a rebuild costs one prefill per
  ``block_size - window_keep`` tokens. A *prompt* longer than the context is an error.
- An empty prompt starts from the end-of-text token (GPT-2's document separator).
- Stopping: end-of-text (unless ``ignore_eot``) ends a sequence and is not part of its text; so
  does the first stop string, and the text ends where it starts.
- Call ``model.eval()`` first; nothing here changes the model's mode.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from gpt2.beam_search import beam_search
from gpt2.detokenize import IncrementalText
from gpt2.errors import UserError
from gpt2.kv_cache import KVCache
from gpt2.model import GPT
from gpt2.sampling import (
    PenaltyState,
    SamplingParams,
    choose_token,
    default_seed,
    make_generator,
    mask_ids_from,
)
from gpt2.tokenizer import Tokenizer

__all__ = [
    "Completion",
    "KVCacheEngine",
    "SamplingParams",
    "complete",
    "generate",
    "stream",
]


class KVCacheEngine:
    """Next-token logits for many sequences at once, each in a slot (a row of one KV cache)."""

    def __init__(
        self,
        model: GPT,
        slots: int = 1,
        max_len: int | None = None,
        window_keep: int | None = None,
        vocab_limit: int | None = None,
    ) -> None:
        block_size = model.config.block_size
        self.model = model
        # Ids from vocab_limit on have no text (a vocabulary padded for speed, `--pad-vocab`):
        # their logits are -inf in everything this engine returns, so they are never chosen.
        self.vocab_limit = vocab_limit
        self.slots = slots
        self.context = block_size  # the most tokens a sequence's model input holds
        self.window_keep = window_keep if window_keep is not None else max(1, block_size // 2)
        if not 0 < self.window_keep < block_size:
            raise UserError(f"window_keep must be in 1..{block_size - 1}, got {self.window_keep}")
        with torch.inference_mode():  # the cache is only ever touched in inference mode
            self.cache = KVCache.for_model(model, slots, max_len or block_size)
        self.device = self.cache.device
        # The tokens in each slot's cache, kept to rebuild it when the window slides.
        self.tokens: list[list[int]] = [[] for _ in range(slots)]

    def _logits(self, idx: torch.Tensor, rows: list[int], last_only: bool = True) -> torch.Tensor:
        """The model on ``idx`` (B, T) continuing cache ``rows``: logits (B, T or 1, V).

        The pass, like every use of the cache, runs in inference mode: no autograd bookkeeping
        (version counters, view records) on the dozens of small views and in-place cache writes
        of a step, a few percent of a GPT-2 124M decode step on the CPU (bench/NOTES.md). A
        tensor made in inference mode cannot be changed outside it, so the logits come back as
        an ordinary copy (B x V floats: little next to the step).
        """
        with torch.inference_mode():
            logits, _ = self.model(idx, cache=self.cache.select(rows), last_only=last_only)
        return logits.clone()

    def prefill(self, slot: int, ids: Sequence[int], all_positions: bool = False) -> torch.Tensor:
        """Put ``ids`` in the (free) ``slot``; logits (T, V) for every position, or (1, V)."""
        self._check_prompt(ids)
        with torch.inference_mode():
            self.cache.reset(slot)
        self.tokens[slot] = list(ids)
        idx = torch.tensor([list(ids)], dtype=torch.long, device=self.device)  # (1, T)
        logits = self._logits(idx, [slot], last_only=not all_positions)
        return mask_ids_from(logits[0], self.vocab_limit)

    def prefill_batch(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Prompts of any lengths into ``slots`` in one forward pass; last logits (B, V).

        The prompts are right-aligned (left padding), so that every last token sits in the same
        column; the cache marks the padding, which attention ignores and positions skip.
        """
        if len(slots) != len(prompts):
            raise ValueError("one slot per prompt")
        for ids in prompts:
            self._check_prompt(ids)
        T = max(len(p) for p in prompts)
        idx = torch.zeros((len(prompts), T), dtype=torch.long)  # (B, T); padding id 0, masked out
        for b, (slot, ids) in enumerate(zip(slots, prompts, strict=True)):
            idx[b, T - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            self.cache.start[slot] = T - len(ids)
            self.cache.end[slot] = 0
            self.tokens[slot] = list(ids)
        logits = self._logits(idx.to(self.device), list(slots))
        return mask_ids_from(logits[:, -1, :], self.vocab_limit)

    def decode(self, slots: Sequence[int], ids: Sequence[int]) -> torch.Tensor:
        """Append ``ids[i]`` to ``slots[i]``; next-token logits (B, V), one row per slot.

        All slots go through one forward pass, except one that has filled the context: it slides
        (see the module docstring) and is rebuilt by a prefill of its own.
        """
        cache = self.cache
        batch: list[int] = []  # positions in ``slots`` that decode together
        slide: list[int] = []
        for i, (slot, token) in enumerate(zip(slots, ids, strict=True)):
            self.tokens[slot].append(token)
            if cache.length(slot) >= self.context:
                slide.append(i)
                continue
            if cache.end[slot] >= cache.max_len:
                with torch.inference_mode():
                    cache.compact(slot)  # drop its left padding to make room
                if cache.end[slot] >= cache.max_len:
                    raise ValueError(f"slot {slot} is full ({cache.max_len} positions)")
            batch.append(i)
        V = self.model.config.vocab_size
        out = torch.empty((len(slots), V), device=self.device)
        if batch:
            rows = [slots[i] for i in batch]
            idx = torch.tensor([[ids[i]] for i in batch], dtype=torch.long, device=self.device)
            logits = self._logits(idx, rows)  # (B, 1, V)
            if len(batch) == len(slots):
                return mask_ids_from(logits[:, -1, :], self.vocab_limit)
            out[batch] = mask_ids_from(logits[:, -1, :], self.vocab_limit).to(out.dtype)
        for i in slide:
            slot = slots[i]
            keep = self.tokens[slot][-self.window_keep :]
            out[i] = self.prefill(slot, keep)[-1].to(out.dtype)
        return out

    @torch.inference_mode()  # the cache is an inference tensor
    def release(self, slot: int) -> None:
        """Forget the slot's sequence; it may be prefilled again."""
        self.cache.reset(slot)
        self.tokens[slot] = []

    @torch.inference_mode()  # the cache is an inference tensor
    def copy_slot(self, src: int, dst: int) -> None:
        """Make ``dst`` continue exactly as ``src`` would (several samples of one prompt)."""
        self.cache.copy_row(src, dst)
        self.tokens[dst] = list(self.tokens[src])

    def _check_prompt(self, ids: Sequence[int]) -> None:
        if not 0 < len(ids) <= self.context:
            raise UserError(f"a prompt must have 1..{self.context} tokens, got {len(ids)}")
        if len(ids) > self.cache.max_len:
            raise ValueError(
                f"a prompt of {len(ids)} tokens does not fit {self.cache.max_len} cache positions"
            )


@dataclass
class Completion:
    """One generated sequence."""

    prompt_index: int  # which prompt it continues
    tokens: list[int]  # generated ids (a final end-of-text included if it ended so)
    text: str | None  # their text (without end-of-text or stop string); None without a tokenizer
    finish_reason: str  # "length", "eot" (end of text), or "stop" (a stop string)
    score: float | None = None  # beam search: the beam's length-penalised log-probability


@dataclass
class _Run:
    """A sequence being sampled: its slot, settings, random stream and what it produced."""

    prompt_index: int
    slot: int
    params: SamplingParams
    generator: torch.Generator
    penalties: PenaltyState | None
    text: IncrementalText | None
    logits: torch.Tensor | None = None  # (V,) the next token's logits
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def completion(self) -> Completion:
        text = self.text.text if self.text is not None else None
        return Completion(self.prompt_index, self.tokens, text, self.finish_reason or "length")


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


def _start_runs(
    model: GPT,
    prompts: list[list[int]],
    params: SamplingParams,
    tokenizer: Tokenizer | None,
    window_keep: int | None,
) -> tuple[KVCacheEngine, list[_Run]]:
    """Prefill every prompt (one batched pass) and fork it into its sequences."""
    n = params.num_return_sequences
    block_size = model.config.block_size
    T = max(len(p) for p in prompts)
    # Room for each row's left padding plus the most it will hold before the window slides.
    max_len = max(T - len(p) + min(block_size, len(p) + params.max_new_tokens) for p in prompts)
    limit = tokenizer.vocab_size if tokenizer is not None else None
    engine = KVCacheEngine(model, len(prompts) * n, max_len, window_keep, limit)
    first = [i * n for i in range(len(prompts))]
    logits = engine.prefill_batch(first, prompts)  # (P, V)
    base_seed = params.seed if params.seed is not None else default_seed()
    vocab, device = model.config.vocab_size, engine.device
    runs = []
    for i, prompt in enumerate(prompts):
        for j in range(n):
            slot = i * n + j
            if j > 0:
                engine.copy_slot(first[i], slot)
            runs.append(
                _Run(
                    prompt_index=i,
                    slot=slot,
                    params=params,
                    generator=make_generator(base_seed + j, device),
                    penalties=PenaltyState(prompt, vocab, device) if params.penalised else None,
                    text=IncrementalText(tokenizer, params.stop) if tokenizer is not None else None,
                    logits=logits[i],
                )
            )
    return engine, runs


def _decode(engine: KVCacheEngine, runs: list[_Run], eot: int | None) -> Iterator[tuple[_Run, str]]:
    """Sample every run to its end; yield (run, text piece) as text becomes safe to show."""
    for run in runs:
        if run.params.max_new_tokens == 0:
            run.finish_reason = "length"
    while active := [r for r in runs if r.finish_reason is None]:
        feed: list[_Run] = []
        for run in active:
            token = choose_token(run.logits, run.params, run.generator, run.penalties)
            run.tokens.append(token)
            if run.penalties is not None:
                run.penalties.add(token)
            piece = ""
            if token == eot and not run.params.ignore_eot:
                run.finish_reason = "eot"
            else:
                if run.text is not None:
                    piece = run.text.add(token)
                if run.text is not None and run.text.stopped:
                    run.finish_reason = "stop"
                elif len(run.tokens) >= run.params.max_new_tokens:
                    run.finish_reason = "length"
                else:
                    feed.append(run)
            if run.finish_reason is not None:
                if run.text is not None:
                    piece += run.text.finish()
                engine.release(run.slot)
            if piece:
                yield run, piece
        if feed:
            logits = engine.decode([r.slot for r in feed], [r.tokens[-1] for r in feed])  # (B, V)
            for run, row in zip(feed, logits, strict=True):
                run.logits = row


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
    engine, runs = _start_runs(model, ids, params, tokenizer, window_keep)
    for _ in _decode(engine, runs, eot):
        pass
    return [r.completion() for r in runs]


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
                decoder = IncrementalText(tokenizer, params.stop)
                for t in body:
                    decoder.add(t)
                decoder.finish()
                text = decoder.text
                reason = "stop" if decoder.stopped else reason
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
    ids = _prompt_ids(model, [prompt], tokenizer, tokenizer.eot_token)
    engine, runs = _start_runs(model, ids, params, tokenizer, window_keep)
    return (piece for _, piece in _decode(engine, runs, tokenizer.eot_token))


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
        engine, runs = _start_runs(model, prompts, params, None, None)
        for b, run in enumerate(runs):
            run.generator = make_generator(seed + b, engine.device)  # row b: seed + b
        for _ in _decode(engine, runs, None):
            pass
        rows = [r.tokens for r in runs]
    new = torch.tensor(rows, dtype=torch.long, device=idx.device).view(idx.size(0), -1)
    return torch.cat((idx, new), dim=1)
