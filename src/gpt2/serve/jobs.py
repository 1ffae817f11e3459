"""One request from its plan to its answer, the same for both completion endpoints.

Planning (``completions.plan``, ``chat_completions.plan``) reduces a request to a `Plan`: each
prompt's ids and the sampling settings; its shared half, `sampling_plan`, turns the fields both
endpoints take into `gpt2.sampling.SamplingParams`. A `Job` runs a plan through the scheduler:
`Job.collect` waits for every choice and returns one response, `Job.stream` yields server-sent
events as tokens arrive. Either way the request's sequences are cancelled when it ends early (a
client that leaves), so the worker stops spending steps on them; stop strings end a sequence in
the worker itself (`gpt2.decode`).

The endpoints differ only in the bodies they send, which a subclass writes: `TextCompletion`
(``completions.py``) and `ChatCompletionJob` (``chat_completions.py``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel

from gpt2.detokenize import IncrementalText, TokenText
from gpt2.sampling import Sampled, Sampler, SamplingParams, default_seed
from gpt2.serve.errors import APIError
from gpt2.serve.limits import Limits, check_lengths
from gpt2.serve.scheduler import Event, QueueFull, Scheduler, Sequence
from gpt2.serve.schemas import MAX_STOP_SEQUENCES, SamplingRequest, Usage
from gpt2.tokenizer import Tokenizer

LOGIT_BIAS_RANGE = 100.0  # OpenAI's bound on each bias


@dataclass(frozen=True)
class Plan:
    """A request reduced to what the scheduler needs: each prompt's ids, the settings."""

    prompts: list[list[int]]
    n: int
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool = False  # completions: the prompt comes back before the completion
    prompt_texts: list[str] = field(default_factory=list)  # what echo sends back
    lead: str = ""  # chat: the template's text before a reply's content (`gpt2.chat.reply_lead`)

    def sequences(
        self, tokenizer: Tokenizer, events: asyncio.Queue[Event], loop: asyncio.AbstractEventLoop
    ) -> list[Sequence]:
        """OpenAI's order: prompt i's n choices have indexes i*n .. i*n+n-1. Choice j of a
        prompt samples with ``seed + j``, as sample j of ``gpt2 sample --num-samples``."""
        p = self.params
        seed = p.seed if p.seed is not None else default_seed()
        score = self.echo and p.logprobs is not None
        return [
            Sequence(
                i * self.n + j,
                Sampler(p, prompt, seed + j),
                IncrementalText(tokenizer, p.stop),
                score,
                events,
                loop,
            )
            for i, prompt in enumerate(self.prompts)
            for j in range(self.n)
        ]


def choices_per_prompt(req: SamplingRequest) -> int:
    return 1 if req.n is None else req.n


def sampling_plan(
    req: SamplingRequest,
    prompts: list[list[int]],
    vocab_size: int,
    context: int,
    limits: Limits,
    *,
    max_tokens: int,
    logprobs: int | None,
    names: tuple[str, str] = ("prompt", "max_tokens"),
    **rest: Any,
) -> Plan:
    """The half of planning both endpoints share: ``max_tokens`` against the limits and the
    context, and the sampling settings. ``names`` are the request's fields for the prompt and
    for ``max_tokens`` (errors name them); ``rest`` goes to the `Plan`."""
    for ids in prompts:
        check_lengths(limits, context, len(ids), max_tokens, *names)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences", param="stop")
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0.0:  # OpenAI allows it: only the most likely token
        temperature, top_p = 0.0, 1.0
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_k=req.top_k if req.top_k and req.top_k > 0 else None,
        top_p=top_p,
        min_p=req.min_p or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=_logit_bias(req.logit_bias, vocab_size),
        logprobs=logprobs,
        stop=tuple(s for s in stop if s),
        seed=req.seed,
    )
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    n = choices_per_prompt(req)
    return Plan(prompts, n, params, bool(req.stream), include_usage, **rest)


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    out = []
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(
                400, f"logit_bias: {key!r} is not a token id", param="logit_bias"
            ) from None
        if not 0 <= token < vocab_size:
            raise APIError(
                400, f"logit_bias: token id {token} is outside the vocabulary", param="logit_bias"
            )
        if not -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE:
            raise APIError(
                400, f"logit_bias: values must be in [-100, 100], got {value}", param="logit_bias"
            )
        out.append((token, value))
    return tuple(out)


@dataclass
class ChoiceState:
    """One choice on the event loop's side: its text so far and why it ended."""

    index: int
    text: str  # the generated text so far
    echo_text: str  # sent before the completion when echo is on, else ""
    prompt_ids: list[int]
    prompt_scores: list[Sampled | None] | None = None
    tokens: list[TokenText] = field(default_factory=list)  # sent so far (non-streaming: all)
    n_tokens: int = 0  # generated tokens, end of text included (usage counts them)
    finish: str | None = None
    opened: bool = False  # streaming: the choice's first chunks have gone out


