"""Generated token ids to text, piece by piece, as they arrive.

Two things hold text back instead of releasing it with its token:

- a byte-level token can end inside a multi-byte UTF-8 character (an emoji is often split across
  two or three tokens): its bytes wait for the rest, through Python's incremental UTF-8 decoder,
  so a released piece never holds half a character;
- the end of the text may be the beginning of a stop string: it waits until the next tokens say
  whether the stop string follows. If it does, the text ends where the stop string starts and the
  stop string itself is never released.

The concatenation of all released pieces is the final text.
"""

from __future__ import annotations

import codecs

from gpt2.tokenizer import Tokenizer


class IncrementalText:
    """The text of one sequence's generated tokens, released as it becomes safe to show."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self._longest_stop = max((len(s) for s in stop), default=0)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # decoded so far (cut at a stop string once one is found)
        self.released = 0  # characters of ``text`` already handed out
        self.stopped = False  # a stop string was found

    def add(self, token: int) -> str:
        """Take one generated token; return the text that is now safe to release (maybe "")."""
        if self.stopped:
            return ""
        old = len(self.text)
        self.text += self._utf8.decode(self.tokenizer.decode_bytes([token]))
        if self.stop:
            hit = self._find_stop(max(0, old - self._longest_stop + 1))
            if hit is not None:
                self.text = self.text[:hit]
                self.stopped = True
                return self._release(len(self.text))
            return self._release(len(self.text) - self._held_back())
        return self._release(len(self.text))

    def finish(self) -> str:
        """The sequence is over: release what was held (a dangling partial character becomes
        U+FFFD, as in a one-shot decode with errors="replace")."""
        if not self.stopped:
            self.text += self._utf8.decode(b"", final=True)
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece = self.text[self.released : upto]
        self.released = max(self.released, upto)
        return piece

    def _find_stop(self, since: int) -> int | None:
        """Where the earliest stop string starts in ``text[since:]``, if any does."""
        hits = [i for s in self.stop if (i := self.text.find(s, since)) >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest end of ``text`` that is the start of some stop string."""
        for n in range(min(self._longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
