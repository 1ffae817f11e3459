"""One ``/v1/completions`` request from start to end: check it, queue its choices, build the answer.

`plan` turns a validated `CompletionRequest` into token ids and sampling settings (refusing what
the limits forbid); `Completions.collect` waits for every choice and returns one response;
`Completions.stream` yields server-sent events as tokens arrive. Either way the request's
sequences are cancelled when it ends early (a client that leaves), so the worker stops spending
steps on them; stop strings end a sequence in the worker itself (`gpt2.decode`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from gpt2.detokenize import IncrementalText, TokenText, decode_all
from gpt2.errors import UserError
from gpt2.sampling import Sampled, Sampler, SamplingParams, default_seed
from gpt2.serve.errors import APIError
from gpt2.serve.limits import Limits, check_counts, check_lengths
from gpt2.serve.scheduler import Event, QueueFull, Scheduler, Sequence
from gpt2.serve.schemas import (
    MAX_STOP_SEQUENCES,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Logprobs,
    Usage,
)
from gpt2.tokenizer import Tokenizer

LOGIT_BIAS_RANGE = 100.0  # OpenAI's bound on each bias


@dataclass(frozen=True)
class Plan:
    """A request reduced to what the scheduler needs: each prompt's ids and text, settings."""

    prompts: list[list[int]]
    prompt_texts: list[str]
    n: int
    params: SamplingParams
    echo: bool
    stream: bool
    include_usage: bool

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


def plan(
    req: CompletionRequest, tokenizer: Tokenizer, vocab_size: int, context: int, limits: Limits
) -> Plan:
    """Check ``req`` against the model and the limits, and encode its prompts (CPU work: run it
    off the event loop)."""
    if req.suffix:
        raise APIError(400, "suffix is not supported by this model", param="suffix")
    n = 1 if req.n is None else req.n
    if req.best_of is not None and req.best_of != n:
        raise APIError(400, "best_of is supported only when equal to n", param="best_of")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences", param="stop")
    raw = _prompt_list(req.prompt)
    check_counts(limits, len(raw), n)
    prompts, texts = [], []
    for p in raw:
        ids, text = _encode(p, tokenizer, vocab_size)
        prompts.append(ids)
        texts.append(text)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    for ids in prompts:
        check_lengths(limits, context, len(ids), max_tokens)
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
        logprobs=req.logprobs,
        stop=tuple(s for s in stop if s),
        seed=req.seed,
    )
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Plan(prompts, texts, n, params, bool(req.echo), bool(req.stream), include_usage)


