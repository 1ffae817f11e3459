"""``/v1/completions``: a prompt (or several) in, text out, in OpenAI's legacy completions shape.

`plan` reads the request's prompts into token ids (refusing what the limits forbid) and leaves
the sampling settings to the shared `gpt2.serve.jobs.sampling_plan`; `TextCompletion` is the
`gpt2.serve.jobs.Job` that answers with ``text_completion`` bodies, with ``echo`` and the
``logprobs`` object of the completions API.
"""

from __future__ import annotations

from dataclasses import replace

from gpt2.detokenize import TokenText, decode_all
from gpt2.errors import UserError
from gpt2.sampling import Sampled
from gpt2.serve.errors import APIError
from gpt2.serve.jobs import ChoiceState, Job, Plan, choices_per_prompt, sampling_plan
from gpt2.serve.limits import Limits, check_counts
from gpt2.serve.schemas import (
    Completion,
    CompletionChoice,
    CompletionRequest,
    Logprobs,
)
from gpt2.tokenizer import Tokenizer


def plan(
    req: CompletionRequest, tokenizer: Tokenizer, vocab_size: int, context: int, limits: Limits
) -> Plan:
    """Check ``req`` against the model and the limits, and encode its prompts (CPU work: run it
    off the event loop)."""
    if req.suffix:
        raise APIError(400, "suffix is not supported by this model", param="suffix")
    n = choices_per_prompt(req)
    if req.best_of is not None and req.best_of != n:
        raise APIError(400, "best_of is supported only when equal to n", param="best_of")
    raw = _prompt_list(req.prompt)
    check_counts(limits, len(raw), n)
    prompts, texts = [], []
    for p in raw:
        ids, text = _encode(p, tokenizer, vocab_size)
        prompts.append(ids)
        texts.append(text)
    return sampling_plan(
        req,
        prompts,
        vocab_size,
        context,
        limits,
        max_tokens=16 if req.max_tokens is None else req.max_tokens,
        logprobs=req.logprobs,
        echo=bool(req.echo),
        prompt_texts=texts,
    )


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


class TextCompletion(Job):
    """A completions request's answer: ``text_completion`` bodies. With echo, a choice's first
    chunk is its prompt (sent once the worker has scored it, if asked)."""

    id_prefix = "cmpl"
    response_model = Completion
    chunk_model = Completion

    def whole(self, c: ChoiceState) -> CompletionChoice:
        return CompletionChoice(
            text=c.echo_text + c.text,
            index=c.index,
            logprobs=self._logprobs(self._prompt_tokens(c) + self._after_echo(c, c.tokens)),
            finish_reason=c.finish,
        )

    def opening(self, c: ChoiceState) -> list[CompletionChoice]:
        if not self.plan.echo:
            return []
        logprobs = self._logprobs(self._prompt_tokens(c))
        return [CompletionChoice(text=c.echo_text, index=c.index, logprobs=logprobs)]

    def chunks(self, c: ChoiceState, text: str, tokens: list[TokenText]) -> list[CompletionChoice]:
        if not (text or tokens or c.finish is not None):
            return []
        logprobs = self._logprobs(self._after_echo(c, tokens))
        return [
            CompletionChoice(text=text, index=c.index, logprobs=logprobs, finish_reason=c.finish)
        ]

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
