"""The worker thread that decodes every active request together (continuous batching).

Requests arrive on the event loop; model work happens here, on one thread, so the loop never
blocks. Each loop of the worker:

1. admits waiting sequences into free slots, prefilling their prompts and sampling their first
   tokens (and again, before stepping, for those that arrived during that prefill);
2. drops sequences whose client went away, freeing their slots;
3. runs ONE decode step for all active sequences at once: a (B, V) batch of logits, sampled row
   by row with each request's own settings.

The model work, the sampling and the text (stop strings included) are `gpt2.decode.Decoder`'s,
the loop of the library and of ``gpt2 sample``; this module adds only the thread and the queue.

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
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from gpt2.decode import Decoder, DecodeSequence, KVCacheEngine, Step
from gpt2.detokenize import IncrementalText, Piece
from gpt2.sampling import Sampled, Sampler

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More sequences are waiting than the server accepts."""


@dataclass(frozen=True)
class Event:
    """What the worker tells the event loop about sequence ``index`` of a request."""

    index: int
    token: Sampled | None = None
    piece: Piece | None = None  # the text that token released, with the tokens it completes
    finish: str | None = None  # "length" or "stop" (end of text, a stop string): no more events
    prompt: list[Sampled | None] | None = None  # the prompt's scores (echo with logprobs)
    error: str | None = None  # the model failed on this sequence: no more events follow


class Sequence(DecodeSequence):
    """One choice being generated. The worker owns its state; the loop reads its events."""

    def __init__(
        self,
        index: int,
        sampler: Sampler,
        text: IncrementalText,
        score_prompt: bool,
        events: asyncio.Queue[Event],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(sampler, text, score_prompt)
        self.index = index
        self.cancelled = False  # set from the loop; read by the worker between steps
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
    return len(seq.prompt) + seq.params.max_new_tokens


class Scheduler:
    """Admits sequences into the engine's slots and decodes them together on a worker thread."""

    def __init__(
        self,
        engine: KVCacheEngine,
        eot: int | None,
        max_queue: int,
        max_queued_tokens: int | None = None,
    ) -> None:
        self.engine = engine
        self.decoder = Decoder(engine, eot)  # touched by the worker thread only
        self.max_queue = max_queue
        self.max_queued_tokens = max_queued_tokens  # prompt + max_tokens over waiting sequences
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._steps = 0
        self._decoded = 0
        self._largest = 0

    # --- called from the event loop -------------------------------------------------------

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue ``seqs``; all or none."""
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

    def cancel(self, seqs: list[Sequence]) -> None:
        """Stop generating ``seqs`` (the client left)."""
        with self._cond:
            for s in seqs:
                s.cancelled = True
            self._cond.notify()

    def stats(self) -> Stats:
        active = list(self.decoder.active)  # a copy made at once: the worker changes the list
        with self._cond:
            return Stats(
                active=len(active),
                waiting=len(self._waiting),
                cancelling=sum(s.cancelled for s in active),
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
        decoder = self.decoder
        admitted_since_step = 0
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or decoder.active):
                    self._cond.wait()
                if self._stopping:
                    break
                admitted: list[Sequence] = []
                while self._waiting and len(admitted) < len(decoder.free):
                    seq = self._waiting.popleft()
                    if not seq.cancelled:
                        admitted.append(seq)
            if admitted:
                self._work(admitted, partial(decoder.admit, admitted), "prefill")
                admitted_since_step += len(admitted)
                # Those that arrived during that prefill join before the next step rather than a
                # step later (a burst of requests reaches the worker over one prefill, not at
                # once); at most a batch's worth between two steps, so decoding never starves.
                with self._cond:
                    more = bool(self._waiting and decoder.free)
                if more and admitted_since_step < self.engine.slots:
                    continue
            admitted_since_step = 0
            for seq in [s for s in decoder.active if s.cancelled]:  # type: ignore[attr-defined]
                decoder.drop(seq)
            batch = list(decoder.active)
            if batch and self._work(batch, decoder.step, "decode step"):
                with self._cond:
                    self._steps += 1
                    self._decoded += len(batch)
                    self._largest = max(self._largest, len(batch))
        with self._cond:
            left = list(self._waiting) + list(decoder.active)
            self._waiting.clear()
        for seq in left:
            decoder.drop(seq)
            seq.emit(Event(seq.index, error="the server is shutting down"))

    def _work(self, seqs: list, run: Callable[[], list[Step]], what: str) -> bool:
        """Run ``run`` (a prefill or a decode step of ``seqs``) and send what each sequence did;
        if it fails (a bug, out of memory), those sequences fail and the server lives on."""
        try:
            steps = run()
        except Exception as e:
            log.exception("%s failed", what)
            for seq in seqs:
                self.decoder.drop(seq)
                seq.emit(Event(seq.index, error=f"generation failed: {type(e).__name__}"))
            return False
        for step in steps:
            finish = "stop" if step.finish == "eot" else step.finish
            event = Event(step.seq.index, step.token, step.piece, finish, step.prompt_scores)
            step.seq.emit(event)  # type: ignore[attr-defined]
        return True
