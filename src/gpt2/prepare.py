"""``gpt2 prepare``'s pipeline: text in, token shards out (the format: `gpt2.shards`).

Two ways in, one way out:

- `prepare_text`: one text file. It is encoded whole (in pieces cut where the ids do not change,
  `gpt2.corpus.text_chunks`) and split by tokens: the last ``val_fraction`` of them validate.
  That gives one train and one val shard. Written to a temp folder that replaces ``out_dir``
  whole, so a failed re-prepare leaves the old folder intact.
- `prepare_shards`: a corpus (files, folders, JSONL, Parquet, a Hugging Face dataset). It streams:
  documents are read a batch at a time (`gpt2.corpus`), encoded by worker processes, and
  appended to the current shard of their split, so memory stays flat whatever the corpus size.
  Each document goes wholly to train or to val, chosen by its number.
- `prepare_shards` with ``chat=True``: conversations (docs/chat.md). Each is rendered by the
  tokenizer's chat template and encoded by `gpt2.chat.conversation_ids`, back to back with no
  separator of our own (the template's end-of-text closes each reply); a mask beside each shard
  says which tokens training learns (`gpt2.shards`). Resumed as any corpus is.

Resume (corpora). The shard being written is ``<name>.partial``; when full it is copied, header
filled in, to its final name (`gpt2.shards.ShardWriter`). ``progress.json`` records, every few
seconds and after every finished shard, where reading stopped and how many tokens each partial
holds; it is written only after the partials are flushed. A rerun after a crash or a kill reads
it, cuts each partial back to the recorded size, and goes on from the recorded place: the output
is byte-identical to an uninterrupted run.

Either way, a folder prepared with another tokenizer is refused rather than overwritten: a model
trained on it would read the new ids with the old vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gpt2.assets import sha256_file
from gpt2.corpus import (
    Document,
    OnBadLine,
    Position,
    ReadInterrupted,
    ReadStats,
    Source,
    describe_row,
    read_corpus,
    read_text,
    text_chunks,
)
from gpt2.errors import UserError
from gpt2.files import make_folder, read_json, replaced_folder, write_json
from gpt2.shards import (
    CONVERSATION_START,
    FORMAT,
    META_FILE,
    REPLY,
    SPLITS,
    ShardWriter,
    mask_name,
    shard_name,
    token_dtype,
    write_shard,
)
from gpt2.tokenizer import (
    TOKENIZER_FILE,
    Tokenizer,
    get_tokenizer,
    load_tokenizer,
    tokenizer_from_dict,
)

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
BATCH_CHARS = 1 << 20  # text sent to a worker at a time
CHECKPOINT_SECONDS = 10.0


# --- one text file --------------------------------------------------------------------------------


def prepare_text(
    input_path: str | Path,
    out_dir: str | Path,
    tokenizer: str = "gpt2",
    val_fraction: float = 0.1,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Tokenize one text file into a train and a val shard in ``out_dir``; return ``meta.json``.

    The first ``1 - val_fraction`` of the tokens train, the rest validate. A folder that already
    holds this file prepared the same way is left as it is.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    text = read_text(input_path)
    tok = get_tokenizer(tokenizer, text)
    out = Path(out_dir)
    settings = {
        "format": FORMAT,
        "tokenizer": tokenizer_id(tok),
        "split": "tokens",
        "val_fraction": val_fraction,
        "sources": [{"file": str(input_path), "sha256": sha256_file(input_path)}],
    }
    existing = _existing_settings(out, tok)
    if existing == settings:
        log.info("%s already holds %s, prepared", out, input_path)
        return read_json(out / META_FILE)
    ids = _encode_text(text, tok, show_progress)
    n_val = int(len(ids) * val_fraction)
    splits = {"train": ids[: len(ids) - n_val], "val": ids[len(ids) - n_val :]}
    if n_val < 2 or len(splits["train"]) < 2:
        raise UserError(
            f"{input_path} gives only {len(ids)} tokens: too few to split into train and val"
        )
    dtype = token_dtype(tok.vocab_size)
    with replaced_folder(out) as tmp:
        names = {s: [write_shard(tmp / shard_name(s, 0), ids, dtype)] for s, ids in splits.items()}
        tok.save(tmp)
        counts = {s: len(ids) for s, ids in splits.items()}
        meta = folder_meta(tok, dtype, counts, names, settings)
        write_json(tmp / META_FILE, meta)
    return meta


def folder_meta(
    tokenizer: Tokenizer,
    dtype: np.dtype,
    counts: dict[str, int],
    shards: dict[str, list[str]],
    settings: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """What ``meta.json`` holds, for either pipeline (`gpt2.shards.read_meta` reads it)."""
    return {
        "version": 2,
        "format": FORMAT,
        "tokenizer": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "eot_token": tokenizer.eot_token,
        "dtype": dtype.name,
        **{f"{split}_tokens": n for split, n in counts.items()},
        **extra,
        "shards": shards,
        "settings": settings,
    }


def tokenizer_id(tokenizer: Tokenizer) -> str:
    """The tokenizer's kind and a hash of all it holds: equal ids mean the same tokenizer."""
    described = json.dumps(tokenizer.to_dict(), sort_keys=True, ensure_ascii=False).encode("utf-8")
    return f"{tokenizer.kind} sha256:{hashlib.sha256(described).hexdigest()}"