class Job(ABC):
    """Runs a planned request through the scheduler; a subclass writes the response's bodies."""

    id_prefix: ClassVar[str]
    response_model: ClassVar[type[BaseModel]]  # the whole answer
    chunk_model: ClassVar[type[BaseModel]]  # one streamed chunk

    def __init__(
        self, scheduler: Scheduler, tokenizer: Tokenizer, model_name: str, plan: Plan
    ) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.plan = plan
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.choices: list[ChoiceState] = []
        self.seqs: list[Sequence] = []

    # --- what a subclass writes -----------------------------------------------------------

    @abstractmethod
    def whole(self, c: ChoiceState) -> BaseModel:
        """Choice ``c`` of the whole response."""

    @abstractmethod
    def chunks(self, c: ChoiceState, text: str, tokens: list[TokenText]) -> list[BaseModel]:
        """The chunk choices that send ``text`` and ``tokens``, new since the last chunk of
        ``c`` (and its end, if it has ended)."""

    def opening(self, c: ChoiceState) -> list[BaseModel]:
        """The chunk choices sent before any of ``c``'s text."""
        return []

    def shown(self, c: ChoiceState) -> str:
        """The text of ``c`` that the answer shows (it only ever grows)."""
        return c.text

    # --- the run, shared ------------------------------------------------------------------

    def submit(self) -> None:
        """Queue every choice; a full queue is a 429."""
        loop = asyncio.get_running_loop()
        self.seqs = self.plan.sequences(self.tokenizer, self.events, loop)
        try:
            self.scheduler.submit(self.seqs)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from None
        for k, seq in enumerate(self.seqs):
            echo = self.plan.prompt_texts[k // self.plan.n] if self.plan.echo else ""
            self.choices.append(ChoiceState(k, "", echo, seq.prompt))

    def cancel(self) -> None:
        self.scheduler.cancel([s for s in self.seqs if not s.cancelled])

    async def _events(self) -> AsyncIterator[tuple[ChoiceState, Event]]:
        """Each worker event with its choice, until every choice has ended (the caller folds
        the event in with `_apply` before asking for the next)."""
        pending = len(self.choices)
        while pending:
            event = await self.events.get()
            c = self.choices[event.index]
            if c.finish is not None:
                continue  # tokens the worker made before it saw the cancellation
            yield c, event
            pending -= c.finish is not None

    async def collect(self) -> BaseModel:
        """Wait for every choice to end; the whole response."""
        try:
            async for c, event in self._events():
                self._apply(c, event)
        finally:
            self.cancel()
        return self.response_model(
            id=self.id,
            created=self.created,
            model=self.model_name,
            choices=[self.whole(c) for c in self.choices],
            usage=self._usage(),
        )

    async def stream(self) -> AsyncIterator[bytes]:
        """Server-sent events: a choice's opening chunks, a chunk per piece of its text, then
        (if asked) the usage, then ``data: [DONE]``."""
        try:
            async for c, event in self._events():
                if event.error is not None:
                    yield _sse(APIError(500, event.error, type="server_error").body())
                    return
                sent_tokens, sent_chars = len(c.tokens), len(self.shown(c))
                self._apply(c, event)
                bodies = [] if c.opened else self.opening(c)
                c.opened = True
                bodies += self.chunks(c, self.shown(c)[sent_chars:], c.tokens[sent_tokens:])
                for choice in bodies:
                    yield _sse(self._chunk(choice))
            if self.plan.include_usage:
                last = self._envelope(choices=[], usage=self._usage())
                yield _sse(last.model_dump(exclude={"system_fingerprint"}))
            yield b"data: [DONE]\n\n"
        finally:
            self.cancel()

    def _apply(self, c: ChoiceState, event: Event) -> None:
        """Fold one worker event into choice ``c``."""
        if event.error is not None:
            raise APIError(500, event.error, type="server_error")
        if event.prompt is not None:
            c.prompt_scores = event.prompt
        if event.token is not None:
            c.n_tokens += 1
        if event.piece is not None:
            c.text += event.piece.text
            c.tokens.extend(event.piece.tokens)
        if event.finish is not None:
            c.finish = event.finish

    def _usage(self) -> Usage:
        prompt = sum(len(p) for p in self.plan.prompts)
        completion = sum(c.n_tokens for c in self.choices)
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    def _envelope(self, **fields: Any) -> BaseModel:
        return self.chunk_model(id=self.id, created=self.created, model=self.model_name, **fields)

    def _chunk(self, choice: BaseModel) -> dict:
        """One chunk's body: ``choice`` in the chunk's envelope (no usage: only the last has)."""
        return self._envelope(choices=[choice]).model_dump(exclude={"usage", "system_fingerprint"})


def _sse(body: dict) -> bytes:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()
