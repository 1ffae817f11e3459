"""Token shards: how a large corpus is stored once tokenized, and the pipeline that writes them.

A prepared corpus is a folder::

    train_000000.bin, train_000001.bin, ...   the train tokens, ``shard_tokens`` per file
    val_000000.bin, ...                        the validation tokens (whole documents)
    meta.json                                  vocabulary size, dtype, the shard list, counts
    tokenizer.json                             the tokenizer (see `gpt2.tokenizer`)

Each shard is llm.c's format: a header of 256 little-endian int32 (magic 20240520, version 1 for
uint16 tokens or 2 for uint32, the token count), then the tokens, little-endian. `open_shard`
memory-maps the tokens past the header.

`prepare_shards` streams: documents are read a batch at a time (`gpt2.corpus`), encoded by
worker processes, and appended to the current shard of their split, so memory stays flat
whatever the corpus size. Each document goes wholly to train or to val, chosen by its number.

Resume. The shard being written is ``<name>.partial``; when full it is copied, header filled in,
to a temp file that is renamed to its final name (a reader never sees half a shard).
``progress.json`` records, every few seconds and after every finished shard, where reading
stopped and how many tokens each partial holds; it is written only after the partials are
flushed. A rerun after a crash or a kill reads it, cuts each partial back to the recorded size,
and goes on from the recorded place: the output is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from gpt2.corpus import OnBadLine, Position, ReadInterrupted, ReadStats, Source, read_corpus
from gpt2.errors import UserError
from gpt2.tokenizer import TOKENIZER_FILE, Tokenizer, tokenizer_from_dict

log = logging.getLogger(__name__)

MAGIC = 20240520  # llm.c's shard magic number
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VERSION_OF_DTYPE = {"uint16": 1, "uint32": 2}
DTYPE_OF_VERSION = {v: k for k, v in VERSION_OF_DTYPE.items()}
SPLITS = ("train", "val")
META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
FORMAT = "shards-v1"
BATCH_CHARS = 1 << 20  # text sent to a worker at a time
CHECKPOINT_SECONDS = 10.0


# --- the shard file ---------------------------------------------------------------------------


def shard_name(split: str, index: int) -> str:
    """``train_000003.bin``: the split and the shard's number."""
    return f"{split}_{index:06d}.bin"


def shard_header(n_tokens: int, dtype: np.dtype) -> bytes:
    """llm.c's 1 KiB header: magic, version (1: uint16 ids, 2: uint32), token count, zeros."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION_OF_DTYPE[np.dtype(dtype).name], n_tokens)
    return header.tobytes()


def open_shard(path: str | Path) -> np.memmap:
    """The tokens of one shard, memory-mapped read-only, after checking its header."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing shard {path}")
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    if len(header) < 3 or header[0] != MAGIC or int(header[1]) not in DTYPE_OF_VERSION:
        raise UserError(f"{path} is not a token shard (bad header)")
    dtype = np.dtype(DTYPE_OF_VERSION[int(header[1])]).newbyteorder("<")
    n_tokens = int(header[2])
    if path.stat().st_size != HEADER_BYTES + n_tokens * dtype.itemsize:
        raise UserError(f"{path} is truncated: its header promises {n_tokens} tokens")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