def _existing_settings(out: Path, tok: Tokenizer) -> dict[str, Any] | None:
    """The settings ``out`` was prepared with (None: a new or empty folder); a folder of another
    tokenizer, or not made by `gpt2 prepare`, is refused."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not out.is_dir():
        raise UserError(f"cannot write {out}: it exists and is not a folder")
    if not (out / META_FILE).is_file() or not (out / TOKENIZER_FILE).is_file():
        raise UserError(
            f"{out} is not empty and holds no prepared data; use an empty or new folder"
        )
    old = load_tokenizer(out)
    if old.to_dict() != tok.to_dict():
        raise UserError(
            f"{out} holds data prepared with another tokenizer ({old.kind}, {old.vocab_size} ids; "
            f"now {tok.kind}, {tok.vocab_size}); use another --out folder, or delete this one"
        )
    return read_json(out / META_FILE).get("settings")


def _encode_text(text: str, tok: Tokenizer, show_progress: bool) -> np.ndarray:
    encode = fast_encode(tok)
    pieces = []
    with tqdm(
        total=len(text), unit="char", unit_scale=True, desc="tokenizing", disable=not show_progress
    ) as bar:
        for chunk in text_chunks(text):
            pieces.append(np.asarray(encode(chunk), dtype=np.int64))
            bar.update(len(chunk))
    return np.concatenate(pieces)


def fast_encode(tok: Tokenizer) -> Callable[[str], list[int]]:
    """``tok.encode``, done by tiktoken for a BPE vocabulary that tiktoken encodes identically."""
    from gpt2.bpe import BPETokenizer

    encoding = tok.tiktoken_encoding() if isinstance(tok, BPETokenizer) else None
    if encoding is None:
        return tok.encode

    def encode(text: str) -> list[int]:
        try:
            return encoding.encode(text)
        except ValueError as e:  # a special token written in the text, refused as tok.encode does
            raise UserError(str(e).splitlines()[0]) from None

    return encode


# --- a corpus: encoding, in worker processes ------------------------------------------------------

# A piece as sent to a worker: (text or conversation, is_val, ends_doc, where it was read).
BatchPiece = tuple[Document, bool, bool, str]


@dataclass
class Encoded:
    """A batch's tokens for each split, their masks (conversations only), and its text's size."""

    ids: dict[str, np.ndarray]
    masks: dict[str, np.ndarray] | None
    n_bytes: int


def _joined(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


class BatchEncoder:
    """Turns a batch of pieces into the token arrays of each split, an end-of-text token after
    every document."""

    def __init__(self, tokenizer_dict: dict[str, Any], fast: bool) -> None:
        from gpt2.bpe import ordinary_encoder

        tokenizer = tokenizer_from_dict(tokenizer_dict)
        self.encode = ordinary_encoder(tokenizer, fast)
        self.eot = np.array([tokenizer.eot_token], dtype=np.uint32)

    def __call__(self, batch: list[BatchPiece]) -> Encoded:
        parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        n_bytes = 0
        for text, is_val, ends_doc, _ in batch:
            assert isinstance(text, str)
            if text:
                parts[SPLITS[is_val]].append(self.encode(text))
                n_bytes += len(text.encode("utf-8"))
            if ends_doc:
                parts[SPLITS[is_val]].append(self.eot)
        return Encoded({s: _joined(p, np.uint32) for s, p in parts.items()}, None, n_bytes)


class ChatEncoder:
    """Turns a batch of conversations into each split's ids and mask (`gpt2.chat`), rendered
    by the tokenizer's chat template. A conversation the template refuses is an error naming
    where it was read: a template that cannot render the data is not a bad line to skip."""

    def __init__(self, tokenizer_dict: dict[str, Any], fast: bool) -> None:
        self.tokenizer = tokenizer_from_dict(tokenizer_dict)

    def __call__(self, batch: list[BatchPiece]) -> Encoded:
        from gpt2.chat import conversation_ids

        ids: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        masks: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        n_bytes = 0
        for messages, is_val, _, where in batch:
            assert isinstance(messages, list)
            try:
                piece, mask = conversation_ids(self.tokenizer, messages)
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
            ids[SPLITS[is_val]].append(np.array(piece, dtype=np.uint32))
            flags = np.array(mask, dtype=np.uint8) * REPLY
            flags[0] |= CONVERSATION_START
            masks[SPLITS[is_val]].append(flags)
            n_bytes += sum(len(m["content"].encode("utf-8")) for m in messages)
        return Encoded(
            {s: _joined(p, np.uint32) for s, p in ids.items()},
            {s: _joined(p, np.uint8) for s, p in masks.items()},
            n_bytes,
        )


def tokenizer_with_template(tokenizer: Tokenizer) -> dict[str, Any]:
    """``tokenizer.to_dict()`` with its chat template: what a worker rebuilds it from."""
    return {**tokenizer.to_dict(), "chat_template": tokenizer.chat_template}


_worker_encoder: BatchEncoder | ChatEncoder | None = None  # set in each worker by `_start_worker`


def _start_worker(tokenizer_dict: dict[str, Any], fast: bool, chat: bool) -> None:
    global _worker_encoder
    _worker_encoder = (ChatEncoder if chat else BatchEncoder)(tokenizer_dict, fast)


def _encode_in_worker(batch: list[BatchPiece]) -> Encoded:
    assert _worker_encoder is not None
    return _worker_encoder(batch)


@dataclass
class Batch:
    """Pieces sent to a worker together, and what to record once they are written."""

    pieces: list[BatchPiece]
    documents: dict[str, int]  # documents ended in this batch, per split
    after: Position  # where reading resumes after this batch
    stats: dict[str, int]  # the reading statistics up to this batch


def is_val_document(doc: int, val_fraction: float) -> bool:
    """Document ``doc`` goes to val when ``doc * val_fraction`` reaches a new whole number:
    documents 0, 1/f, 2/f, ... (evenly spread, decided without knowing the corpus size)."""
    return math.ceil(doc * val_fraction) < math.ceil((doc + 1) * val_fraction)


def document_chars(doc: Document) -> int:
    """A text's length, or the length of a conversation's contents."""
    return len(doc) if isinstance(doc, str) else sum(len(m["content"]) for m in doc)


def make_batches(
    pieces: Iterator[Any],
    stats: ReadStats,
    val_fraction: float,
    where: Callable[[Position], str] = lambda _: "",
) -> Iterator[Batch]:
    """Pieces grouped into batches of about `BATCH_CHARS` characters, each piece marked train
    or val by its document's number, and with ``where(piece.after)`` for messages."""
    batch: list[BatchPiece] = []
    documents = dict.fromkeys(SPLITS, 0)
    size = 0
    for piece in pieces:
        is_val = is_val_document(piece.doc, val_fraction)
        batch.append((piece.text, is_val, piece.ends_doc, where(piece.after)))
        documents[SPLITS[is_val]] += piece.ends_doc
        size += document_chars(piece.text)
        if size >= BATCH_CHARS:
            yield Batch(batch, documents, piece.after, stats.to_dict())
            batch, documents, size = [], dict.fromkeys(SPLITS, 0), 0
    if batch:
        yield Batch(batch, documents, piece.after, stats.to_dict())


