"""``/v1/chat/completions``: a conversation in, the assistant's reply out, in OpenAI's chat shape.

`plan` checks the messages (`gpt2.chat.check_messages`) and renders them with the model's chat
template into the prompt the model continues (`gpt2.chat.prompt_ids`); the rest of planning is the
shared `gpt2.serve.jobs.sampling_plan`. `ChatCompletionJob` is the `gpt2.serve.jobs.Job` that
answers with ``chat.completion`` bodies (streamed: ``chat.completion.chunk``, the role first, then
pieces of content, then the finish reason).

A reply's content is the generated text less the template's lead (`gpt2.chat.reply_lead`: the
default template's space after ``Assistant:``), so that a client that sends the reply back as an
assistant message gives the model the very text it wrote. Its tokens' log probabilities are
those of the generated text, lead included.
"""

from __future__ import annotations

from gpt2.chat import (
    check_messages,
    check_plain_text,
    eos_text,
    prompt_ids,
    reply_content,
    reply_lead,
)
from gpt2.detokenize import TokenText
from gpt2.errors import UserError
from gpt2.serve.errors import APIError
from gpt2.serve.jobs import ChoiceState, Job, Plan, choices_per_prompt, sampling_plan
from gpt2.serve.limits import Limits, check_counts
from gpt2.serve.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    TokenLogprob,
    TopLogprob,
)
from gpt2.tokenizer import Tokenizer


def plan(
    req: ChatCompletionRequest,
    tokenizer: Tokenizer,
    vocab_size: int,
    context: int,
    limits: Limits,
) -> Plan:
    """Check ``req`` against the model and the limits, and render its conversation into the
    prompt's ids (CPU work: run it off the event loop)."""
    check_counts(limits, 1, choices_per_prompt(req))
    try:
        eos_text(tokenizer)
    except UserError as e:
        raise APIError(400, str(e), code="chat_not_supported") from None
    try:
        messages = check_messages(req.messages)
        check_plain_text(tokenizer, messages)
        ids = prompt_ids(tokenizer, messages)
        lead = reply_lead(tokenizer, messages)
    except UserError as e:
        raise APIError(400, str(e), param="messages") from None
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    names = ("messages", "max_tokens")
    max_tokens = req.max_tokens
    if req.max_completion_tokens is not None:
        names, max_tokens = ("messages", "max_completion_tokens"), req.max_completion_tokens
    if max_tokens is None:  # OpenAI's default: as long as the context allows
        max_tokens = max(1, min(limits.max_new_tokens(context), context - len(ids)))
    return sampling_plan(
        req,
        [ids],
        vocab_size,
        context,
        limits,
        max_tokens=max_tokens,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        names=names,
        lead=lead,
    )


class ChatCompletionJob(Job):
    """A chat request's answer: ``chat.completion`` bodies, or ``chat.completion.chunk`` s."""

    id_prefix = "chatcmpl"
    response_model = ChatCompletion
    chunk_model = ChatCompletionChunk

    def shown(self, c: ChoiceState) -> str:
        return reply_content(c.text, self.plan.lead, done=c.finish is not None)

    def whole(self, c: ChoiceState) -> ChatChoice:
        return ChatChoice(
            index=c.index,
            message=ChatMessage(content=self.shown(c)),
            logprobs=self._logprobs(c.tokens),
            finish_reason=c.finish,
        )

    def opening(self, c: ChoiceState) -> list[ChatChunkChoice]:
        return [ChatChunkChoice(index=c.index, delta=ChatDelta(role="assistant", content=""))]

    def chunks(self, c: ChoiceState, text: str, tokens: list[TokenText]) -> list[ChatChunkChoice]:
        out = []
        if text or tokens:
            delta = ChatDelta(content=text)
            out.append(ChatChunkChoice(index=c.index, delta=delta, logprobs=self._logprobs(tokens)))
        if c.finish is not None:
            out.append(ChatChunkChoice(index=c.index, delta=ChatDelta(), finish_reason=c.finish))
        return out

    def _chunk(self, choice: ChatChunkChoice) -> dict:  # type: ignore[override]
        """A delta carries only what it adds (``{"content": ...}``, ``{}`` at the end)."""
        body = super()._chunk(choice)
        body["choices"][0]["delta"] = choice.delta.model_dump(exclude_none=True)
        return body

    def _logprobs(self, tokens: list[TokenText]) -> ChatLogprobs | None:
        """The chat ``logprobs`` object for ``tokens`` (None when not asked for)."""
        if self.plan.params.logprobs is None:
            return None
        return ChatLogprobs(
            content=[
                TokenLogprob(
                    **self._scored(t.id, t.info.logprob).model_dump(),
                    top_logprobs=[self._scored(i, lp) for i, lp in t.info.top or ()],
                )
                for t in tokens
            ]
        )

    def _scored(self, token: int, logprob: float) -> TopLogprob:
        raw = self.tokenizer.decode_bytes([token])
        return TopLogprob(token=self.tokenizer.decode([token]), logprob=logprob, bytes=list(raw))
