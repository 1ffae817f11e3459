"""Reading a corpus as one stream of documents, in pieces small enough to hold in memory.

A corpus is a list of *sources*, read in order:

- a text file: one document (a large file is read in pieces of about `PIECE_BYTES`);
- a ``.jsonl`` or ``.jsonl.gz`` file: one document per line, its ``text`` field;
- a ``.parquet`` file: one document per row, its ``text`` column (needs ``pyarrow``);
- a Hugging Face dataset, streamed (needs ``datasets``); a folder written by
  ``Dataset.save_to_disk`` is read from disk.

A folder given as input stands for the files with those suffixes under it, sorted by path.

For ``gpt2 prepare --chat`` (``chat=True``) a document is a *conversation*: the list of
OpenAI-style messages in a JSONL line's ``messages`` field (or a Parquet/dataset column of that
name), checked by `gpt2.chat.check_messages`. Text files hold no conversations and are refused.

`read_corpus` yields `Piece`s; each carries the `Position` just after it, from which
`read_corpus` can start again: that is how an interrupted ``gpt2 prepare`` resumes without
reading the corpus again from the start.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from gpt2.chat import Message, check_messages
from gpt2.errors import UserError

log = logging.getLogger(__name__)

PIECE_BYTES = 1 << 20  # a text file is read in pieces of about this many bytes ...
MAX_PIECE_BYTES = 64 << 20  # ... cut anywhere if no safe place turns up in this many
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
OnBadLine = Literal["stop", "skip"]
Document = str | list[Message]  # a text, or a conversation (chat=True)

# Where a text may be cut (at a match's end) so that GPT-2's pre-tokenizer gives the same words on
# both sides as on the whole: after a newline that has a printable ASCII character on each side,
# or before a space between a printable character and a letter. No pattern joins a printable
# character to the white space after it, a lone newline before a printable character is a word
# of its own, and a space before a letter begins a word.
SAFE_CUT_BYTES = re.compile(rb"[\x21-\x7e]\n(?=[\x21-\x7e])|[\x21-\x7e](?= [A-Za-z])")
SAFE_CUT_TEXT = re.compile(r"[\x21-\x7e]\n(?=[\x21-\x7e])")  # newlines only: pieces end in "\n"


@dataclass(frozen=True)
class Source:
    """One input: a file of one of the kinds above, or a Hugging Face dataset."""

    kind: Literal["text", "jsonl", "parquet", "hf"]
    location: str  # a path, or the dataset's name or folder
    subset: str | None = None  # a Hugging Face dataset's configuration (e.g. sample-10BT)
    split: str = "train"  # a Hugging Face dataset's split

    def describe(self) -> dict[str, Any]:
        """What identifies this input, to tell a resumed run from a different one."""
        if self.kind == "hf":
            return {"hf": self.location, "subset": self.subset, "split": self.split}
        return {"file": self.location, "bytes": Path(self.location).stat().st_size}


@dataclass(frozen=True)
class Position:
    """A place in the corpus from which reading can start."""

    source: int = 0  # index into the list of sources
    offset: int = (
        0  # the source's own key: a byte offset (text, JSONL) or a row (Parquet, datasets)
    )
    line: int = 0  # lines (rows) of this source read so far, for messages
    doc: int = 0  # documents read so far, all sources together

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Piece:
    """Some text of one document: the whole of it, or a part of a large text file; or, for
    chat, a whole conversation."""

    text: Document
    doc: int  # the document's number (it decides train or val)
    ends_doc: bool  # the end-of-text token follows this piece
    after: Position  # where reading resumes after this piece


@dataclass
class ReadStats:
    """What reading found, for the summary."""

    documents: int = 0
    empty_documents: int = 0
    skipped_lines: int = 0
    replaced_characters: int = 0  # invalid UTF-8 sequences (or lone surrogates) made U+FFFD

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class ReadInterrupted(UserError):
    """Reading failed for a reason outside the corpus's content (the network, the Hub): a run
    that has made progress keeps its checkpoint, and the same command resumes it."""


# --- finding the inputs -------------------------------------------------------------------------


def file_kind(path: Path) -> Literal["text", "jsonl", "parquet"]:
    """How to read ``path``, from its name: JSONL and Parquet by suffix, anything else is text."""
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def find_sources(inputs: Sequence[str | Path], chat: bool = False) -> list[Source]:
    """The files behind ``inputs`` (files, or folders searched for the known suffixes; for
    ``chat``, JSONL and Parquet only)."""
    sources: list[Source] = []
    for given in inputs:
        path = Path(given)
        if not path.exists():
            raise UserError(f"input file not found: {path}")
        if chat and path.is_file() and file_kind(path) == "text":
            raise UserError(
                f"{path}: conversations are read from .jsonl or .parquet files, not text"
            )
        if path.is_dir():
            suffixes = (() if chat else TEXT_SUFFIXES) + JSONL_SUFFIXES + PARQUET_SUFFIXES
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes)
            )
            if not found:
                raise UserError(f"input folder {path} holds no {', '.join(suffixes)} files")
            sources += [Source(file_kind(p), str(p)) for p in found]
        else:
            sources.append(Source(file_kind(path), str(path)))
    if not sources:
        raise UserError("no input given")
    return sources


# --- reading ------------------------------------------------------------------------------------


def decode_utf8(data: bytes, stats: ReadStats) -> str:
    """``data`` as text; bytes that are not UTF-8 become U+FFFD and are counted."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        stats.replaced_characters += text.count("\ufffd") - data.count("\ufffd".encode())
        return text