def _prompt_list(prompt: object) -> list[str | list[int]]:
    """``"a"``, ``["a", "b"]``, ``[1, 2]`` or ``[[1], [2]]`` as a list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    items = list(prompt)  # type: ignore[call-overload]
    if items and all(isinstance(x, int) for x in items):
        return [items]
    return items


def _encode(
    prompt: str | list[int], tokenizer: Tokenizer, vocab_size: int
) -> tuple[list[int], str]:
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        try:
            return tokenizer.encode(prompt), prompt
        except UserError as e:
            raise APIError(400, f"prompt: {e}", param="prompt") from None
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise APIError(
            400,
            f"prompt: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})",
            param="prompt",
        )
    return list(prompt), decode_all(tokenizer, list(prompt)).text


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
    text: str  # the completion's text so far
    echo_text: str  # sent before the completion when echo is on, else ""
    prompt_ids: list[int]
    prompt_scores: list[Sampled | None] | None = None
    tokens: list[TokenText] = field(default_factory=list)  # sent so far (non-streaming: all)
    n_tokens: int = 0  # generated tokens, end of text included (usage counts them)
    finish: str | None = None
    echo_sent: bool = False  # streaming: the prompt's chunk has gone out


class Completions:
    """Runs a planned request through the scheduler."""

    def __init__(
        self, scheduler: Scheduler, tokenizer: Tokenizer, model_name: str, plan: Plan
    ) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.plan = plan
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.choices: list[ChoiceState] = []
        self.seqs: list[Sequence] = []

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

    async def collect(self) -> Completion:
        """Wait for every choice to end; the whole response."""
        try:
            async for c, event in self._events():
                self._apply(c, event)
        finally:
            self.cancel()
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model_name,
            choices=[self._whole(c) for c in self.choices],
            usage=self._usage(),
        )

    async def stream(self) -> AsyncIterator[bytes]:
        """Server-sent events: a chunk per piece of text, then ``data: [DONE]``. With echo, a
        choice's first chunk is its prompt (sent once the worker has scored it, if asked)."""
        try:
            async for c, event in self._events():
                if event.error is not None:
                    yield _sse(APIError(500, event.error, type="server_error").body())
                    return
                sent_tokens, sent_chars = len(c.tokens), len(c.text)
                self._apply(c, event)
                if self.plan.echo and not c.echo_sent:
                    c.echo_sent = True
                    yield _sse(
                        self._chunk(c, c.echo_text, self._logprobs(self._prompt_tokens(c)), None)
                    )
                text = c.text[sent_chars:]
                new = c.tokens[sent_tokens:]
                if text or new or c.finish is not None:
                    logprobs = self._logprobs(self._after_echo(c, new))
                    yield _sse(self._chunk(c, text, logprobs, c.finish))
            if self.plan.include_usage:
                last = Completion(
                    id=self.id,
                    created=self.created,
                    model=self.model_name,
                    choices=[],
                    usage=self._usage(),
                )
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

    def _whole(self, c: ChoiceState) -> CompletionChoice:
        return CompletionChoice(
            text=c.echo_text + c.text,
            index=c.index,
            logprobs=self._logprobs(self._prompt_tokens(c) + self._after_echo(c, c.tokens)),
            finish_reason=c.finish,
        )

    def _logprobs(self, tokens: list[TokenText]) -> Logprobs | None:
        """The ``logprobs`` object for ``tokens`` (None when not asked for); a token without
        a score (the prompt's first) has null entries."""
        if self.plan.params.logprobs is None:
            return None
        return Logprobs(
            tokens=[t.text for t in tokens],
            token_logprobs=[t.info.logprob if t.info else None for t in tokens],
            top_logprobs=[self._top(t.text, t.info) if t.info else None for t in tokens],
            text_offset=[t.offset for t in tokens],
        )

    def _prompt_tokens(self, c: ChoiceState) -> list[TokenText]:
        """The prompt's tokens with their scores, when echo and logprobs are both asked."""
        if not (self.plan.echo and self.plan.params.logprobs is not None):
            return []
        scores = c.prompt_scores or [None] * len(c.prompt_ids)
        tokens = decode_all(self.tokenizer, c.prompt_ids).tokens
        return [replace(t, info=s) for t, s in zip(tokens, scores, strict=True)]

    def _after_echo(self, c: ChoiceState, tokens: list[TokenText]) -> list[TokenText]:
        """Generated ``tokens`` with offsets into the returned text (after the echoed prompt)."""
        return [replace(t, offset=len(c.echo_text) + t.offset) for t in tokens]

    def _top(self, text: str, s: Sampled) -> dict[str, float]:
        """The top alternatives, plus the chosen token (OpenAI: up to logprobs + 1 entries)."""
        top = {self.tokenizer.decode([i]): lp for i, lp in (s.top or ())}
        top.setdefault(text, s.logprob)
        return top

    def _usage(self) -> Usage:
        prompt = sum(len(p) for p in self.plan.prompts)
        completion = sum(c.n_tokens for c in self.choices)
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    def _chunk(
        self, c: ChoiceState, text: str, logprobs: Logprobs | None, finish: str | None
    ) -> dict:
        choice = CompletionChoice(text=text, index=c.index, logprobs=logprobs, finish_reason=finish)
        chunk = Completion(
            id=self.id, created=self.created, model=self.model_name, choices=[choice]
        )
        body = chunk.model_dump(exclude={"usage", "system_fingerprint"})
        return body


def _sse(body: dict) -> bytes:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()
