"""The decode loop: sequences in the slots of a KV cache, one batched forward pass per token.

``KVCacheEngine(model, slots, max_len)``
    Next-token logits for up to ``slots`` sequences at once, each in its own cache row ("slot").
    ``prefill(slot, ids)`` runs a prompt into a free slot and returns its last logits;
    ``prefill_batch(slots, prompts)`` does several prompts in one forward pass (left padding, an
    attention mask and per-row position ids); ``decode(slots, ids)`` appends one token to each
    listed slot and returns their next-token logits (B, V) in ONE batched forward pass, whatever
    each slot's length; ``release(slot)`` frees a slot; ``copy_slot`` forks one.
``Decoder(engine, eot)``
    The loop every caller shares (`gpt2.generate`, ``gpt2 sample``, the samples printed during
    training, the server's scheduler): ``admit`` prefills new `DecodeSequence` s into free slots
    and samples their first tokens; ``step`` runs one decode step for every active sequence and
    samples each row by its own settings (`gpt2.sampling.sample`); each returns what happened as
    `Step` s (token, released text, finish reason). Sequences may be admitted between any two
    steps, which is what the server's continuous batching does.

Rules worth knowing:

- Past the context window (prompt + generated > block_size): when a sequence fills the context,
  its oldest tokens are dropped, keeping the newest ``window_keep`` (default block_size // 2), and
  its cache is rebuilt by one prefill of those; positions start again from 0. The model then sees
  between ``window_keep`` and block_size tokens, never more, and a rebuild costs one prefill per
  ``block_size - window_keep`` tokens. A *prompt* longer than the context is an error.
- Stopping: end-of-text (unless ``ignore_eot``) ends a sequence and is not part of its text
  (finish reason "eot"); so does the first stop string ("stop"), and the text ends where it
  starts; otherwise ``max_new_tokens`` ("length").
- Call ``model.eval()`` first; nothing here changes the model's mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpt2.detokenize import IncrementalText, Piece
from gpt2.errors import UserError
from gpt2.kv_cache import KVCache
from gpt2.model import GPT
from gpt2.sampling import Sampled, Sampler, mask_ids_from, prompt_logprobs, sample


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
        # A model prepared with the native kernels decodes each step in one call (prefills
        # still run its forward).
        step = getattr(model, "native_step", None)
        self.native_step = step if step is not None and step.supports(self.cache) else None
        # The tokens in each slot's cache, kept to rebuild it when the window slides.
        self.tokens: list[list[int]] = [[] for _ in range(slots)]

    def _logits(self, idx: torch.Tensor, rows: list[int], last_only: bool = True) -> torch.Tensor:
        """The model on ``idx`` (B, T) continuing cache ``rows``: logits (B, T or 1, V).

        The pass, like every use of the cache, runs in inference mode: no autograd bookkeeping
        (version counters, view records) on the dozens of small views and in-place cache writes
        of a step, a few percent of a GPT-2 124M decode step on the CPU (bench/NOTES.md). A
        tensor made in inference mode cannot be changed outside it, so the logits come back as
        an ordinary copy (B x V floats: little next to the step), in float32 whatever the
        model's dtype: the sampler's softmax, penalties and log probabilities work in it.
        """
        with torch.inference_mode():
            logits, _ = self.model(idx, cache=self.cache.select(rows), last_only=last_only)
        return logits.to(torch.float32, copy=True)

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
            if self.native_step is not None:
                last = self.native_step(cache, rows, [ids[i] for i in batch])  # (B, V)
            else:
                idx = torch.tensor([[ids[i]] for i in batch], dtype=torch.long, device=self.device)
                last = self._logits(idx, rows)[:, -1, :]  # (B, V)
            if len(batch) == len(slots):
                return mask_ids_from(last, self.vocab_limit)
            out[batch] = mask_ids_from(last, self.vocab_limit).to(out.dtype)
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


class DecodeSequence:
    """One sequence to decode: its prompt, its sampler, its text (with a tokenizer)."""

    def __init__(
        self,
        sampler: Sampler,
        text: IncrementalText | None = None,
        score_prompt: bool = False,  # also score the prompt's own tokens (echo with logprobs)
    ) -> None:
        self.sampler = sampler
        self.prompt = sampler.prompt
        self.params = sampler.params
        self.text = text
        self.score_prompt = score_prompt
        self.slot: int | None = None
        self.finish_reason: str | None = None

    @property
    def tokens(self) -> list[int]:
        return self.sampler.generated


@dataclass(frozen=True)
class Step:
    """What one sequence did: a token (with the text it released), its end, or prompt scores."""

    seq: DecodeSequence
    token: Sampled | None = None
    piece: Piece | None = None
    finish: str | None = None  # "eot", "stop" or "length": the sequence is over
    prompt_scores: list[Sampled | None] | None = None


class Decoder:
    """Sequences in the slots of a `KVCacheEngine`, decoded together one token per step."""

    def __init__(self, engine: KVCacheEngine, eot: int | None) -> None:
        self.engine = engine
        self.eot = eot
        self.active: list[DecodeSequence] = []
        self.free = list(range(engine.slots - 1, -1, -1))  # popped from the end: slot 0 first

    def admit(self, seqs: Sequence[DecodeSequence]) -> list[Step]:
        """Prefill ``seqs`` (at most one free slot each) and sample their first tokens.

        Prompts go through one batched prefill; sequences with the same prompt share it (their
        slots are copies), except one that scores its prompt, which needs every position."""
        if len(seqs) > len(self.free):
            raise ValueError(f"{len(seqs)} sequences for {len(self.free)} free slots")
        steps: list[Step] = []
        first: dict[tuple[int, ...], DecodeSequence] = {}
        copies: list[tuple[DecodeSequence, DecodeSequence]] = []
        for seq in seqs:
            if seq.params.max_new_tokens == 0 and not seq.score_prompt:
                seq.finish_reason = "length"
                steps.append(Step(seq, finish="length"))
                continue
            seq.slot = self.free.pop()
            self.active.append(seq)
            if seq.score_prompt:
                steps += self._prefill_scored(seq)
            elif (key := tuple(seq.prompt)) in first:
                copies.append((first[key], seq))
            else:
                first[key] = seq
        if not first:
            return steps
        leaders = list(first.values())
        logits = self.engine.prefill_batch([s.slot for s in leaders], [s.prompt for s in leaders])
        row = {id(s): i for i, s in enumerate(leaders)}  # each prompt's row of ``logits``
        for src, dst in copies:
            self.engine.copy_slot(src.slot, dst.slot)
        if copies:
            logits = logits[list(range(len(leaders))) + [row[id(src)] for src, _ in copies]]
        return steps + self._accept(leaders + [dst for _, dst in copies], logits)

    def _prefill_scored(self, seq: DecodeSequence) -> list[Step]:
        logits = self.engine.prefill(seq.slot, seq.prompt, all_positions=True)  # (T, V)
        scores = prompt_logprobs(logits, seq.prompt, seq.params.logprobs or 0)
        if seq.params.max_new_tokens == 0:
            self.drop(seq)
            seq.finish_reason = "length"
            return [Step(seq, prompt_scores=scores, finish="length")]
        return [Step(seq, prompt_scores=scores), *self._accept([seq], logits[-1:])]

    def step(self) -> list[Step]:
        """One decode step for every active sequence."""
        batch = list(self.active)
        if not batch:
            return []
        logits = self.engine.decode([s.slot for s in batch], [s.tokens[-1] for s in batch])
        return self._accept(batch, logits)

    def drop(self, seq: DecodeSequence) -> None:
        """Stop decoding ``seq`` and give its slot back (nothing if it holds none)."""
        if seq.slot is not None:
            self.engine.release(seq.slot)
            self.free.append(seq.slot)
            seq.slot = None
        if seq in self.active:
            self.active.remove(seq)

    def _accept(self, batch: list[DecodeSequence], logits: torch.Tensor) -> list[Step]:
        """Sample each sequence's next token from its row of ``logits`` (B, V); end those done."""
        steps = []
        for seq, pick in zip(batch, sample(logits, [s.sampler for s in batch]), strict=True):
            p, text, piece, finish = seq.params, seq.text, None, None
            if pick.token == self.eot and not p.ignore_eot:
                finish = "eot"
            elif text is not None and (piece := text.add(pick.token, pick)).stopped:
                finish = "stop"
            elif len(seq.tokens) >= p.max_new_tokens:
                finish = "length"
            if finish is not None:
                if text is not None:
                    rest = text.finish()
                    piece = rest if piece is None else piece + rest
                    finish = "stop" if text.stopped else finish
                seq.finish_reason = finish
                self.drop(seq)
            steps.append(Step(seq, pick, piece, finish))
        return steps
