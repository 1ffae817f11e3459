"""The FastAPI application: OpenAI's completions, chat completions and models routes, a health
check, the playground.

`create_app` wires a model and tokenizer to a `Scheduler` (model work on its worker thread) and
wraps the routes in two plain ASGI layers, outermost first:

    ApiKeyAuth   ``/v1/*`` needs ``Authorization: Bearer KEY`` when the server has a key (401)
    BodyLimit    a body over ``max_body_bytes`` is refused (413) before anything parses it, and a
                 completion whose prompt (a chat request whose messages) cannot fit the context
                 (400) before the schema reads it

Everything the API refuses comes back as ``{"error": {...}}`` with a 4xx (see ``errors.py``).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpt2.decode import KVCacheEngine
from gpt2.model import GPT
from gpt2.serve import chat_completions as chat_api
from gpt2.serve import completions as text_api
from gpt2.serve.errors import APIError, install_error_handlers
from gpt2.serve.jobs import Job
from gpt2.serve.limits import Limits, check_messages_size, check_prompt_size, max_prompt_chars
from gpt2.serve.scheduler import Scheduler
from gpt2.serve.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    SamplingRequest,
)
from gpt2.tokenizer import Tokenizer

STATIC_DIR = Path(__file__).parent / "static"
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500)}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(
    model: GPT,
    tokenizer: Tokenizer,
    *,
    model_name: str = "gpt2",
    limits: Limits | None = None,
    api_key: str | None = None,
    engine: KVCacheEngine | None = None,
) -> FastAPI:
    """An app serving ``model``; its scheduler starts with the app and stops with it."""
    limits = limits or Limits()
    # A vocabulary padded for speed (--pad-vocab) has ids past the tokenizer's: they are never
    # sampled, and a prompt may not hold them.
    vocab_size = min(model.config.vocab_size, tokenizer.vocab_size)
    engine = engine or KVCacheEngine(model.eval(), limits.max_batch, vocab_limit=vocab_size)
    scheduler = Scheduler(engine, tokenizer.eot_token, limits.max_queue, limits.max_queued_tokens)
    context = engine.context
    longest = max((len(tokenizer.decode_bytes([i])) for i in range(vocab_size)), default=1)
    max_chars = max_prompt_chars(context, longest)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        await run_in_threadpool(scheduler.stop)

    app = FastAPI(
        title="gpt2",
        summary="OpenAI-compatible completions and chat completions from a GPT-2 model",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI would load scripts from a CDN; the schema is at /openapi.json
        redoc_url=None,
    )
    app.state.scheduler = scheduler
    install_error_handlers(app)

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        s = scheduler.stats()
        return Health(model=model_name, active=s.active, waiting=s.waiting)

    def card() -> ModelCard:
        return ModelCard(id=model_name, created=created, context_length=context)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def list_models() -> ModelList:
        return ModelList(data=[card()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
    async def get_model(model_id: str) -> ModelCard:
        if model_id != model_name:
            raise _unknown_model(model_id)
        return card()

    async def answer(
        body: SamplingRequest, planner: Callable, job_class: type[Job], request: Request
    ) -> Response:
        """Plan the request, queue it, and answer: streamed, or whole once it is done."""
        if body.model is not None and body.model != model_name:
            raise _unknown_model(body.model)
        planned = await run_in_threadpool(planner, body, tokenizer, vocab_size, context, limits)
        job = job_class(scheduler, tokenizer, model_name, planned)
        job.submit()
        if planned.stream:
            return CompletionStream(job)
        return await _until_done_or_gone(job, request)

    @app.post("/v1/completions", response_model=Completion, responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await answer(body, text_api.plan, text_api.TextCompletion, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await answer(body, chat_api.plan, chat_api.ChatCompletionJob, request)

    def check_body(path: str, body: bytes) -> None:
        if path == "/v1/completions":
            check_prompt_size(body, context, max_chars, limits.max_prompts)
        elif path == "/v1/chat/completions":
            check_messages_size(body, context, max_chars)

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, check=check_body)
    if api_key:
        app.add_middleware(ApiKeyAuth, key=api_key)  # added last: runs first
    return app


def _unknown_model(name: str) -> APIError:
    return APIError(
        404, f"the model {name!r} does not exist", param="model", code="model_not_found"
    )


async def _until_done_or_gone(job: Job, request: Request) -> Response:
    """The whole completion, unless the client disconnects first (then its sequences stop)."""
    done = asyncio.ensure_future(job.collect())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        finished, _ = await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not done.done():
            done.cancel()
            job.cancel()
    if done not in finished:
        return Response(status_code=499)  # nobody is there to read it
    return Response(done.result().model_dump_json(), media_type="application/json")


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the body has been read: only a disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class CompletionStream(StreamingResponse):
    """Server-sent events of a request, whose sequences stop however the response ends: the
    stream's own ``finally`` does not run if the client left before the first chunk."""

    def __init__(self, job: Job) -> None:
        super().__init__(job.stream(), media_type="text/event-stream", headers=SSE_HEADERS)
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


class ApiKeyAuth:
    """Require ``Authorization: Bearer KEY`` on ``/v1/*`` (the page and /health stay open)."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization")
            if given is None or not hmac.compare_digest(given, self.expected):
                why = "missing API key: send the header Authorization: Bearer KEY"
                why = why if given is None else "incorrect API key"
                return await _send_error(send, APIError(401, why, code="invalid_api_key"))
        await self.app(scope, receive, send)


class BodyLimit:
    """Read a request body up to ``max_bytes`` and pass it on; past that, 413.

    The body is read here in full (FastAPI would read it all before parsing anyway), so that the
    limit holds for a chunked body with no Content-Length too. The body is then given to
    ``check(path, body)``, which may refuse it (an `APIError`) by its sizes alone: the schema's
    validation of a 200000-id prompt would cost a tenth of a second on the event loop, and the
    refusal should cost what reading the lengths costs.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        check: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.check = check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await _send_error(send, self._too_large())
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await _send_error(send, self._too_large())
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if self.check is not None:
            try:
                self.check(scope["path"], body)
            except APIError as err:
                return await _send_error(send, err)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only the disconnect

        await self.app(scope, replay, send)

    def _too_large(self) -> APIError:
        return APIError(
            413, f"the request body is over {self.max_bytes} bytes", code="request_too_large"
        )


async def _send_error(send: Send, err: APIError) -> None:
    body = err.encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if err.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
