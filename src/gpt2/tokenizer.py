"""Tokenizers: text to integer ids and back.

Every tokenizer has the same small interface (`Tokenizer`) and saves itself as one JSON file,
``tokenizer.json``, which travels with the prepared data and with every checkpoint, so that a
model is never paired with the wrong vocabulary.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from gpt2.errors import UserError
from gpt2.files import read_json, write_json

TOKENIZER_FILE = "tokenizer.json"
EOT_TEXT = "<|endoftext|>"


class Tokenizer(ABC):
    """The interface shared by all tokenizers."""

    kind: ClassVar[str]  # the "type" written to tokenizer.json
    # A Jinja chat template (`gpt2.chat`), saved in tokenizer.json; None: the default one.
    chat_template: str | None = None

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """The number of ids, special tokens included: the model's ``vocab_size``."""

    @property
    def eot_token(self) -> int | None:
        """The end-of-text id, or None for a vocabulary without one (characters)."""
        return None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """The ids of ``text``; `UserError` if it cannot be encoded (a character outside a
        character vocabulary, a special token written in user text)."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; invalid UTF-8 from a byte-level vocabulary becomes U+FFFD."""

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of ``ids``; a byte-level tokenizer can split a character across ids."""
        return self.decode(ids).encode("utf-8")

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description with a ``type`` key, enough to rebuild it."""

    def save(self, folder: str | Path) -> Path:
        """Write ``tokenizer.json`` into ``folder`` (atomically) and return its path."""
        data = self.to_dict()
        if self.chat_template is not None:
            data["chat_template"] = self.chat_template
        return write_json(Path(folder) / TOKENIZER_FILE, data, indent=None)


class CharTokenizer(Tokenizer):
    """One id per character, the vocabulary being the sorted set of characters in a corpus."""

    kind = "char"

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars = sorted(set(chars))
        if not self.chars:
            raise UserError("a character vocabulary needs at least one character")
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The vocabulary of every distinct character in ``text``."""
        return cls(set(text))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self.stoi})
            shown = ", ".join(repr(c) for c in unknown[:10])
            raise UserError(
                f"text has {len(unknown)} character(s) outside this model's vocabulary: {shown}"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "chars": self.chars}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharTokenizer:
        """Rebuild from `to_dict`'s output (``{"type": "char", "chars": [...]}``)."""
        return cls(data["chars"])


# GPT-2's pre-tokenization: contractions, letters, digits, other symbols, runs of white space.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    BPE files store tokens as text; bytes that are not printable (controls, space) are moved to
    code points from 256 upwards so that every token is a visible string with no white space.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


@lru_cache(maxsize=1)
def gpt2_mergeable_ranks() -> dict[bytes, int]:
    """GPT-2's token byte strings and their ranks (= ids), from the cached ``encoder.json``.

    In GPT-2 the id of every token equals its merge rank (the 256 bytes first, then the merges
    in order), so ``encoder.json`` alone gives tiktoken what it needs; ``vocab.bpe`` is checked
    to be present and intact because other tools need it beside ``encoder.json``.
    """
    from gpt2.assets import fetch

    encoder = json.loads(fetch("gpt2-tokenizer/encoder.json").read_text(encoding="utf-8"))
    fetch("gpt2-tokenizer/vocab.bpe")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    return {
        bytes(byte_of[c] for c in token): rank
        for token, rank in encoder.items()
        if token != EOT_TEXT
    }


class GPT2Tokenizer(Tokenizer):
    """OpenAI's GPT-2 byte-level BPE (50257 ids), encoded by tiktoken for speed."""

    kind = "gpt2"

    def __init__(self) -> None:
        import tiktoken

        ranks = gpt2_mergeable_ranks()
        self._eot = len(ranks)  # 50256: the last id
        self.enc = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={EOT_TEXT: self._eot},
        )

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def eot_token(self) -> int:
        return self._eot

    def encode(self, text: str, *, allowed_special: Any = frozenset()) -> list[int]:
        """Ordinary text; ``<|endoftext|>`` in it is refused unless listed in ``allowed_special``
        (or ``"all"``), the same rule as tiktoken's."""
        try:
            return self.enc.encode(text, allowed_special=allowed_special)
        except ValueError as e:
            raise UserError(str(e).splitlines()[0]) from None

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode treating special-token text as plain text."""
        return self.enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPT2Tokenizer:
        """GPT-2's fixed vocabulary: the description holds nothing but its type."""
        return cls()


# type name -> constructor from the JSON description; other modules register theirs here.
TOKENIZER_TYPES: dict[str, Callable[[dict[str, Any]], Tokenizer]] = {
    CharTokenizer.kind: CharTokenizer.from_dict,
    GPT2Tokenizer.kind: GPT2Tokenizer.from_dict,
}


# type name -> the module that registers it on import (loaded only when such a file is read).
TOKENIZER_MODULES = {"bpe": "gpt2.bpe"}


def tokenizer_from_dict(data: dict[str, Any]) -> Tokenizer:
    """The tokenizer a ``tokenizer.json`` describes, by its ``type`` (`TOKENIZER_TYPES`); a type
    whose module registers it on import (`TOKENIZER_MODULES`) is imported first."""
    kind = data.get("type")
    if kind not in TOKENIZER_TYPES and kind in TOKENIZER_MODULES:
        importlib.import_module(TOKENIZER_MODULES[kind])
    if kind not in TOKENIZER_TYPES:
        raise UserError(f"unknown tokenizer type {kind!r}; known: {', '.join(TOKENIZER_TYPES)}")
    tokenizer = TOKENIZER_TYPES[kind](data)
    template = data.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise UserError("tokenizer.json has a chat_template that is not a string")
    tokenizer.chat_template = template
    return tokenizer


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer saved in ``folder/tokenizer.json``."""
    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"no {TOKENIZER_FILE} in {folder}")
    return tokenizer_from_dict(read_json(path))


def get_tokenizer(name: str, text: str | None = None) -> Tokenizer:
    """A tokenizer by name: ``char`` (vocabulary built from ``text``), ``gpt2``, or a folder
    holding a ``tokenizer.json``."""
    if name == "char":
        if text is None:
            raise UserError("the char tokenizer needs the corpus to build its vocabulary")
        return CharTokenizer.from_text(text)
    if name == "gpt2":
        return GPT2Tokenizer()
    if Path(name).is_dir():
        return load_tokenizer(name)
    raise UserError(
        f"unknown tokenizer {name!r}: use char, gpt2, or a folder with {TOKENIZER_FILE}"
    )