def encode_in_order(
    batches: Iterator[Batch], tokenizer: Tokenizer, workers: int, fast: bool, chat: bool = False
) -> Iterator[tuple[Batch, Encoded]]:
    """Each batch with its encoding, in input order; a bounded number of batches in flight."""
    described = tokenizer_with_template(tokenizer)
    if workers <= 1:
        encoder = (ChatEncoder if chat else BatchEncoder)(described, fast)
        for batch in batches:
            yield batch, encoder(batch.pieces)
        return
    # fork starts workers at once (no re-import); they touch no state but the tokenizer's.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with context.Pool(workers, initializer=_start_worker, initargs=(described, fast, chat)) as pool:
        in_flight: deque = deque()
        for batch in batches:
            in_flight.append((batch, pool.apply_async(_encode_in_worker, (batch.pieces,))))
            if len(in_flight) >= 2 * workers:
                done, result = in_flight.popleft()
                yield done, result.get()
        while in_flight:
            done, result = in_flight.popleft()
            yield done, result.get()


# --- a corpus: the pipeline -----------------------------------------------------------------------


@dataclass
class Progress:
    """What ``progress.json`` holds: enough to resume."""

    settings: dict[str, Any]
    position: Position = field(default_factory=Position)
    splits: dict[str, dict[str, int]] = field(default_factory=lambda: {s: {} for s in SPLITS})
    stats: dict[str, int] = field(default_factory=lambda: ReadStats().to_dict())