def without_surrogates(text: str, stats: ReadStats) -> str:
    """JSON can spell lone UTF-16 surrogates (``"\\ud800"``), which no encoder accepts: they
    become U+FFFD, as tiktoken does with them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        stats.replaced_characters += fixed.count("\ufffd") - text.count("\ufffd")
        return fixed


def last_safe_cut(data: bytes) -> int:
    """The last place in ``data`` where a piece may end (see `SAFE_CUT_BYTES`), or 0."""
    for start in (max(0, len(data) - (64 << 10)), 0):
        last = 0
        for match in SAFE_CUT_BYTES.finditer(data, start):
            last = match.end()
        if last:
            return last
    return 0


def read_text(path: str | Path) -> str:
    """The UTF-8 text of ``path``, or a `UserError` saying why it cannot be used."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"input file not found: {path}")
    if not path.is_file():
        raise UserError(f"input is not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise UserError(f"input file is empty: {path}")
    return text


def text_chunks(text: str, size: int = 1 << 20) -> Iterator[str]:
    """Pieces of about ``size`` characters, cut only where GPT-2's pre-tokenizer gives the same
    words on both sides as on the whole text (`SAFE_CUT_TEXT`), so that encoding the
    pieces one by one gives exactly the ids of the whole, with progress to show.

    (A cut after any newline is not enough: ``"a\n\nb"`` is ``a``, ``\n``, ``\n``, ``b`` whole,
    but ``"a\n\n"`` alone ends in the one token ``\n\n``.)
    """
    start = 0
    while start < len(text):
        match = SAFE_CUT_TEXT.search(text, start + size) if start + size < len(text) else None
        end = match.end() if match else len(text)
        yield text[start:end]
        start = end


# A reader yields (text, ends_doc, next_offset, next_line) from a source, from an offset.
Raw = tuple[str, bool, int, int]


def read_text_file(path: str, offset: int, line: int, stats: ReadStats) -> Iterator[Raw]:
    """A text file as one document, in pieces cut at safe places (see `SAFE_CUT_BYTES`)."""
    with open(path, "rb") as f:
        f.seek(offset)
        buffer = b""
        while True:
            block = f.read(PIECE_BYTES)
            buffer += block
            if not block:  # the end of the file ends the document
                yield decode_utf8(buffer, stats), True, offset + len(buffer), line
                return
            if len(buffer) < PIECE_BYTES:
                continue
            cut = last_safe_cut(buffer)
            if not cut and len(buffer) < MAX_PIECE_BYTES:
                continue
            cut = cut or len(buffer)
            line += buffer.count(b"\n", 0, cut)
            offset += cut
            yield decode_utf8(buffer[:cut], stats), False, offset, line
            buffer = buffer[cut:]


def read_jsonl(
    path: str,
    offset: int,
    line: int,
    stats: ReadStats,
    field: str,
    on_bad_line: OnBadLine,
    chat: bool = False,
) -> Iterator[Raw]:
    """One document per line: the string in its ``field`` (for ``chat``, the conversation)."""
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            f.seek(offset)
            for raw in f:
                offset += len(raw)
                line += 1
                if not raw.strip():
                    continue
                doc = _json_document(raw, field, stats, chat)
                if not isinstance(doc, tuple):
                    yield doc, True, offset, line
                    continue
                bad_record(f"{path}:{line}: {doc[1]}", on_bad_line, stats)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise UserError(f"{path}: cannot read ({e})") from None


def bad_record(message: str, on_bad_line: OnBadLine, stats: ReadStats) -> None:
    """A line or row that holds no document: stop with ``message`` or count it as skipped."""
    if on_bad_line == "stop":
        raise UserError(f"{message} (pass --on-bad-line skip to skip such lines)")
    stats.skipped_lines += 1
    if stats.skipped_lines <= 10:
        log.warning("skipped %s", message)


def _json_document(
    raw: bytes, field: str, stats: ReadStats, chat: bool
) -> Document | tuple[None, str]:
    """The document in one JSONL line, or (None, why not)."""
    try:
        record = json.loads(decode_utf8(raw, stats))
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
    if chat:
        if not isinstance(record, dict) or field not in record:
            return None, f"no field {field!r} holding the conversation's messages"
        return conversation_of(record[field], field, stats)
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        return None, f"no string field {field!r}"
    maybe_surrogates = b"\\ud" in raw or b"\\uD" in raw  # only a \uDxxx escape spells one
    return without_surrogates(record[field], stats) if maybe_surrogates else record[field]


def conversation_of(value: Any, field: str, stats: ReadStats) -> list[Message] | tuple[None, str]:
    """``value`` checked as a conversation (`gpt2.chat.check_messages`), or (None, why not).
    Lone surrogates that JSON can spell in a content become U+FFFD, as in text documents."""
    try:
        messages = check_messages(value, field)
    except UserError as e:
        return None, str(e)
    for m in messages:
        m["content"] = without_surrogates(m["content"], stats)
    return messages


def read_parquet(path: str, offset: int, line: int, stats: ReadStats, field: str) -> Iterator[Raw]:
    """One document per row: the string in column ``field``, read a batch of rows at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading Parquet needs pyarrow: pip install 'gpt2[parquet]'") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a damaged file
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    if field not in parquet.schema_arrow.names:
        raise UserError(
            f"{path} has no column {field!r} (columns: {', '.join(parquet.schema_arrow.names)})"
        )
    # Skip whole row groups before the offset using the file's metadata, then rows.
    first_group, row = 0, 0
    while first_group < parquet.num_row_groups:
        rows = parquet.metadata.row_group(first_group).num_rows
        if row + rows > offset:
            break
        row += rows
        first_group += 1
    groups = range(first_group, parquet.num_row_groups)
    for batch in parquet.iter_batches(batch_size=1024, row_groups=groups, columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if row <= offset:
                continue
            yield value, True, row, row


def read_hf_dataset(source: Source, offset: int, field: str) -> Iterator[Raw]:
    """A Hugging Face dataset, one document per row, streamed (or read from a folder written by
    ``save_to_disk``): the row's ``field`` as it is (`read_source` checks it)."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            "reading a Hugging Face dataset needs the datasets package: pip install 'gpt2[datasets]'"
        ) from None
    folder = Path(source.location)
    try:
        if folder.is_dir() and any(
            (folder / f).is_file() for f in ("state.json", "dataset_dict.json")
        ):
            data = datasets.load_from_disk(str(folder))
            if isinstance(data, datasets.DatasetDict):
                data = data[source.split]
            rows: Any = data.to_iterable_dataset()
        else:
            rows = datasets.load_dataset(
                source.location, source.subset, split=source.split, streaming=True
            )
        if field not in (rows.column_names or [field]):
            raise UserError(
                f"dataset {source.location} has no column {field!r} (columns: {', '.join(rows.column_names)})"
            )
        rows = rows.skip(offset) if offset else rows
        for row in rows.select_columns([field]):
            offset += 1
            yield row[field], True, offset, offset
    except UserError:
        raise
    except (KeyError, ValueError, OSError) as e:  # a bad name or split, the network, the Hub
        raise ReadInterrupted(f"cannot read dataset {source.location!r}: {e}") from None


