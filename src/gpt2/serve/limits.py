"""What one request may ask of the server, and the checks that refuse the rest with a 4xx.

A server on a shared machine must not let one request take it over: the body is bounded before it
is parsed, a prompt plus its ``max_tokens`` must fit the model's context, and ``n`` and the number
of prompts are capped so that a single request cannot fill the queue on its own.

The checks run cheapest first, so that what a refused request costs is bounded by the context, not
by what it sent: the body's size (while it is read), then the prompt's length straight from the
parsed JSON (`check_prompt_size`: list lengths and string lengths, no per-item work; for a chat
request `check_messages_size`), then the schema, then the ids themselves, then the queue
(sequences and tokens waiting).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gpt2.serve.errors import APIError
from gpt2.serve.schemas import message_texts

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 * MiB  # the request body, before parsing
    max_tokens: int | None = None  # per choice; None: the model's context length
    max_n: int = 8  # choices per prompt
    max_prompts: int = 16  # prompts in one request
    max_batch: int = 32  # sequences decoded together (cache slots)
    max_queue: int = 64  # sequences waiting for a slot; past this, 429
    max_queued_tokens: int = 1 << 15  # prompt + max_tokens summed over waiting sequences; 429

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value is not None and value < 1:  # None: max_tokens' "the context"
                raise ValueError(f"{name} must be at least 1, got {value}")

    def max_new_tokens(self, context: int) -> int:
        return min(self.max_tokens or context, context)


def check_counts(limits: Limits, n_prompts: int, n: int) -> None:
    """Refuse an empty prompt list, too many prompts, too many choices, or more than can queue."""
    if n_prompts == 0:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if n_prompts > limits.max_prompts:
        raise APIError(
            400,
            f"at most {limits.max_prompts} prompts per request, got {n_prompts}",
            param="prompt",
        )
    if n > limits.max_n:
        raise APIError(400, f"n must be at most {limits.max_n}, got {n}", param="n")
    if n_prompts * n > limits.max_queue:
        raise APIError(
            400,
            f"{n_prompts} prompts x n={n} asks for {n_prompts * n} completions; this server "
            f"queues at most {limits.max_queue}",
            param="n",
        )


def check_lengths(
    limits: Limits,
    context: int,
    prompt_tokens: int,
    max_tokens: int,
    prompt_name: str = "prompt",
    max_name: str = "max_tokens",
) -> None:
    """Refuse an empty prompt, ``max_tokens`` over the limit, or a request past the context
    (errors name the request's fields: ``prompt_name``, ``max_name``)."""
    if prompt_tokens == 0:
        raise APIError(400, f"{prompt_name} must not be empty", param=prompt_name)
    cap = limits.max_new_tokens(context)
    if max_tokens > cap:
        raise APIError(400, f"{max_name} must be at most {cap}, got {max_tokens}", param=max_name)
    if prompt_tokens + max_tokens > context:
        raise APIError(
            400,
            f"this model's context is {context} tokens, but {prompt_tokens + max_tokens} were "
            f"asked for ({prompt_tokens} in the {prompt_name}, {max_tokens} for the completion)",
            param=prompt_name,
            code="context_length_exceeded",
        )


def max_prompt_chars(context: int, longest_token_bytes: int) -> int:
    """The most characters a prompt that fits ``context`` can have: a token's text is at most its
    bytes, so a longer text cannot encode to ``context`` tokens or fewer (never refuses one that
    could)."""
    return context * max(1, longest_token_bytes)


def _parsed(body: bytes) -> object:
    """The body's JSON for the size checks; None when it is not JSON (the route's own parser
    then says so, in its words)."""
    try:
        return json.loads(body) if body.strip() else None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    except ValueError:
        return None


def check_prompt_size(body: bytes, context: int, max_chars: int, max_prompts: int) -> None:
    """Refuse a prompt too long for the context from the request body alone, before the schema
    or the tokenizer look at it: after one ``json.loads`` (C, bounded by the body limit) only
    lengths are read, so the cost does not grow with the number of ids.

    Anything that is not a JSON object with a list or string ``prompt`` is left to the schema."""
    parsed = _parsed(body)
    prompt = parsed.get("prompt") if isinstance(parsed, dict) else None
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list):
        if prompt and not isinstance(prompt[0], (str, list)):  # a list of ids: one prompt
            prompts = [prompt]
        elif len(prompt) > max_prompts:
            raise APIError(
                400, f"at most {max_prompts} prompts per request, got {len(prompt)}", param="prompt"
            )
        else:
            prompts = prompt
    else:
        return
    for p in prompts:
        if isinstance(p, str) and len(p) > max_chars:
            raise _too_long(
                context, f"the prompt has {len(p)} characters (more than {max_chars} cannot fit)"
            )
        if isinstance(p, list) and len(p) > context:
            raise _too_long(context, f"the prompt has {len(p)} token ids")


def check_messages_size(body: bytes, context: int, max_chars: int) -> None:
    """The same guard for a chat request: its messages' text cannot pass ``max_chars``
    characters, nor can there be more messages than the context has tokens (a chat template
    puts every message's text in the prompt, after a role marker of one token or more).
    Counting stops at the limit, so a long list costs no more than one that fits."""
    parsed = _parsed(body)
    messages = parsed.get("messages") if isinstance(parsed, dict) else None
    if not isinstance(messages, list):
        return
    if len(messages) > context:
        raise _too_long(context, f"there are {len(messages)} messages", "messages")
    total = 0
    for text in message_texts(messages):
        total += len(text)
        if total > max_chars:
            raise _too_long(
                context,
                f"the messages hold over {max_chars} characters (more cannot fit)",
                "messages",
            )


def _too_long(context: int, what: str, param: str = "prompt") -> APIError:
    return APIError(
        400,
        f"this model's context is {context} tokens, but {what}",
        param=param,
        code="context_length_exceeded",
    )
