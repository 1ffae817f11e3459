"""``gpt2 chat`` driven through stdin: replies are the template's prompt continued by the model,
the history, /system and /reset, dropping old turns past the context, Ctrl-C mid-reply and at
the prompt, and bad input in one line.

The replies come from a tiny random model: what is checked is which ids the model is given
(against `gpt2.chat.prompt_ids`) and that what is printed is what is kept, not what it says.
"""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cache_free import cache_free_greedy
from test_generate_cli import random_checkpoint

from gpt2 import generate
from gpt2.chat import prompt_ids
from gpt2.checkpoint import load_checkpoint
from gpt2.cli import main
from gpt2.commands import chat as chat_command
from gpt2.tokenizer import CharTokenizer, GPT2Tokenizer

EOT = 50256
CONTEXT = 64
SYSTEM = {"role": "system", "content": "Be terse."}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, tok) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt", tok, CONTEXT)


class Talk:
    """One session of ``gpt2 chat`` on ``lines``: what it printed, and each reply's prompt ids
    and generated text, recorded on the way to the real `gpt2.generate.stream`."""

    def __init__(
        self, monkeypatch, capsys, ckpt: Path, lines: list[str], *args: str, ctrl_c_after=None
    ) -> None:
        self.prompts: list[list[int]] = []
        self.generated: list[str] = []
        self.ctrl_c_after: int | None = ctrl_c_after  # pieces of the first reply, then Ctrl-C
        monkeypatch.setattr(chat_command, "stream", self.stream)
        monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
        self.code = main(["chat", "--checkpoint", str(ckpt), *args])
        self.out, self.err = capsys.readouterr()

    def stream(self, model, tokenizer, ids, params) -> Iterator[str]:
        self.prompts.append(list(ids))
        self.generated.append("")
        for i, piece in enumerate(generate.stream(model, tokenizer, ids, params)):
            if len(self.prompts) == 1 and i == self.ctrl_c_after:
                raise KeyboardInterrupt  # what Ctrl-C raises in the middle of the decode loop
            self.generated[-1] += piece
            yield piece

    @property
    def replies(self) -> list[str]:
        """The replies as kept: the generated text less the template's lead (a space)."""
        return [g.removeprefix(" ") for g in self.generated]


def test_a_reply_is_the_templates_prompt_continued_by_the_model(monkeypatch, capsys, ckpt, tok):
    args = ("--system", "Be terse.", "--temperature", "0", "--max-new-tokens", "8")
    talk = Talk(monkeypatch, capsys, ckpt, ["What is 37 + 45?"], *args)
    assert talk.code == 0, talk.err
    ids = prompt_ids(tok, [SYSTEM, user("What is 37 + 45?")])
    assert talk.prompts == [ids]
    gen = cache_free_greedy(load_checkpoint(ckpt).model.eval(), ids, 8)
    text = tok.decode(gen[: gen.index(EOT)] if EOT in gen else gen)
    assert talk.out == text.removeprefix(" ") + "\n"
    assert talk.err == ""  # no note: nothing dropped, nothing stopped


def test_history_system_and_reset(monkeypatch, capsys, ckpt, tok):
    lines = ["/system Be terse.", "Hi", "How are you?", "/reset", "Bye", "/system", "Again"]
    lines += ["/nope", "", "/exit", "never read"]
    talk = Talk(monkeypatch, capsys, ckpt, lines, "--max-new-tokens", "4")
    assert talk.code == 0, talk.err
    r = talk.replies
    assert talk.prompts == [
        prompt_ids(tok, [SYSTEM, user("Hi")]),
        prompt_ids(tok, [SYSTEM, user("Hi"), assistant(r[0]), user("How are you?")]),
        prompt_ids(tok, [SYSTEM, user("Bye")]),  # reset: the system message stays
        prompt_ids(tok, [user("Bye"), assistant(r[2]), user("Again")]),  # removed
    ]
    assert talk.out == "".join(f"{reply}\n" for reply in r)  # printed as kept
    assert talk.err.splitlines() == [
        "gpt2 chat: system message set",
        "gpt2 chat: the conversation is cleared",
        "gpt2 chat: system message removed",
        "gpt2 chat: unknown command /nope; the commands are /reset, /system TEXT, /exit",
    ]