def read_source(
    source: Source,
    offset: int,
    line: int,
    stats: ReadStats,
    field: str,
    on_bad_line: OnBadLine,
    chat: bool = False,
) -> Iterator[Raw]:
    """The reader for ``source``'s kind, started at ``offset``. A Parquet or dataset row whose
    value is not a string is an empty text; for ``chat``, it must be a conversation."""
    if source.kind == "text":
        if chat:
            raise UserError(f"{source.location}: a text file holds no conversations")
        return read_text_file(source.location, offset, line, stats)
    if source.kind == "jsonl":
        return read_jsonl(source.location, offset, line, stats, field, on_bad_line, chat)
    if source.kind == "parquet":
        rows = read_parquet(source.location, offset, line, stats, field)
    else:
        rows = read_hf_dataset(source, offset, field)
    if not chat:
        return ((v if isinstance(v, str) else "", e, o, n) for v, e, o, n in rows)
    return _conversation_rows(rows, source, stats, field, on_bad_line)


def _conversation_rows(
    rows: Iterator[Raw], source: Source, stats: ReadStats, field: str, on_bad_line: OnBadLine
) -> Iterator[Raw]:
    """Parquet or dataset rows checked as conversations; a bad one stops or is skipped."""
    for value, ends_doc, offset, line in rows:
        doc = conversation_of(value, field, stats)
        if not isinstance(doc, tuple):
            yield doc, ends_doc, offset, line
            continue
        bad_record(f"{describe_row(source, line)}: {doc[1]}", on_bad_line, stats)