class ShardWriter:
    """Appends one split's tokens to shards of ``shard_tokens`` tokens.

    Started with ``shard`` and ``tokens`` from a checkpoint, it resumes: shards before ``shard``
    are done, the partial shard keeps its first ``tokens`` tokens, and anything written after
    the checkpoint is removed.
    """

    def __init__(
        self,
        folder: Path,
        split: str,
        shard_tokens: int,
        dtype: np.dtype,
        shard: int = 0,
        tokens: int = 0,
        documents: int = 0,
    ) -> None:
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shard, self.tokens, self.documents = shard, tokens, documents
        self.finished: list[str] = [shard_name(split, i) for i in range(shard)]
        self.stale: list[Path] = []  # full partials, deleted once a checkpoint no longer needs them
        self._remove_after_checkpoint()
        self.file = self._open_partial()

    def _partial_path(self, index: int) -> Path:
        return self.folder / (shard_name(self.split, index) + ".partial")

    def _remove_after_checkpoint(self) -> None:
        """Delete this split's shards and partials that the checkpoint does not know."""
        for path in self.folder.glob(f"{self.split}_*.bin*"):
            digits = path.name[len(self.split) + 1 :].split(".")[0]
            if not digits.isdigit():
                continue
            index = int(digits)
            keep = index < self.shard and path.name.endswith(".bin")
            if not keep and not (index == self.shard and path.name.endswith(".partial")):
                path.unlink()

    def _open_partial(self) -> BinaryIO:
        path = self._partial_path(self.shard)
        size = HEADER_BYTES + self.tokens * self.dtype.itemsize
        if self.tokens and (not path.is_file() or path.stat().st_size < size):
            raise UserError(
                f"cannot resume: {path} is missing or shorter than recorded; delete {self.folder} and start again"
            )
        f = open(path, "r+b" if path.is_file() else "w+b")  # noqa: SIM115 - kept open while writing
        f.truncate(size)
        f.seek(size)
        if not self.tokens:
            f.seek(0)
            f.write(bytes(HEADER_BYTES))
        return f

    def append(self, ids: np.ndarray, documents: int = 0) -> None:
        """Add tokens; a shard that fills up is finished and a new one begun."""
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            take = min(len(ids), self.shard_tokens - self.tokens)
            self.file.write(ids[:take].tobytes())
            self.tokens += take
            ids = ids[take:]
            if self.tokens == self.shard_tokens:
                self._finish_shard()
        self.documents += documents

    def _finish_shard(self) -> None:
        """Copy the full partial to its final name with its header, then begin the next."""
        self.file.close()
        partial = self._partial_path(self.shard)
        final = self.folder / shard_name(self.split, self.shard)
        tmp = final.with_name(final.name + ".tmp")
        shutil.copyfile(partial, tmp)
        with open(tmp, "r+b") as f:
            f.write(shard_header(self.tokens, self.dtype))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        log.info("wrote %s (%d tokens)", final.name, self.tokens)
        self.finished.append(final.name)
        self.stale.append(partial)
        self.shard, self.tokens = self.shard + 1, 0
        self.file = self._open_partial()

    def flush(self) -> None:
        self.file.flush()

    def checkpointed(self) -> None:
        """The checkpoint now points past the stale partials: delete them."""
        for path in self.stale:
            path.unlink(missing_ok=True)
        self.stale.clear()

    def state(self) -> dict[str, int]:
        return {"shard": self.shard, "tokens": self.tokens, "documents": self.documents}

    def close(self) -> list[str]:
        """Finish the last, shorter shard; return the names of all shards."""
        if self.tokens:
            self._finish_shard()
        self.file.close()
        self._partial_path(self.shard).unlink(missing_ok=True)
        self.checkpointed()
        return self.finished


# --- encoding, in worker processes -----------------------------------------------------------


class BatchEncoder:
    """Turns a batch of pieces into the token arrays of each split, an end-of-text token after
    every document."""

    def __init__(self, tokenizer_dict: dict[str, Any], fast: bool) -> None:
        from gpt2.bpe import ordinary_encoder

        tokenizer = tokenizer_from_dict(tokenizer_dict)
        self.encode = ordinary_encoder(tokenizer, fast)
        self.eot = np.array([tokenizer.eot_token], dtype=np.uint32)

    def __call__(self, batch: list[tuple[str, bool, bool]]) -> tuple[np.ndarray, np.ndarray, int]:
        """``batch`` holds (text, is_val, ends_doc); returns train ids, val ids, text bytes."""
        parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
        n_bytes = 0
        for text, is_val, ends_doc in batch:
            if text:
                parts[is_val].append(self.encode(text))
                n_bytes += len(text.encode("utf-8"))
            if ends_doc:
                parts[is_val].append(self.eot)
        empty = np.zeros(0, dtype=np.uint32)
        return (
            np.concatenate(parts[False] or [empty]),
            np.concatenate(parts[True] or [empty]),
            n_bytes,
        )


_worker_encoder: BatchEncoder | None = None  # set once in each worker process by `_start_worker`


def _start_worker(tokenizer_dict: dict[str, Any], fast: bool) -> None:
    global _worker_encoder
    _worker_encoder = BatchEncoder(tokenizer_dict, fast)


def _encode_in_worker(batch: list[tuple[str, bool, bool]]) -> tuple[np.ndarray, np.ndarray, int]:
    assert _worker_encoder is not None
    return _worker_encoder(batch)


