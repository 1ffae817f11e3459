"""Byte-level BPE, GPT-2's algorithm, written to be read; and the files it comes in.

How GPT-2 turns text into ids:

1. Pre-tokenize: a regular expression cuts the text into words (``GPT2_PATTERN``: contractions,
   runs of letters, of digits, of other symbols, of white space), each with at most one leading
   space. No token ever crosses a word boundary.
2. Each word becomes its UTF-8 bytes, one part per byte.
3. Merge: among adjacent pairs of parts, the pair learned earliest in training (the lowest
   *rank*) is joined into one part, everywhere in the word; repeat until no pair is a merge.
4. Each part is a token: look up its id.

Special tokens (``<|endoftext|>``) are not text: ``encode`` refuses them unless allowed, the same
rule as tiktoken's, and ``encode_ordinary`` treats them as plain text.

Tokens are byte strings here. The files store them as text through GPT-2's byte-to-unicode map
(`gpt2.tokenizer.bytes_to_unicode`), which makes every byte a visible character:

- GPT-2's ``encoder.json`` (token -> id) + ``vocab.bpe`` (merges, one ``a b`` pair a line);
- Hugging Face's ``vocab.json`` + ``merges.txt``: the same two files under other names;
- tiktoken's ranks file (``gpt2.tiktoken``): ``base64(token) id`` lines, no merges (they are
  recovered, see `merges_from_ranks`);
- ours: ``tokenizer.json`` with ``"type": "bpe"`` (see `BPETokenizer.to_dict`).

This module is the reference. `BPETokenizer.tiktoken_encoding` gives the same vocabulary encoded
by tiktoken (much faster), when tiktoken would give identical ids.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Collection, Iterable, Iterator
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import regex

from gpt2.errors import UserError
from gpt2.files import read_json, write_text
from gpt2.tokenizer import EOT_TEXT, GPT2_PATTERN, TOKENIZER_TYPES, Tokenizer, bytes_to_unicode

log = logging.getLogger(__name__)

Pair = tuple[bytes, bytes]
SpecialSet = Collection[str] | Literal["all"]

WORD_CACHE_SIZE = 100_000  # words remembered with their ids; emptied when full
SINGLE_BYTES = tuple(bytes([b]) for b in range(256))
BYTE_TO_CHAR = bytes_to_unicode()
HF_MERGES_HEADER = "#version: 0.2"


# str.translate tables between a byte (as the code point of its value) and its visible character;
# a character outside GPT-2's alphabet is sent to U+FFFF, which no byte is, to be caught.
_TO_CHAR = {b: c for b, c in BYTE_TO_CHAR.items()}
_TO_BYTE = {**{b: 0xFFFF for b in range(256)}, **{ord(c): b for b, c in BYTE_TO_CHAR.items()}}


def token_to_text(token: bytes) -> str:
    """A token as the visible text the vocabulary files use (space is ``Ġ``, newline ``Ċ``)."""
    return token.decode("latin-1").translate(_TO_CHAR)


def text_to_token(text: str) -> bytes | None:
    """The bytes behind a vocabulary file's token text, or None if it is not byte-level text
    (an added special token such as ``<pad>`` spelled with other characters)."""
    try:
        return text.translate(_TO_BYTE).encode("latin-1")
    except UnicodeEncodeError:
        return None


def merge_pair(parts: list[bytes], pair: Pair) -> list[bytes]:
    """``parts`` with every occurrence of ``pair`` joined, scanning left to right
    (so ``a a a`` with the pair ``(a, a)`` becomes ``aa a``)."""
    first, second = pair
    out: list[bytes] = []
    i = 0
    while i < len(parts):
        if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
            out.append(first + second)
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return out


def bpe(piece: bytes, ranks: dict[Pair, int]) -> list[bytes]:
    """Split ``piece`` into tokens: merge the lowest-ranked adjacent pair until none is left.

    This is GPT-2's loop (``encoder.py``'s ``bpe``) on bytes instead of mapped characters.
    """
    parts = [SINGLE_BYTES[b] for b in piece]
    while len(parts) > 1:
        pairs = zip(parts, parts[1:], strict=False)
        best = min(pairs, key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        parts = merge_pair(parts, best)
    return parts


def merges_from_ranks(ranks: dict[bytes, int]) -> list[Pair]:
    """The merges behind a tiktoken ranks table (multi-byte tokens in rank order).

    A token is made by the merge that BPE ends with when it encodes the token's bytes using only
    the merges ranked before it: that leaves exactly two parts. A token that BPE cannot reach
    that way (more than two parts left) is still given its split into the last two parts, so
    that it stays in the vocabulary; tiktoken looks whole words up directly, BPE never makes it.
    """
    merge_rank: dict[Pair, int] = {}
    for token in sorted((t for t in ranks if len(t) > 1), key=ranks.__getitem__):
        parts = bpe(token, merge_rank)
        if len(parts) < 2:
            raise UserError(f"the ranks table holds token {token!r} twice")
        merge_rank[(b"".join(parts[:-1]), parts[-1])] = len(merge_rank)
    return list(merge_rank)


class BPETokenizer(Tokenizer):
    """A byte-level BPE vocabulary: token bytes -> id, the merges in rank order, special tokens.

    Build one with `from_gpt2_files`, `from_hf_files`, `from_tiktoken_file`, `gpt2`, or
    `gpt2.bpe_train.train_bpe`; save it with `save` (``tokenizer.json``) or `save_hf`.
    """

    kind = "bpe"

    def __init__(
        self,
        vocab: dict[bytes, int],
        merges: list[Pair],
        special_tokens: dict[str, int] | None = None,
        pattern: str = GPT2_PATTERN,
        name: str = "bpe",
    ) -> None:
        self.vocab = dict(vocab)
        self.merges = list(merges)
        self.special_tokens = dict(special_tokens or {})
        self.pattern = pattern
        self.name = name
        self.ranks: dict[Pair, int] = {pair: rank for rank, pair in enumerate(self.merges)}
        self.id_to_bytes: dict[int, bytes] = {i: t for t, i in self.vocab.items()}
        self.id_to_bytes.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})
        self._check()
        try:
            self._words = regex.compile(pattern)
        except regex.error as e:
            raise UserError(f"bad pre-tokenization pattern {pattern!r}: {e}") from None
        self._special_re = (
            regex.compile(
                "|".join(
                    regex.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True)
                )
            )
            if self.special_tokens
            else None
        )
        self._cache: dict[str, list[int]] = {}

    def _check(self) -> None:
        """Refuse a vocabulary that BPE cannot run on, naming the first problem."""
        missing = [b for b in SINGLE_BYTES if b not in self.vocab]
        if missing:
            raise UserError(
                f"a byte-level vocabulary needs all 256 bytes; {len(missing)} missing, e.g. {missing[0]!r}"
            )
        if len(self.ranks) != len(self.merges):
            raise UserError("the merges list holds the same pair twice")
        for first, second in self.merges:
            for part in (first, second, first + second):
                if part not in self.vocab:
                    raise UserError(
                        f"merge {token_to_text(first)} {token_to_text(second)}: {token_to_text(part)!r} is not in the vocabulary"
                    )
        n_ids = len(self.vocab) + len(self.special_tokens)
        if len(self.id_to_bytes) != n_ids:
            raise UserError("two tokens share one id")

    # --- the interface every tokenizer has ---------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return max(self.id_to_bytes) + 1

    @property
    def eot_token(self) -> int | None:
        return self.special_tokens.get(EOT_TEXT)

    def encode(
        self,
        text: str,
        *,
        allowed_special: SpecialSet = frozenset(),
        disallowed_special: SpecialSet = "all",
    ) -> list[int]:
        """The ids of ``text``, with tiktoken's rule for special tokens: one written in the text
        is encoded as the special id if it is in ``allowed_special`` (or that is ``"all"``);
        otherwise, if it is in ``disallowed_special`` (by default every special token), it is
        an error, since text from users must not smuggle in control tokens."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        disallowed = (
            set(self.special_tokens) if disallowed_special == "all" else set(disallowed_special)
        )
        disallowed -= allowed
        if disallowed and self._special_re is not None:
            for match in self._special_re.finditer(text):
                if match.group() in disallowed:
                    raise UserError(
                        f"text contains the special token {match.group()!r}; pass it in "
                        "allowed_special to encode it as one, or use encode_ordinary to encode it as text"
                    )
        if not allowed or self._special_re is None:
            return self.encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for match in self._special_re.finditer(text):
            if match.group() in allowed:
                ids += self.encode_ordinary(text[start : match.start()])
                ids.append(self.special_tokens[match.group()])
                start = match.end()
        ids += self.encode_ordinary(text[start:])
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """The ids of ``text`` read as plain text (special-token spellings included)."""
        ids: list[int] = []
        for word in self._words.findall(text):
            ids += self._encode_word(word)
        return ids

    def _encode_word(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            ids = [self.vocab[part] for part in bpe(word.encode("utf-8"), self.ranks)]
            if len(self._cache) >= WORD_CACHE_SIZE:
                self._cache.clear()  # bounded memory on corpora with endless new words
            self._cache[word] = ids
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return b"".join(self.id_to_bytes[i] for i in ids)
        except KeyError as e:
            raise UserError(
                f"token id {e.args[0]} is not in this vocabulary of {self.vocab_size}"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 become U+FFFD, as tiktoken's
        ``decode(errors="replace")`` does."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- the fast path -----------------------------------------------------------------------

    @cached_property
    def tiktoken_mismatch(self) -> str | None:
        """Why tiktoken would encode this vocabulary differently, or None when it would not.

        tiktoken merges the adjacent pair whose *joined bytes* have the lowest id, and looks
        whole words up directly. That equals merging by rank when (1) the ids of merged tokens
        rise with their merge rank and (2) BPE on each token's own bytes, with the merges
        ranked before it, ends in exactly the merge that makes it.
        """
        if self.pattern != GPT2_PATTERN:
            return "its pre-tokenization pattern is not GPT-2's (only that one is checked against tiktoken's)"
        last_id = -1
        for rank, (first, second) in enumerate(self.merges):
            token = first + second
            if self.vocab[token] <= last_id:
                return f"token {token_to_text(token)!r} has an id below an earlier merge's"
            last_id = self.vocab[token]
            if self.ranks.get((first, second)) != rank:  # pragma: no cover - checked in _check
                return "duplicate merges"
        ranks_before: dict[Pair, int] = {}
        for first, second in self.merges:
            parts = bpe(first + second, ranks_before)
            if parts != [first, second]:
                return f"token {token_to_text(first + second)!r} is not reached by its own merge"
            ranks_before[(first, second)] = len(ranks_before)
        if self.vocab_size != len(self.id_to_bytes):
            return "the ids are not contiguous"
        return None

    def tiktoken_encoding(self) -> Any | None:
        """A ``tiktoken.Encoding`` giving the same ids as this tokenizer, or None when tiktoken
        is not installed or would differ (see `tiktoken_mismatch`)."""
        if self.tiktoken_mismatch is not None:
            return None
        try:
            import tiktoken
        except ImportError:
            return None
        try:
            return tiktoken.Encoding(
                name=self.name,
                pat_str=self.pattern,
                mergeable_ranks=self.vocab,
                special_tokens=self.special_tokens,
            )
        except ValueError:  # a pattern tiktoken's regex engine does not accept
            return None

    # --- our own file: tokenizer.json --------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild it; tokens written as in Hugging Face's files."""
        return {
            "type": self.kind,
            "name": self.name,
            "pattern": self.pattern,
            "vocab": {
                token_to_text(t): i for t, i in sorted(self.vocab.items(), key=lambda kv: kv[1])
            },
            "merges": [f"{token_to_text(a)} {token_to_text(b)}" for a, b in self.merges],
            "special_tokens": self.special_tokens,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BPETokenizer:
        """Rebuild from `to_dict`'s description (a ``tokenizer.json`` of type ``bpe``)."""
        try:
            vocab, _ = _vocab_from_texts(data["vocab"], set(data["special_tokens"]))
            return cls(
                vocab,
                [_parse_merge(line) for line in data["merges"]],
                special_tokens=data["special_tokens"],
                pattern=data.get("pattern", GPT2_PATTERN),
                name=data.get("name", "bpe"),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise UserError(
                f"a bpe tokenizer.json is missing or has a malformed field: {e}"
            ) from None

    # --- GPT-2's files ----------------------------------------------------------------------

    @classmethod
    def from_gpt2_files(
        cls, encoder_json: str | Path, vocab_bpe: str | Path, name: str = "gpt2"
    ) -> BPETokenizer:
        """OpenAI's ``encoder.json`` + ``vocab.bpe`` (the format Hugging Face copied)."""
        return cls.from_hf_files(encoder_json, vocab_bpe, name=name)

    @classmethod
    def gpt2(cls) -> BPETokenizer:
        """GPT-2's own vocabulary (50257 ids) from the asset cache, on the readable encoder."""
        from gpt2.assets import fetch

        return cls.from_gpt2_files(
            fetch("gpt2-tokenizer/encoder.json"), fetch("gpt2-tokenizer/vocab.bpe")
        )

    # --- Hugging Face's files ----------------------------------------------------------------

    @classmethod
    def from_hf_files(
        cls,
        vocab_json: str | Path,
        merges_txt: str | Path,
        special_tokens: Iterable[str] | None = None,
        name: str = "bpe",
    ) -> BPETokenizer:
        """Hugging Face's ``vocab.json`` + ``merges.txt`` (a GPT-2-style byte-level BPE).

        The special tokens are those named in ``special_tokens``; when not given, every
        vocabulary entry that is neither a byte nor made by a merge (``<|endoftext|>``).
        """
        texts = _read_json_object(vocab_json)
        merges = [_parse_merge(line, merges_txt, n) for n, line in _merge_lines(merges_txt)]
        if special_tokens is None:
            products = {token_to_text(a + b) for a, b in merges}
            singles = {BYTE_TO_CHAR[b] for b in range(256)}
            special_tokens = [t for t in texts if t not in products and t not in singles]
        vocab, specials = _vocab_from_texts(texts, set(special_tokens))
        return cls(vocab, merges, special_tokens=specials, name=name)

    def save_hf(self, folder: str | Path) -> tuple[Path, Path]:
        """Write ``vocab.json`` and ``merges.txt`` (special tokens included in the vocabulary),
        readable by ``transformers.GPT2TokenizerFast(vocab_file, merges_file)``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab = {token_to_text(t): i for t, i in self.vocab.items()}
        vocab.update(self.special_tokens)
        vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
        vocab_path = write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
        lines = [
            HF_MERGES_HEADER,
            *(f"{token_to_text(a)} {token_to_text(b)}" for a, b in self.merges),
        ]
        merges_path = write_text(folder / "merges.txt", "\n".join(lines) + "\n")
        return vocab_path, merges_path

    # --- tiktoken's ranks file ---------------------------------------------------------------

    @classmethod
    def from_tiktoken_file(
        cls,
        path: str | Path,
        special_tokens: dict[str, int] | None = None,
        pattern: str = GPT2_PATTERN,
        name: str = "bpe",
    ) -> BPETokenizer:
        """A tiktoken ranks file (``base64-token rank`` lines). It holds no special tokens:
        by default ``<|endoftext|>`` gets the id after the last rank, as in GPT-2."""
        ranks: dict[bytes, int] = {}
        for n, line in _numbered_lines(path):
            fields = line.split()
            try:
                token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
            except (IndexError, ValueError):
                raise UserError(
                    f"{path}:{n}: expected 'base64-token rank', got {line[:60]!r}"
                ) from None
            ranks[token] = rank
        if special_tokens is None:
            special_tokens = {EOT_TEXT: max(ranks.values(), default=-1) + 1}
        return cls(
            ranks,
            merges_from_ranks(ranks),
            special_tokens=special_tokens,
            pattern=pattern,
            name=name,
        )

    def save_tiktoken(self, path: str | Path) -> Path:
        """Write a tiktoken ranks file (its ranks are our ids; special tokens are not in it)."""
        lines = (
            f"{base64.b64encode(t).decode('ascii')} {i}"
            for t, i in sorted(self.vocab.items(), key=lambda kv: kv[1])
        )
        return write_text(Path(path), "\n".join(lines) + "\n")


TOKENIZER_TYPES[BPETokenizer.kind] = BPETokenizer.from_dict


def ordinary_encoder(tokenizer: Tokenizer, fast: bool = True) -> Callable[[str], np.ndarray]:
    """A function from text to its ids (uint32), special-token spellings read as plain text.

    With ``fast``, GPT-2 and every BPE vocabulary that tiktoken encodes identically go through
    tiktoken; without it, BPE vocabularies (GPT-2's included) go through the readable
    `BPETokenizer`, the reference. Other tokenizers use their own ``encode``.
    """
    from gpt2.tokenizer import GPT2Tokenizer

    if isinstance(tokenizer, GPT2Tokenizer):
        if fast:
            return partial(tokenizer.enc.encode_to_numpy, disallowed_special=())
        tokenizer = BPETokenizer.gpt2()
    if isinstance(tokenizer, BPETokenizer):
        encoding = tokenizer.tiktoken_encoding() if fast else None
        if encoding is not None:
            return partial(encoding.encode_to_numpy, disallowed_special=())
        if fast:
            log.info(
                "encoding with the readable BPE: tiktoken would differ (%s)",
                tokenizer.tiktoken_mismatch,
            )
        encode = tokenizer.encode_ordinary
    else:
        encode = tokenizer.encode
    return lambda text: np.asarray(encode(text), dtype=np.uint32)


# --- file helpers ---------------------------------------------------------------------------


def _numbered_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, line) for the non-blank lines of a UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield n, line


def _merge_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """The merge lines of a ``merges.txt``/``vocab.bpe``, without its ``#version`` header."""
    for n, line in _numbered_lines(path):
        if not (n == 1 and line.startswith("#version")):
            yield n, line


def _parse_merge(line: str, path: str | Path = "merges", n: int = 0) -> Pair:
    fields = line.split(" ")
    pair = tuple(text_to_token(f) for f in fields)
    if len(pair) != 2 or None in pair or not all(pair):
        raise UserError(
            f"{path}:{n}: expected a merge 'a b' of two byte-level tokens, got {line[:60]!r}"
        )
    return pair  # type: ignore[return-value]


def _read_json_object(path: str | Path) -> dict[str, int]:
    path = Path(path)
    data = read_json(path)
    if not all(isinstance(i, int) for i in data.values()):
        raise UserError(f"{path} should map token text to integer ids")
    return data


def _vocab_from_texts(
    texts: dict[str, int], specials: set[str]
) -> tuple[dict[bytes, int], dict[str, int]]:
    """Split a file's token -> id map into byte tokens and special tokens."""
    vocab: dict[bytes, int] = {}
    special_tokens: dict[str, int] = {}
    for text, i in texts.items():
        token = None if text in specials else text_to_token(text)
        if token is None:
            special_tokens[text] = i
        elif token in vocab:
            raise UserError(f"the vocabulary holds token {text!r} twice")
        else:
            vocab[token] = i
    return vocab, special_tokens
