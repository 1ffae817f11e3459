"""Token shards: the one on-disk format of tokenized text, its writer, and its reader.

Every folder `gpt2 prepare` writes (see `gpt2.prepare`) holds::

    train_000000.bin, train_000001.bin, ...   the train tokens, ``shard_tokens`` per file
    val_000000.bin, ...                        the validation tokens
    meta.json                                  vocabulary size, dtype, the shard list, counts
    tokenizer.json                             the tokenizer (see `gpt2.tokenizer`)

Each shard is llm.c's format: a header of 256 little-endian int32 (magic 20240520, version 1 for
uint16 tokens or 2 for uint32, the token count), then the tokens, little-endian. `open_shard`
memory-maps the tokens past the header; `load_split` gives a split's shards, which training
(`gpt2.loader`), evaluation and the notebook read.

A folder from before shards (headerless ``train.bin``/``val.bin``) is refused with a message to
prepare it again: the ids would be the same, and one reader is simpler than two.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from gpt2.errors import UserError
from gpt2.files import atomic_file, read_json

log = logging.getLogger(__name__)

MAGIC = 20240520  # llm.c's shard magic number
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VERSION_OF_DTYPE = {"uint16": 1, "uint32": 2}
DTYPE_OF_VERSION = {v: k for k, v in VERSION_OF_DTYPE.items()}
SPLITS = ("train", "val")
META_FILE = "meta.json"
FORMAT = "shards-v1"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


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
        raise UserError(
            f"{path} is not a token shard (no llm.c header, magic {MAGIC}); a file from an older "
            "`gpt2 prepare` must be prepared again"
        )
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
        with atomic_file(final) as tmp:
            shutil.copyfile(partial, tmp)
            with open(tmp, "r+b") as f:
                f.write(shard_header(self.tokens, self.dtype))
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


def write_shard(path: Path, ids: np.ndarray, dtype: np.dtype) -> str:
    """One whole shard at once (a split small enough to hold in memory); returns its name."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(shard_header(len(ids), dtype))
        f.write(ids.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes())
    return path.name


# --- reading a prepared folder ------------------------------------------------------------------


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a prepared folder; a folder of another kind is a `UserError`."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise UserError(f"data folder not found: {folder} (create it with `gpt2 prepare`)")
    if not (folder / META_FILE).is_file():
        raise UserError(
            f"{folder} has no {META_FILE}: not a prepared data folder (see `gpt2 prepare`)"
        )
    meta = read_json(folder / META_FILE)
    if "shards" not in meta:
        raise UserError(
            f"{folder} was prepared by an older gpt2 (headerless train.bin/val.bin); "
            f"run `gpt2 prepare` again to write it as token shards"
        )
    return meta


def load_split(data_dir: str | Path, split: str) -> list[np.memmap]:
    """The tokens of one split as read-only memory maps, one per shard."""
    meta = read_meta(data_dir)
    names = meta["shards"].get(split)
    if not names:
        raise UserError(f"{data_dir} has no {split} shards")
    return [open_shard(Path(data_dir) / name) for name in names]