def describe_row(source: Source, line: int) -> str:
    """Where line (or row) ``line`` of ``source`` is, for a message: ``file:line``, ``file row
    N`` or ``dataset NAME row N`` (rows counted from 1)."""
    if source.kind in ("text", "jsonl"):
        return f"{source.location}:{line}"
    if source.kind == "parquet":
        return f"{source.location} row {line}"
    return f"dataset {source.location} row {line}"


def read_corpus(
    sources: Sequence[Source],
    start: Position = Position(),
    stats: ReadStats | None = None,
    field: str = "text",
    on_bad_line: OnBadLine = "stop",
    chat: bool = False,
) -> Iterator[Piece]:
    """Every piece of every document from ``start`` on, numbering the documents (for ``chat``,
    every conversation).

    Empty documents are skipped (counted in ``stats``): they would add nothing but an end-of-text.
    """
    stats = stats if stats is not None else ReadStats()
    doc = start.doc
    for i in range(start.source, len(sources)):
        offset, line = (start.offset, start.line) if i == start.source else (0, 0)
        in_doc = offset > 0 and sources[i].kind == "text"  # resuming inside a text file
        for text, ends_doc, next_offset, next_line in read_source(
            sources[i], offset, line, stats, field, on_bad_line, chat
        ):
            if not text and not in_doc:
                if ends_doc:
                    stats.empty_documents += 1
                continue
            in_doc = not ends_doc
            if ends_doc:
                stats.documents += 1
            if ends_doc and sources[i].kind == "text":  # the file is done: go on with the next
                after = Position(i + 1, 0, 0, doc + 1)
            else:
                after = Position(i, next_offset, next_line, doc + ends_doc)
            yield Piece(text, doc, ends_doc, after)
            doc += ends_doc