def test_past_the_context_the_oldest_turns_go_but_the_system_message_stays(
    monkeypatch, capsys, ckpt, tok
):
    questions = [f"Tell me about the weather in city number {i} today." for i in range(5)]
    args = ("--system", "Be terse.", "--max-new-tokens", "8", "--temperature", "0")
    talk = Talk(monkeypatch, capsys, ckpt, questions, *args)
    assert talk.code == 0, talk.err
    notes = talk.err.splitlines()
    assert notes and all(
        n.startswith("gpt2 chat: the conversation passed the model's context (64 tokens): ")
        for n in notes
    )
    conversation = []
    for question, reply, ids in zip(questions, talk.replies, talk.prompts, strict=True):
        conversation.append(user(question))
        assert len(ids) + 8 <= CONTEXT  # room for the whole reply
        # the prompt is the system message and the newest turns, whole
        starts = range(0, len(conversation), 2)  # where each turn's user message is
        assert any(ids == prompt_ids(tok, [SYSTEM, *conversation[k:]]) for k in starts)
        conversation.append(assistant(reply))
    assert ids != prompt_ids(tok, [SYSTEM, *conversation[:-1]])  # something was dropped
    assert "dropped the oldest 2 messages" in notes[0]


def test_a_message_too_long_or_with_end_of_text_is_refused_and_the_session_goes_on(
    monkeypatch, capsys, ckpt, tok
):
    lines = ["hi", "word " * 80, "a<|endoftext|>b", "bye"]
    talk = Talk(monkeypatch, capsys, ckpt, lines, "--max-new-tokens", "2")
    assert talk.code == 0
    assert talk.err.splitlines() == [
        "gpt2 chat: that message is too long for the model's context (64 tokens), even alone; "
        "it was not sent",
        "gpt2 chat: not sent: the message holds <|endoftext|>, which only the template may write",
    ]
    r = talk.replies
    assert talk.prompts[1] == prompt_ids(tok, [user("hi"), assistant(r[0]), user("bye")])


def test_ctrl_c_mid_reply_stops_it_and_keeps_what_it_said(monkeypatch, capsys, ckpt, tok):
    lines = ["Hi", "Go on"]
    talk = Talk(monkeypatch, capsys, ckpt, lines, "--max-new-tokens", "6", ctrl_c_after=2)
    assert talk.code == 0, talk.err
    partial, second = talk.replies
    assert partial  # two pieces were printed before the Ctrl-C
    assert talk.err == "gpt2 chat: reply stopped (what it said stays in the conversation)\n"
    assert talk.prompts[1] == prompt_ids(tok, [user("Hi"), assistant(partial), user("Go on")])
    assert talk.out == f"{partial}\n{second}\n"


def test_ctrl_c_or_end_of_input_at_the_prompt_ends_the_session(monkeypatch, capsys, ckpt):
    class CtrlC(io.StringIO):
        def readline(self, *args) -> str:
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", CtrlC())
    assert main(["chat", "--checkpoint", str(ckpt)]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["chat", "--checkpoint", str(ckpt)]) == 0
    assert capsys.readouterr() == ("", "")


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, ckpt, capsys):
    chars = random_checkpoint(tmp_path / "chars", CharTokenizer("abc :\n"), 16)
    assert main(["chat", "--checkpoint", str(chars)]) == 2
    assert main(["chat", "--checkpoint", str(ckpt), "--top-p", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("gpt2 chat: error: ") for line in err)
    assert "chat needs a tokenizer with an end-of-text token" in err[0]
    assert "--top-p must be in (0, 1]" in err[1]


def test_the_command_reads_a_piped_stdin(ckpt, tok):
    args = ["--temperature", "0", "--max-new-tokens", "3"]
    cmd = [sys.executable, "-m", "gpt2", "chat", "--checkpoint", str(ckpt), *args]
    done = subprocess.run(cmd, input="Hi\n", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    gen = cache_free_greedy(load_checkpoint(ckpt).model.eval(), prompt_ids(tok, [user("Hi")]), 3)
    text = tok.decode(gen[: gen.index(EOT)] if EOT in gen else gen)
    assert (done.stdout, done.stderr) == (text.removeprefix(" ") + "\n", "")
