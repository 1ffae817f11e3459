"""Generated token ids to text, piece by piece, as they arrive.

Two things hold text back instead of releasing it with its token:

- a byte-level token can end inside a multi-byte UTF-8 character (an emoji is often split across
  two or three tokens): its bytes wait for the rest, through Python's incremental UTF-8 decoder,
  so a released piece never holds half a character;
- the end of the text may be the beginning of a stop string: it waits until the next tokens say
  whether the stop string follows. If it does, the text ends where the stop string starts and the
  stop string itself is never released, as in OpenAI's API.

The concatenation of all released pieces is the final text. Each piece also carries the tokens
whose text it completes, each with its own text and offset, so that a streamed chunk's log
probabilities line up with its text.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Any

from gpt2.tokenizer import Tokenizer


@dataclass(frozen=True)
class TokenText:
    """A generated token, its own text, and where that text starts in the completion."""

    id: int
    text: str
    offset: int  # characters into the completion text
    info: Any = None  # whatever the caller attached (its log probabilities)


@dataclass
class Piece:
    """Text ready to release, and the tokens it completes."""

    text: str = ""
    tokens: list[TokenText] = field(default_factory=list)
    stopped: bool = False  # a stop string was found: the sequence is over

    def __add__(self, other: Piece) -> Piece:
        return Piece(
            self.text + other.text, self.tokens + other.tokens, self.stopped or other.stopped
        )


class IncrementalText:
    """The text of one sequence's generated tokens, released as it becomes safe to show."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] | list[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # decoded so far (cut at a stop string once one is found)
        self.released = 0  # characters of ``text`` already handed out
        self.stopped = False  # a stop string was found
        self._pending: list[tuple[TokenText, int]] = []  # tokens not yet released, with their end

    def add(self, token: int, info: Any = None) -> Piece:
        """Take one generated token; return what is now safe to release (maybe nothing)."""
        if self.stopped:
            return Piece(stopped=True)
        start = len(self.text)
        self.text += self._utf8.decode(self.tokenizer.decode_bytes([token]))
        own = TokenText(token, self.tokenizer.decode([token]), start, info)
        self._pending.append((own, len(self.text)))
        if not self.stop:
            return self._release(len(self.text))
        if self._cut_at_stop(max(0, start - self._longest_stop + 1)):
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held_back())

    def finish(self) -> Piece:
        """The sequence is over: release what was held (a dangling partial character becomes
        U+FFFD, as in a one-shot decode with errors="replace")."""
        if not self.stopped:
            start = len(self.text)
            self.text += self._utf8.decode(b"", final=True)
            self._cut_at_stop(max(0, start - self._longest_stop + 1))
        return self._release(len(self.text))

    def _cut_at_stop(self, since: int) -> bool:
        """Cut the text where the earliest stop string in ``text[since:]`` starts, if any does."""
        hits = [i for s in self.stop if (i := self.text.find(s, since)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return self.stopped

    def _held_back(self) -> int:
        """Length of the longest end of ``text`` that is the start of some stop string."""
        for n in range(min(self._longest_stop - 1, len(self.text) - self.released), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _release(self, upto: int) -> Piece:
        piece = Piece(self.text[self.released : upto], stopped=self.stopped)
        self.released = max(self.released, upto)
        keep = []
        for tok, end in self._pending:
            # At a stop, a token that began before the cut is released; otherwise whole ones.
            if (tok.offset < upto) if self.stopped else (end <= upto):
                piece.tokens.append(tok)
            elif not self.stopped:
                keep.append((tok, end))
        self._pending = keep
        return piece


def decode_all(tokenizer: Tokenizer, ids: list[int]) -> Piece:
    """The whole text of ``ids`` with each token's own text and offset."""
    text = IncrementalText(tokenizer)
    piece = Piece()
    for t in ids:
        piece = piece + text.add(t)
    return piece + text.finish()