def run_settings(
    sources: Sequence[Source],
    tokenizer: Tokenizer,
    shard_tokens: int,
    val_fraction: float,
    text_field: str,
    on_bad_line: str,
    chat: bool = False,
) -> dict[str, Any]:
    """Everything the output depends on; a resumed run must match it exactly. For chat, the
    template too (`tokenizer_id` leaves it out: it changes no id of a text)."""
    settings = {
        "format": FORMAT,
        "tokenizer": tokenizer_id(tokenizer),
        "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
        "text_field": text_field,
        "on_bad_line": on_bad_line,
        "sources": [s.describe() for s in sources],
    }
    if chat:  # (absent for text, so that folders prepared before chat existed still match)
        settings["chat"] = True
        settings["chat_template"] = tokenizer.chat_template  # None: gpt2.chat.DEFAULT_TEMPLATE
    return settings


def check_same_settings(out: Path, found: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to add to a folder made with another tokenizer or settings, naming the first."""
    for key, value in wanted.items():
        if found.get(key) != value:
            what = "tokenizer" if key == "tokenizer" else f"setting {key!r}"
            raise UserError(
                f"{out} holds shards prepared with a different {what} ({_short(found.get(key))}, now {_short(value)}); "
                "use another --out folder, or delete this one to start again"
            )


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a chat template can be pages long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def start_or_resume(out: Path, settings: dict[str, Any]) -> Progress | dict[str, Any]:
    """The checkpoint to go on from; a fresh one for an empty folder; or the finished run's
    metadata when ``out`` already holds this exact corpus."""
    meta_path, progress_path = out / META_FILE, out / PROGRESS_FILE
    if meta_path.is_file():
        meta = read_json(meta_path)
        if "settings" not in meta:
            raise UserError(f"{out} holds data prepared by an older gpt2; use another --out folder")
        check_same_settings(out, meta["settings"], settings)
        return meta
    if progress_path.is_file():
        data = read_json(progress_path)
        check_same_settings(out, data["settings"], settings)
        log.info("resuming the run in %s from document %d", out, data["position"]["doc"])
        return Progress(settings, Position(**data["position"]), data["splits"], data["stats"])
    if out.exists() and any(out.iterdir()):
        raise UserError(
            f"{out} is not empty and holds no prepare run to resume; use an empty or new folder"
        )
    return Progress(settings)


def remove_run_files(out: Path) -> None:
    """Remove what a failed run wrote, leaving the folder as it was before (empty)."""
    for pattern in ("*.bin", "*.mask", "*.partial", "*.tmp", PROGRESS_FILE, TOKENIZER_FILE):
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        out.rmdir()


def prepare_shards(
    sources: Sequence[Source],
    out_dir: str | Path,
    tokenizer: Tokenizer,
    *,
    shard_tokens: int = 100_000_000,
    val_fraction: float = 0.01,
    workers: int = 1,
    text_field: str = "text",
    on_bad_line: OnBadLine = "stop",
    fast: bool = True,
    show_progress: bool = True,
    chat: bool = False,
) -> dict[str, Any]:
    """Tokenize ``sources`` into shards in ``out_dir``; return the metadata (``meta.json``).

    ``chat``: the documents are conversations in field ``text_field`` (e.g. ``messages``),
    encoded with ``tokenizer``'s chat template, with a mask beside each shard.

    A folder holding an interrupted run of the same corpus, tokenizer and settings is resumed;
    one holding the finished run is left as it is.
    """
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens must be at least 1, got {shard_tokens}")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"the validation fraction must be between 0 and 1, got {val_fraction}")
    if tokenizer.eot_token is None:
        raise UserError(
            f"the {tokenizer.kind} tokenizer has no end-of-text token to end documents with; use gpt2 or a BPE folder"
        )
    if chat:
        check_template(tokenizer)
    out = Path(out_dir)
    settings = run_settings(
        sources, tokenizer, shard_tokens, val_fraction, text_field, on_bad_line, chat
    )
    progress = start_or_resume(out, settings)
    if not isinstance(progress, Progress):
        log.info("%s already holds this corpus, prepared", out)
        return progress
    tokenizer.save(make_folder(out))
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {
        s: ShardWriter(out, s, shard_tokens, dtype, masked=chat, **progress.splits[s])
        for s in SPLITS
    }
    try:
        checkpoint(out, progress, writers)  # from now on, a rerun resumes
        _run(sources, out, tokenizer, progress, writers, workers, text_field, on_bad_line, fast,
             show_progress, chat)  # fmt: skip
    except UserError as e:
        for w in writers.values():
            w.close_files()
        if isinstance(e, ReadInterrupted) and progress.position != Position():
            raise ReadInterrupted(f"{e}; run the same command again to resume") from None
        remove_run_files(out)  # the input itself is at fault: what was written is of no use
        raise
    counts = {s: w.shard * shard_tokens + w.tokens for s, w in writers.items()}
    names = {s: w.close() for s, w in writers.items()}
    if not counts["train"] or not counts["val"]:
        remove_run_files(out)
        what = "conversations" if chat else "documents"
        raise UserError(
            f"the corpus gave {writers['train'].documents} train and {writers['val'].documents} val {what}: "
            "both splits need at least one (more of them, or another --val-fraction)"
        )
    extra = (
        {"masks": {s: [mask_name(n) for n in names[s]] for s in SPLITS},
         "trained_tokens": {s: w.trained for s, w in writers.items()}}
        if chat else {}
    )  # fmt: skip
    meta = folder_meta(tokenizer, dtype, counts, names, settings, shard_tokens=shard_tokens,
                       documents={s: w.documents for s, w in writers.items()}, stats=progress.stats,
                       **extra)  # fmt: skip
    write_json(out / META_FILE, meta)  # last: its presence means the folder is complete
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    return meta


def _run(
    sources: Sequence[Source],
    out: Path,
    tokenizer: Tokenizer,
    progress: Progress,
    writers: dict[str, ShardWriter],
    workers: int,
    text_field: str,
    on_bad_line: OnBadLine,
    fast: bool,
    show_progress: bool,
    chat: bool = False,
) -> None:
    """Read, encode and write until the corpus ends, checkpointing as it goes."""
    stats = ReadStats(**progress.stats)
    pieces = read_corpus(sources, progress.position, stats, text_field, on_bad_line, chat)
    where = (lambda at: describe_row(sources[at.source], at.line)) if chat else (lambda _: "")
    batches = make_batches(pieces, stats, progress.settings["val_fraction"], where)
    last_checkpoint = time.monotonic()
    n_tokens = 0
    started = time.monotonic()
    with tqdm(unit="B", unit_scale=True, desc="preparing", disable=not show_progress) as bar:
        for batch, encoded in encode_in_order(batches, tokenizer, workers, fast, chat):
            shards_before = sum(w.shard for w in writers.values())
            for split, w in writers.items():
                mask = encoded.masks[split] if encoded.masks is not None else None
                w.append(encoded.ids[split], batch.documents[split], mask)
            progress.position, progress.stats = batch.after, batch.stats
            n_tokens += sum(len(ids) for ids in encoded.ids.values())
            bar.update(encoded.n_bytes)
            bar.set_postfix_str(
                f"{n_tokens / max(1e-9, time.monotonic() - started):,.0f} tokens/s", refresh=False
            )
            finished_shard = sum(w.shard for w in writers.values()) > shards_before
            if finished_shard or time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                checkpoint(out, progress, writers)
                last_checkpoint = time.monotonic()


def check_template(tokenizer: Tokenizer) -> None:
    """Render a small conversation with the tokenizer's chat template before reading the
    corpus, so that a template that fails says so at once, not after a long read."""
    from gpt2.chat import conversation_ids

    sample = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    try:
        conversation_ids(tokenizer, sample)
    except UserError as e:
        raise UserError(f"the chat template cannot be used for training: {e}") from None


def checkpoint(out: Path, progress: Progress, writers: dict[str, ShardWriter]) -> None:
    """Record where to resume: partials flushed first, so they hold what the record says."""
    for w in writers.values():
        w.flush()
    progress.splits = {s: w.state() for s, w in writers.items()}
    write_json(out / PROGRESS_FILE, dataclasses.asdict(progress))
    for w in writers.values():
        w.checkpointed()
