"""The worker thread that decodes every active request together (continuous batching).

Requests arrive on the event loop; model work happens here, on one thread, so the loop never
blocks. Each loop of the worker:

1. admits waiting sequences into free slots, prefilling each prompt and sampling its first token;
2. drops sequences whose client went away (or that hit a stop string), freeing their slots;
3. runs ONE decode step for all active sequences at once: a (B, V) batch of logits, sampled row
   by row with each request's own settings.

A sequence joins the batch at the next step after it arrives and leaves it as soon as it ends, so
a long request never holds short ones back. Tokens go back to the event loop through
``loop.call_soon_threadsafe`` onto the request's asyncio queue. Waiting sequences are bounded
(``max_queue``); past that, `submit` raises `QueueFull` and the server answers 429.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass

from gpt2.serve.engine import DecodeEngine
from gpt2.serve.sampling import (
    Sampled,
    SamplingParams,
    SequenceSampler,
    prompt_logprobs,
    sample,
)

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More sequences are waiting than the server accepts."""


@dataclass(frozen=True)
class Event:
    """What the worker tells the event loop about sequence ``index`` of a request."""

    index: int
    token: Sampled | None = None
    finish: str | None = None  # "length" or "stop" (end of text): no more events follow
    prompt: list[Sampled | None] | None = None  # the prompt's scores (echo with logprobs)
    error: str | None = None  # the model failed on this sequence: no more events follow


