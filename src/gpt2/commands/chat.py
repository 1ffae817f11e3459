"""``gpt2 chat``: a conversation with a checkpoint on the terminal, each reply streamed.

Each line read is a user message; the reply streams to stdout. Lines that start with ``/`` are
commands: ``/reset`` forgets the conversation (the system message stays), ``/system TEXT`` sets
the system message (``/system`` alone removes it), ``/exit`` (or end of input) ends the session.

The conversation goes through the model's chat template (`gpt2.chat.prompt_ids`) and the reply
through `gpt2.generate.stream`, the decode loop of ``gpt2 sample`` and the server, with the
sampling flags of ``gpt2 sample``. A reply is stored as the server returns it, less the
template's lead (`gpt2.chat.reply_content`), so the next prompt holds the text the model wrote.

Ctrl-C while a reply streams stops that reply and the session goes on: what the reply had said
so far stays in the conversation, as if it had ended there (the model sees what the user saw).
Ctrl-C at the prompt ends the session.

The context is small: before each reply, while the conversation leaves less room than the
reply may take (``--max-new-tokens``, or half the context if that is less), its oldest turn (a
user message and the replies to it) goes, never the system message, with a one-line note on
stderr; a message too long to fit even alone is refused with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from typing import TextIO

from gpt2.chat import (
    Message,
    check_plain_text,
    eos_text,
    prompt_ids,
    reply_content,
    reply_lead,
)
from gpt2.commands.options import add_model_options, load_for_inference
from gpt2.commands.sample import add_sampling_options, params_from_args
from gpt2.errors import UserError
from gpt2.generate import stream
from gpt2.model import GPT
from gpt2.sampling import SamplingParams
from gpt2.tokenizer import Tokenizer

COMMANDS = "/reset, /system TEXT, /exit"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="talk with a model on the terminal (its chat template, replies streamed)",
        description="An interactive conversation on stdin and stdout. Commands: "
        f"{COMMANDS}. Ctrl-C stops a reply (what it said stays in the conversation); at the "
        "prompt, it ends the session.",
    )
    add_model_options(p)
    p.add_argument("--system", default="", help="the system message (default: none)")
    add_sampling_options(p, "most tokens in a reply")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    params = params_from_args(args)
    model, tok, _ = load_for_inference(args)
    eos_text(tok)  # a vocabulary without end-of-text cannot end a reply: say so before starting
    session = Session(model, tok, params, args.system, sys.stdout, sys.stderr)
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # not on every platform
            import readline  # noqa: F401  (line editing and history for input())
        c = model.config.block_size
        session.note(f"context {c} tokens; commands: {COMMANDS}; Ctrl-C stops a reply")
    return session.run("> " if interactive else "")


class Session:
    """One conversation: the system message, the turns so far, and the reply loop."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        params: SamplingParams,
        system: str,
        out: TextIO,
        err: TextIO,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.params = params
        self.system = system
        self.turns: list[Message] = []  # user messages and replies, oldest first
        self.out = out
        self.err = err

    def messages(self, turns: list[Message] | None = None) -> list[Message]:
        """The system message (if any) and ``turns`` (default: the conversation's)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + (self.turns if turns is None else turns)

    def note(self, text: str) -> None:
        print(f"gpt2 chat: {text}", file=self.err, flush=True)

    def run(self, prompt: str) -> int:
        """Read lines until ``/exit``, the end of input or Ctrl-C at the prompt."""
        while True:
            try:
                line = input(prompt)
            except (EOFError, KeyboardInterrupt):
                if prompt:
                    print(file=self.out)  # end the prompt's line
                return 0
            if not self.command(line.strip()):
                return 0

    def command(self, line: str) -> bool:
        """Act on one line; False when the session is over."""
        name, _, rest = line.partition(" ")
        if not line:
            return True
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.turns = []
            self.note("the conversation is cleared")
        elif name == "/system":
            self.system = rest.strip()
            self.note("system message set" if self.system else "system message removed")
        elif name.startswith("/"):
            self.note(f"unknown command {name}; the commands are {COMMANDS}")
        else:
            self.reply(line)
        return True

    def reply(self, text: str) -> None:
        """Add the user's message, stream the reply, and keep it (all of it, or up to Ctrl-C)."""
        message = {"role": "user", "content": text}
        try:
            check_plain_text(self.tokenizer, [message])
        except UserError as e:
            self.note(f"not sent: {str(e).replace('messages[0].content', 'the message')}")
            return
        self.turns.append(message)
        fitted = self.fit()
        if fitted is None:
            self.turns.pop()
            self.note(
                f"that message is too long for the model's context "
                f"({self.model.config.block_size} tokens), even alone; it was not sent"
            )
            return
        ids, budget = fitted
        lead = reply_lead(self.tokenizer, self.messages())
        params = dataclasses.replace(self.params, max_new_tokens=budget)
        generated, shown, stopped = "", "", False
        try:
            for piece in stream(self.model, self.tokenizer, ids, params):
                generated += piece
                content = reply_content(generated, lead, done=False)
                self.out.write(content[len(shown) :])
                self.out.flush()
                shown = content
        except KeyboardInterrupt:
            stopped = True
        content = reply_content(generated, lead)
        print(content[len(shown) :], file=self.out, flush=True)
        self.turns.append({"role": "assistant", "content": content})
        if stopped:
            self.note("reply stopped (what it said stays in the conversation)")

    def fit(self) -> tuple[list[int], int] | None:
        """The prompt's ids and the reply's token budget, after dropping the oldest turns while
        the reply's room does not fit; None (and nothing dropped) if even the newest message
        alone cannot fit."""
        context = self.model.config.block_size
        room = min(self.params.max_new_tokens, context // 2)
        turns = list(self.turns)
        ids = prompt_ids(self.tokenizer, self.messages(turns))
        while len(ids) + room > context and len(turns) > 1:
            del turns[: _oldest_turn(turns)]
            ids = prompt_ids(self.tokenizer, self.messages(turns))
        if len(ids) >= context:
            return None
        dropped = len(self.turns) - len(turns)
        if dropped:
            self.note(
                f"the conversation passed the model's context ({context} tokens): dropped the "
                f"oldest {dropped} message{'s' if dropped > 1 else ''}"
            )
        self.turns = turns
        return ids, min(self.params.max_new_tokens, context - len(ids))


def _oldest_turn(turns: list[Message]) -> int:
    """How many messages the oldest turn is: its user message and the replies after it (never
    the newest message, the one to reply to)."""
    end = 1
    while end < len(turns) - 1 and turns[end]["role"] != "user":
        end += 1
    return end
