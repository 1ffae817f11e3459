"""What one request may ask of the server, and the checks that refuse the rest with a 4xx.

A server on a shared machine must not let one request take it over: the body is bounded before it
is parsed, a prompt plus its ``max_tokens`` must fit the model's context, and ``n`` and the number
of prompts are capped so that a single request cannot fill the queue on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpt2.serve.errors import APIError

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 * MiB  # the request body, before parsing
    max_tokens: int | None = None  # per choice; None: the model's context length
    max_n: int = 8  # choices per prompt
    max_prompts: int = 16  # prompts in one request
    max_batch: int = 32  # sequences decoded together (cache slots)
    max_queue: int = 64  # sequences waiting for a slot; past this, 429

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_n", "max_prompts", "max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")

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


def check_lengths(limits: Limits, context: int, prompt_tokens: int, max_tokens: int) -> None:
    """Refuse an empty prompt, ``max_tokens`` over the limit, or a request past the context."""
    if prompt_tokens == 0:
        raise APIError(400, "prompt must not be empty", param="prompt")
    cap = limits.max_new_tokens(context)
    if max_tokens > cap:
        raise APIError(
            400, f"max_tokens must be at most {cap}, got {max_tokens}", param="max_tokens"
        )
    if prompt_tokens + max_tokens > context:
        raise APIError(
            400,
            f"this model's context is {context} tokens, but {prompt_tokens + max_tokens} were "
            f"asked for ({prompt_tokens} in the prompt, {max_tokens} for the completion)",
            param="prompt",
            code="context_length_exceeded",
        )