class Sequence:
    """One choice being generated. The worker owns its state; the loop reads its events."""

    def __init__(
        self,
        index: int,
        prompt: list[int],
        params: SamplingParams,
        events: asyncio.Queue[Event],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.index = index
        self.prompt = prompt
        self.params = params
        self.sampler = SequenceSampler(params)
        self.cancelled = False  # set from the loop; read by the worker between steps
        self.slot: int | None = None
        self._events = events
        self._loop = loop

    def emit(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True


@dataclass(frozen=True)
class Stats:
    active: int
    waiting: int
    cancelling: int  # active, but cancelled: dropped before the next step
    decode_steps: int  # batched decode steps run so far
    decoded_tokens: int  # tokens produced by those steps (sum of their batch sizes)
    largest_batch: int  # the most sequences one decode step has carried


def _cost(seq: Sequence) -> int:
    """The tokens a waiting sequence will cost the worker: its prompt and its completion."""
    return len(seq.prompt) + seq.params.max_tokens


class Scheduler:
    """Admits sequences into the engine's slots and decodes them together on a worker thread."""

    def __init__(
        self, engine: DecodeEngine, max_queue: int, max_queued_tokens: int | None = None
    ) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.max_queued_tokens = max_queued_tokens  # prompt + max_tokens over waiting sequences
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._free = list(range(engine.slots - 1, -1, -1))
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._steps = 0
        self._decoded = 0
        self._largest = 0

    # --- called from the event loop -------------------------------------------------------

    def submit(
        self, items: list[tuple[list[int], SamplingParams]], events: asyncio.Queue[Event]
    ) -> list[Sequence]:
        """Queue one sequence per (prompt, params); all or none. Events go to ``events``."""
        loop = asyncio.get_running_loop()
        seqs = [Sequence(i, p, params, events, loop) for i, (p, params) in enumerate(items)]
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFull(
                    f"the server is busy ({len(self._waiting)} sequences waiting); retry later"
                )
            if self.max_queued_tokens is not None:
                waiting = sum(_cost(s) for s in self._waiting)
                if waiting + sum(_cost(s) for s in seqs) > self.max_queued_tokens:
                    raise QueueFull(
                        f"the server is busy ({waiting} tokens waiting, at most "
                        f"{self.max_queued_tokens}); retry later"
                    )
            self._waiting.extend(seqs)
            self._start_locked()
            self._cond.notify()
        return seqs

    def cancel(self, seqs: list[Sequence]) -> None:
        """Stop generating ``seqs`` (the client left, or a stop string ended them)."""
        with self._cond:
            for s in seqs:
                s.cancelled = True
            self._cond.notify()

    def stats(self) -> Stats:
        with self._cond:
            return Stats(
                active=len(self._active),
                waiting=len(self._waiting),
                cancelling=sum(s.cancelled for s in self._active),
                decode_steps=self._steps,
                decoded_tokens=self._decoded,
                largest_batch=self._largest,
            )

    def start(self) -> None:
        with self._cond:
            self._start_locked()

    def stop(self) -> None:
        """Finish the current step, fail what is left, and join the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def _start_locked(self) -> None:
        if self._thread is None and not self._stopping:
            self._thread = threading.Thread(target=self._run, name="gpt2-serve-worker", daemon=True)
            self._thread.start()

    # --- the worker thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._active):
                    self._cond.wait()
                if self._stopping:
                    break
                admitted = []
                while self._waiting and self._free:
                    seq = self._waiting.popleft()
                    if not seq.cancelled:
                        seq.slot = self._free.pop()
                        admitted.append(seq)
            self._prefill_all(admitted)
            self._drop_cancelled()
            if self._active:
                self._decode_step()
        with self._cond:
            left = list(self._waiting) + self._active
            self._waiting.clear()
        for seq in left:
            self._end(seq, Event(seq.index, error="the server is shutting down"))

    def _prefill_all(self, seqs: list[Sequence]) -> None:
        """Prefill newly admitted sequences: in one forward pass where the engine can
        (``prefill_batch``), one by one where a sequence needs more than its last logits."""
        together = [s for s in seqs if s.params.max_tokens > 0 and not s.params.echo_logprobs]
        batched = getattr(self.engine, "prefill_batch", None)
        if batched is None or len(together) < 2:
            together = []
        for seq in seqs:
            if seq not in together:
                self._prefill(seq)
        if not together:
            return
        try:
            logits = batched([s.slot for s in together], [s.prompt for s in together])  # (B, V)
            picks = sample(logits, [s.sampler for s in together])
        except Exception as e:
            log.exception("batched prefill failed")
            for s in together:
                self._end(s, Event(s.index, error=f"generation failed: {type(e).__name__}"))
            return
        with self._cond:
            self._active.extend(together)
        for s, pick in zip(together, picks, strict=True):
            self._accept(s, pick)

    def _prefill(self, seq: Sequence) -> None:
        p = seq.params
        try:
            if p.max_tokens == 0 and not p.echo_logprobs:
                self._end(seq, Event(seq.index, finish="length"))
                return
            logits = self.engine.prefill(seq.slot, seq.prompt, all_positions=p.echo_logprobs)
            if p.echo_logprobs:
                seq.emit(
                    Event(seq.index, prompt=prompt_logprobs(logits, seq.prompt, p.logprobs or 0))
                )
            if p.max_tokens == 0:
                self._end(seq, Event(seq.index, finish="length"))
                return
            with self._cond:
                self._active.append(seq)
            self._accept(seq, sample(logits[-1:], [seq.sampler])[0])
        except Exception as e:  # a bug or out of memory: this sequence fails, the server lives
            log.exception("prefill failed")
            self._end(seq, Event(seq.index, error=f"generation failed: {type(e).__name__}"))

    def _decode_step(self) -> None:
        batch = list(self._active)
        try:
            logits = self.engine.decode(
                [s.slot for s in batch], [s.sampler.generated[-1] for s in batch]
            )  # (B, V)
            picks = sample(logits, [s.sampler for s in batch])
        except Exception as e:
            log.exception("decode step failed")
            for s in batch:
                self._end(s, Event(s.index, error=f"generation failed: {type(e).__name__}"))
            return
        with self._cond:
            self._steps += 1
            self._decoded += len(batch)
            self._largest = max(self._largest, len(batch))
        for s, pick in zip(batch, picks, strict=True):
            self._accept(s, pick)

    def _accept(self, seq: Sequence, pick: Sampled) -> None:
        """Record a sampled token, send it, and end the sequence if it is done."""
        seq.sampler.generated.append(pick.token)
        p = seq.params
        finish = None
        if p.stop_token is not None and pick.token == p.stop_token:
            finish = "stop"
        elif len(seq.sampler.generated) >= p.max_tokens:
            finish = "length"
        if finish is None:
            seq.emit(Event(seq.index, token=pick))
        else:
            self._end(seq, Event(seq.index, token=pick, finish=finish))

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._active if s.cancelled]:
            self._end(seq, None)

    def _end(self, seq: Sequence, last: Event | None) -> None:
        """Send the last event (if any) and give the slot back."""
        if last is not None:
            seq.emit(last)
        with self._cond:
            if seq in self._active:
                self._active.remove(seq)
            if seq.slot is not None:
                self.engine.release(seq.slot)
                self._free.append(seq.slot)
                seq.slot = None