@dataclass
class Batch:
    """Pieces sent to a worker together, and what to record once they are written."""

    pieces: list[tuple[str, bool, bool]]  # (text, is_val, ends_doc)
    documents: dict[str, int]  # documents ended in this batch, per split
    after: Position  # where reading resumes after this batch
    stats: dict[str, int]  # the reading statistics up to this batch


def is_val_document(doc: int, val_fraction: float) -> bool:
    """Document ``doc`` goes to val when ``doc * val_fraction`` reaches a new whole number:
    documents 0, 1/f, 2/f, ... (evenly spread, decided without knowing the corpus size)."""
    return math.ceil(doc * val_fraction) < math.ceil((doc + 1) * val_fraction)


def make_batches(pieces: Iterator[Any], stats: ReadStats, val_fraction: float) -> Iterator[Batch]:
    """Pieces grouped into batches of about `BATCH_CHARS` characters, each piece marked train
    or val by its document's number."""
    batch: list[tuple[str, bool, bool]] = []
    documents = dict.fromkeys(SPLITS, 0)
    size = 0
    for piece in pieces:
        is_val = is_val_document(piece.doc, val_fraction)
        batch.append((piece.text, is_val, piece.ends_doc))
        documents[SPLITS[is_val]] += piece.ends_doc
        size += len(piece.text)
        if size >= BATCH_CHARS:
            yield Batch(batch, documents, piece.after, stats.to_dict())
            batch, documents, size = [], dict.fromkeys(SPLITS, 0), 0
    if batch:
        yield Batch(batch, documents, piece.after, stats.to_dict())


def encode_in_order(
    batches: Iterator[Batch], tokenizer: Tokenizer, workers: int, fast: bool
) -> Iterator[tuple[Batch, tuple[np.ndarray, np.ndarray, int]]]:
    """Each batch with its encoding, in input order; a bounded number of batches in flight."""
    if workers <= 1:
        encoder = BatchEncoder(tokenizer.to_dict(), fast)
        for batch in batches:
            yield batch, encoder(batch.pieces)
        return
    # fork starts workers at once (no re-import); they touch no state but the tokenizer's.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with context.Pool(
        workers, initializer=_start_worker, initargs=(tokenizer.to_dict(), fast)
    ) as pool:
        in_flight: deque = deque()
        for batch in batches:
            in_flight.append((batch, pool.apply_async(_encode_in_worker, (batch.pieces,))))
            if len(in_flight) >= 2 * workers:
                done, result = in_flight.popleft()
                yield done, result.get()
        while in_flight:
            done, result = in_flight.popleft()
            yield done, result.get()


# --- the pipeline ---------------------------------------------------------------------------


@dataclass
class Progress:
    """What ``progress.json`` holds: enough to resume."""

    settings: dict[str, Any]
    position: Position = field(default_factory=Position)
    splits: dict[str, dict[str, int]] = field(default_factory=lambda: {s: {} for s in SPLITS})
    stats: dict[str, int] = field(default_factory=lambda: ReadStats().to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "position": self.position.to_dict(),
            "splits": self.splits,
            "stats": self.stats,
        }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically: a temp file, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def run_settings(
    sources: Sequence[Source],
    tokenizer: Tokenizer,
    shard_tokens: int,
    val_fraction: float,
    text_field: str,
    on_bad_line: str,
) -> dict[str, Any]:
    """Everything the output depends on; a resumed run must match it exactly."""
    described = json.dumps(tokenizer.to_dict(), sort_keys=True, ensure_ascii=False).encode("utf-8")
    return {
        "format": FORMAT,
        "tokenizer": f"{tokenizer.kind} sha256:{hashlib.sha256(described).hexdigest()}",
        "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
        "text_field": text_field,
        "on_bad_line": on_bad_line,
        "sources": [s.describe() for s in sources],
    }


