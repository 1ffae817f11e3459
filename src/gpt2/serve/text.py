"""Token ids to text as they are generated, for one choice.

Two things keep text from being sent as soon as a token arrives:

- a byte-level token can end in the middle of a UTF-8 character: its bytes wait for the rest
  (Python's incremental UTF-8 decoder does exactly this);
- the end of the text may be the beginning of a stop string: it waits until the next tokens show
  whether the stop string follows. When it does, the text is cut where the stop string starts,
  and the stop string itself is never sent, as in OpenAI's API.

Each released piece carries the tokens whose text it completes, so that a streamed chunk's
``logprobs`` line up with its ``text``.
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
    """Text ready to send, and the tokens it completes."""

    text: str = ""
    tokens: list[TokenText] = field(default_factory=list)
    stopped: bool = False  # a stop string was found: the choice is over


class CompletionText:
    """Accumulates one choice's tokens and releases text that is final."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far
        self.released = 0  # characters of self.text already sent
        self._pending: list[tuple[TokenText, int]] = []  # tokens not yet sent, with their end
        self.n_tokens = 0  # tokens consumed (the stop cut may leave some unsent)

    def add(self, token: int, info: Any = None) -> Piece:
        """Take one more token; return what can be sent now."""
        start = len(self.text)
        self.text += self._utf8.decode(self.tokenizer.decode_bytes([token]))
        own = TokenText(token, self.tokenizer.decode([token]), start, info)
        self._pending.append((own, len(self.text)))
        self.n_tokens += 1
        cut = self._find_stop()
        if cut is not None:
            self.text = self.text[:cut]
            return self._release(cut, stopped=True)
        return self._release(len(self.text) - self._held_back())

    def finish(self) -> Piece:
        """The choice ended (length or end of text): send everything still held."""
        self.text += self._utf8.decode(b"", final=True)
        cut = self._find_stop()
        if cut is not None:
            self.text = self.text[:cut]
            return self._release(cut, stopped=True)
        return self._release(len(self.text))

    def _find_stop(self) -> int | None:
        """Where the earliest stop string starts; none can start in released text (it was held)."""
        found = [i for s in self.stop if (i := self.text.find(s, self.released)) >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """The length of the longest end of the text that is a proper prefix of a stop string."""
        unsent = len(self.text) - self.released
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, unsent), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _release(self, upto: int, stopped: bool = False) -> Piece:
        piece = Piece(self.text[self.released : upto], stopped=stopped)
        self.released = max(self.released, upto)
        keep = []
        for tok, end in self._pending:
            # At a stop, a token that began before the cut is sent; otherwise only whole ones.
            done = tok.offset < upto if stopped else end <= upto
            if done:
                piece.tokens.append(tok)
            elif not stopped:
                keep.append((tok, end))
        self._pending = keep
        return piece
