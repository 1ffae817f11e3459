"""Request and response bodies of the completions APIs, in OpenAI's shapes.

The request is validated strictly: a number sent as a string, an unknown field or a value out of
OpenAI's documented range is refused with a 400 before any model work. Three settings of the
library that OpenAI lacks (``top_k``, ``min_p``, ``repetition_penalty``) are accepted as extra
fields, as vLLM does. Limits that depend on the
model or the server (context length, ``max_tokens``, ``n``) are checked later, in ``limits.py``.

``/v1/completions`` and ``/v1/chat/completions`` take the same sampling fields
(`SamplingRequest`); each adds its own input (``prompt`` or ``messages``) and its own way of
asking for log probabilities.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# A token id list may be sent instead of text, as OpenAI allows: "prompt": [15496, 11] or
# "prompt": [[15496], [11]] (several prompts, each a list of ids).
Prompt = str | list[str] | list[int] | list[list[int]]

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_LOGPROBS = 5  # OpenAI's limit on top alternatives per token (completions)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top alternatives per token (chat)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = Field(
        False, description="send a last chunk with the request's token usage (and no choices)"
    )


def _refuse_lone_surrogates(texts: list[Any]) -> None:
    """JSON may escape half of a UTF-16 pair ("\\ud800"); such text cannot be encoded as
    UTF-8, so it could not be echoed or streamed back: refused, with a 400."""
    for text in texts:
        if isinstance(text, str) and any("\ud800" <= c <= "\udfff" for c in text):
            raise ValueError("text must be valid Unicode (it has a lone UTF-16 surrogate)")


def _texts(value: object) -> list[Any]:
    return [value] if isinstance(value, str) else value if isinstance(value, list) else []


def message_texts(messages: object) -> Iterator[str]:
    """Every string a list of chat messages holds as content (plain, or in text parts),
    whatever else it holds: the size guard reads the raw JSON with it, before the schema."""
    for m in messages if isinstance(messages, list) else ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            yield content
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]


class SamplingRequest(BaseModel):
    """What both completion endpoints take: the model, the sampling settings, streaming."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(
        None, max_length=256, description="the served model's id (optional: there is only one)"
    )
    temperature: float | None = Field(
        1.0, ge=0.0, le=2.0, description="0 picks the most likely token; higher is more random"
    )
    top_p: float | None = Field(
        1.0, ge=0.0, le=1.0, description="sample among the most likely tokens of this total mass"
    )
    n: int | None = Field(1, ge=1, description="choices to generate (for each prompt)")
    stop: str | list[str] | None = Field(
        None, description=f"up to {MAX_STOP_SEQUENCES} strings that end a choice (not returned)"
    )
    seed: int | None = Field(
        None, ge=-(2**63), lt=2**64, description="the same seed and request give the same text"
    )
    top_k: int | None = Field(
        None, ge=-1, description="extra (as vLLM): sample among the k most likely; 0 or -1: all"
    )
    min_p: float | None = Field(
        None, ge=0.0, le=1.0, description="extra (as vLLM): drop tokens below min_p x the top one"
    )
    repetition_penalty: float | None = Field(
        None, gt=0.0, le=10.0, description="extra (as vLLM): > 1 discourages tokens already seen"
    )
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        None, description='added to the logits of token ids: {"50256": -100} bans end of text'
    )
    stream: bool | None = Field(False, description="send tokens as server-sent events")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="ignored")

    @field_validator("stop")
    @classmethod
    def _valid_stop(cls, value: object) -> object:
        _refuse_lone_surrogates(_texts(value))
        return value


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``. Fields and defaults as OpenAI documents them."""

    prompt: Prompt = Field(
        description="text to continue: a string, a list of strings, or token ids (a list of ints, "
        "or a list of such lists)"
    )
    max_tokens: int | None = Field(16, ge=0, description="most tokens to generate per choice")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="return each token's log probability and this many top alternatives",
    )
    echo: bool | None = Field(False, description="return the prompt before the completion")
    best_of: int | None = Field(None, ge=1, description="accepted only when equal to n")
    suffix: str | None = Field(None, description="not supported: only null or empty")

    @field_validator("prompt")
    @classmethod
    def _valid_prompt(cls, value: object) -> object:
        _refuse_lone_surrogates(_texts(value))
        return value


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``. Fields and defaults as OpenAI documents them."""

    messages: list[dict[str, Any]] = Field(
        description='the conversation: {"role": "system" | "user" | "assistant", "content": '
        'text, or a list of {"type": "text", "text": ...} parts}'
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, description="most tokens in each reply (default: the rest of the context)"
    )
    max_tokens: int | None = Field(
        None, ge=1, description="the older name of max_completion_tokens (used when it is unset)"
    )
    logprobs: bool | None = Field(False, description="return each token's log probability")
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="with logprobs: this many most likely alternatives per token",
    )

    @field_validator("messages")
    @classmethod
    def _valid_messages(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        _refuse_lone_surrogates(list(message_texts(value)))
        return value


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: Logprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    """A whole response, or (with ``stream``) one server-sent chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(
        description="the token's UTF-8 bytes (a token may hold part of a character)"
    )


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletion(BaseModel):
    """A whole chat response."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    """What a chunk adds to a reply: the role once, at the start, then pieces of content."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent chunk of a streamed chat response."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gpt2"
    context_length: int = Field(description="the model's context window in tokens")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    active: int = Field(description="sequences being decoded now")
    waiting: int = Field(description="sequences queued for a free slot")