def check_same_settings(out: Path, found: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to add to a folder made with another tokenizer or settings, naming the first."""
    for key, value in wanted.items():
        if found.get(key) != value:
            what = "tokenizer" if key == "tokenizer" else f"setting {key!r}"
            raise UserError(
                f"{out} holds shards prepared with a different {what} ({found.get(key)!r}, now {value!r}); "
                "use another --out folder, or delete this one to start again"
            )


def start_or_resume(out: Path, settings: dict[str, Any]) -> Progress | dict[str, Any]:
    """The checkpoint to go on from; a fresh one for an empty folder; or the finished run's
    metadata when ``out`` already holds this exact corpus."""
    meta_path, progress_path = out / META_FILE, out / PROGRESS_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if "settings" not in meta:
            raise UserError(
                f"{out} holds data prepared from a single text file; use another --out folder"
            )
        check_same_settings(out, meta["settings"], settings)
        return meta
    if progress_path.is_file():
        data = json.loads(progress_path.read_text(encoding="utf-8"))
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
    for pattern in ("*.bin", "*.partial", "*.tmp", PROGRESS_FILE, TOKENIZER_FILE):
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
) -> dict[str, Any]:
    """Tokenize ``sources`` into shards in ``out_dir``; return the metadata (``meta.json``).

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
    out = Path(out_dir)
    settings = run_settings(sources, tokenizer, shard_tokens, val_fraction, text_field, on_bad_line)
    progress = start_or_resume(out, settings)
    if not isinstance(progress, Progress):
        log.info("%s already holds this corpus, prepared", out)
        return progress
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {out}: {e.strerror}") from None
    tokenizer.save(out)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: ShardWriter(out, s, shard_tokens, dtype, **progress.splits[s]) for s in SPLITS}
    try:
        checkpoint(out, progress, writers)  # from now on, a rerun resumes
        _run(
            sources,
            out,
            tokenizer,
            progress,
            writers,
            workers,
            text_field,
            on_bad_line,
            fast,
            show_progress,
        )
    except UserError as e:
        for w in writers.values():
            w.file.close()
        if isinstance(e, ReadInterrupted) and progress.position != Position():
            raise ReadInterrupted(f"{e}; run the same command again to resume") from None
        remove_run_files(out)  # the input itself is at fault: what was written is of no use
        raise
    counts = {s: w.shard * shard_tokens + w.tokens for s, w in writers.items()}
    names = {s: w.close() for s, w in writers.items()}
    if not counts["train"] or not counts["val"]:
        remove_run_files(out)
        raise UserError(
            f"the corpus gave {writers['train'].documents} train and {writers['val'].documents} val documents: "
            "both splits need at least one (more documents, or another --val-fraction)"
        )
    meta = {
        "version": 2,
        "format": FORMAT,
        "tokenizer": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "eot_token": tokenizer.eot_token,
        "dtype": dtype.name,
        "shard_tokens": shard_tokens,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "documents": {s: w.documents for s, w in writers.items()},
        "shards": names,
        "stats": progress.stats,
        "settings": settings,
    }
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
) -> None:
    """Read, encode and write until the corpus ends, checkpointing as it goes."""
    stats = ReadStats(**progress.stats)
    pieces = read_corpus(sources, progress.position, stats, text_field, on_bad_line)
    batches = make_batches(pieces, stats, progress.settings["val_fraction"])
    last_checkpoint = time.monotonic()
    n_tokens = 0
    started = time.monotonic()
    with tqdm(unit="B", unit_scale=True, desc="preparing", disable=not show_progress) as bar:
        for batch, (train_ids, val_ids, n_bytes) in encode_in_order(
            batches, tokenizer, workers, fast
        ):
            shards_before = sum(w.shard for w in writers.values())
            writers["train"].append(train_ids, batch.documents["train"])
            writers["val"].append(val_ids, batch.documents["val"])
            progress.position, progress.stats = batch.after, batch.stats
            n_tokens += len(train_ids) + len(val_ids)
            bar.update(n_bytes)
            bar.set_postfix_str(
                f"{n_tokens / max(1e-9, time.monotonic() - started):,.0f} tokens/s", refresh=False
            )
            finished_shard = sum(w.shard for w in writers.values()) > shards_before
            if finished_shard or time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                checkpoint(out, progress, writers)
                last_checkpoint = time.monotonic()


def checkpoint(out: Path, progress: Progress, writers: dict[str, ShardWriter]) -> None:
    """Record where to resume: partials flushed first, so they hold what the record says."""
    for w in writers.values():
        w.flush()
    progress.splits = {s: w.state() for s, w in writers.items()}
    write_json(out / PROGRESS_FILE, progress.to_dict())
    for w in writers.values():
        w.checkpointed()
