"""Conversations as token ids: the chat template, and which tokens training learns from.

A conversation is OpenAI's list of messages, ``[{"role": "system"|"user"|"assistant",
"content": "..."}]``. A *chat template* turns it into one string: a Jinja template, the form
Hugging Face stores as ``chat_template`` in ``tokenizer_config.json``, rendered the way
transformers' ``apply_chat_template`` renders it, so the two give the same ids. A tokenizer
carries its template (`gpt2.tokenizer.Tokenizer.chat_template`, saved in ``tokenizer.json``);
one without gets `DEFAULT_TEMPLATE`.

The default template uses plain-text role markers inside GPT-2's vocabulary and its one
special token, ``<|endoftext|>``, to end each assistant turn (docs/chat.md says why)::

    System: You are terse.

    User: What is 37 + 45?

    Assistant: 82.<|endoftext|>User: ...

A reply is generated after ``Assistant:`` (the generation prompt, with no trailing space: GPT-2's
tokens carry their leading space, so the reply's first token is `` 82``), and ends at
end-of-text, where every decoder already stops.

`conversation_ids` also returns the training mask: True on each assistant reply and the
end-of-text that closes it, False on everything the model is given rather than asked to say.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from gpt2.errors import UserError
from gpt2.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}System: "
    "{% elif message['role'] == 'user' %}User: "
    "{% else %}Assistant: {% endif %}"
    "{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

Message = dict[str, str]


def check_messages(messages: Any, where: str = "messages") -> list[Message]:
    """``messages`` as a list of ``{"role", "content"}`` dicts, or `UserError` saying what is
    wrong with the first bad one (one line: the server turns it into a 400)."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"{where}[{i}] must be an object with a role and a content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"{where}[{i}] has role {role!r}; the roles are {', '.join(ROLES)}")
        if isinstance(content, list):  # OpenAI's content parts: only text parts have meaning here
            content = _text_parts(content, f"{where}[{i}].content")
        if not isinstance(content, str):
            raise UserError(f"{where}[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def _text_parts(parts: list[Any], where: str) -> str:
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") != "text":
            raise UserError(f"{where} may hold only text parts ({{'type': 'text', 'text': ...}})")
        if not isinstance(part.get("text"), str):
            raise UserError(f"{where} has a text part without a string 'text'")
        texts.append(part["text"])
    return "".join(texts)


def template_of(tokenizer: Tokenizer) -> str:
    """The tokenizer's own chat template, else `DEFAULT_TEMPLATE`."""
    return tokenizer.chat_template or DEFAULT_TEMPLATE


def eos_text(tokenizer: Tokenizer) -> str:
    """The end-of-text token's text; a vocabulary without one cannot end a reply."""
    if tokenizer.eot_token is None:
        raise UserError(
            "chat needs a tokenizer with an end-of-text token to end each reply; this model's "
            f"{tokenizer.kind!r} vocabulary has none (train on a gpt2 or bpe tokenizer)"
        )
    return tokenizer.decode([tokenizer.eot_token])


@lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    """The template compiled as transformers compiles it: a sandbox, blocks trimmed."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:  # templates call this to refuse a conversation
        raise UserError(f"the chat template refuses this conversation: {message}")

    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise UserError(f"the chat template does not compile: {e}") from None


def render(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    add_generation_prompt: bool = False,
    template: str | None = None,
) -> str:
    """The conversation as the text the model reads (``apply_chat_template(..., tokenize=False)``)."""
    from jinja2.exceptions import TemplateError

    try:
        return _compiled(template or template_of(tokenizer)).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            eos_token=eos_text(tokenizer),
            bos_token=eos_text(tokenizer),  # GPT-2's one special token is both
        )
    except TemplateError as e:
        raise UserError(f"the chat template failed on this conversation: {e}") from None


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Rendered chat text as ids: the end-of-text marker the template writes is the special
    token (as transformers' tokenizer parses it), not its characters."""
    return tokenizer.encode(text, allowed_special="all")  # type: ignore[call-arg]  # BPE ones


def prompt_ids(
    tokenizer: Tokenizer, messages: Sequence[Message], template: str | None = None
) -> list[int]:
    """The ids the model continues to write the next assistant reply."""
    return encode_text(tokenizer, render(tokenizer, messages, True, template))


def check_plain_text(tokenizer: Tokenizer, messages: Sequence[Message]) -> None:
    """Refuse a message whose text holds the end-of-text token's text: the template writes it
    to end a reply, and encodes it as the token, so a message holding it would end turns where
    none ends (the server refuses it in a completion's prompt too)."""
    eos = eos_text(tokenizer)
    for i, m in enumerate(messages):
        if eos in m["content"]:
            raise UserError(f"messages[{i}].content holds {eos}, which only the template may write")


def reply_lead(
    tokenizer: Tokenizer, messages: Sequence[Message], template: str | None = None
) -> str:
    """What the template writes between the generation prompt and a reply's content: the
    default template's space after ``Assistant:``, which the model writes as the start of its
    reply (`` 82``). A reply less its lead is the content that, put back in the conversation,
    renders the text the model wrote (`reply_content`). "" if the template shows no such text."""
    mark = "\x00reply\x00"
    try:
        prompt = render(tokenizer, messages, True, template)
        whole = render(
            tokenizer, [*messages, {"role": "assistant", "content": mark}], template=template
        )
    except UserError:  # a template that refuses a conversation ending in a reply
        return ""
    at = whole.find(mark, len(prompt))
    return whole[len(prompt) : at] if whole.startswith(prompt) and at >= 0 else ""


def reply_content(text: str, lead: str, done: bool = True) -> str:
    """The content of a reply whose generated text is ``text``: less the template's ``lead``
    if it starts with it. While it is still being generated (not ``done``), a text that may yet
    become the lead shows nothing, so that what is shown only ever grows."""
    if text.startswith(lead):
        return text[len(lead) :]
    return "" if not done and lead.startswith(text) else text


def conversation_ids(
    tokenizer: Tokenizer, messages: Sequence[Message], template: str | None = None
) -> tuple[list[int], list[bool]]:
    """A whole conversation's ids and its training mask (True: an assistant's reply or its end).

    Each assistant reply is what the template adds between the conversation before it (rendered
    with the generation prompt) and the conversation including it; the text before goes in
    unmasked. The pieces are encoded one by one, and their ids must join to the ids of the whole
    text: a template whose pieces tokenize differently apart than together is refused, since the
    mask would then mark tokens the model never sees at inference time.
    """
    ids: list[int] = []
    mask: list[bool] = []
    done = ""  # the text rendered so far
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], True, template)
        upto = render(tokenizer, messages[: i + 1], False, template)
        if not before.startswith(done) or not upto.startswith(before):
            raise UserError("the chat template does not render a conversation as its prefixes")
        for text, on in ((before[len(done) :], False), (upto[len(before) :], True)):
            piece = encode_text(tokenizer, text)
            ids += piece
            mask += [on] * len(piece)
        done = upto
    rest = render(tokenizer, messages, False, template)[len(done) :]
    piece = encode_text(tokenizer, rest)
    ids += piece
    mask += [False] * len(piece)
    if ids != encode_text(tokenizer, done + rest):
        raise UserError(
            "the chat template's pieces tokenize differently apart than together; "
            "end each role marker before a space or a newline"
        )
    return ids, mask
