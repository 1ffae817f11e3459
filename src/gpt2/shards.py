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

Conversations (``gpt2 prepare --chat``) add a *mask* beside each shard, ``train_000000.mask``
next to ``train_000000.bin``: the same 1 KiB header layout with magic `MASK_MAGIC` (the bytes
``MASK``), version 1 and the token count, then one byte of flags per token: `REPLY` where
training learns to predict that token (an assistant's reply and the end-of-text closing it),
`CONVERSATION_START` on each conversation's first token (where training rows begin). The
shards themselves stay exactly llm.c's, so any reader of those still reads the tokens; a byte
rather than a bit per token lets the loader slice windows of the mask as it slices the tokens.
``meta.json`` lists the masks under ``masks``; `load_masks` reads them.

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
MASK_MAGIC = int.from_bytes(b"MASK", "little")  # a mask file begins with the bytes "MASK"
MASK_VERSION = 1  # one byte per token, 0 or 1
MASK_SUFFIX = ".mask"
REPLY = 1  # a mask flag: training learns this token
CONVERSATION_START = 2  # a mask flag: a conversation begins at this token


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_name(split: str, index: int) -> str:
    """``train_000003.bin``: the split and the shard's number."""
    return f"{split}_{index:06d}.bin"


def mask_name(shard: str) -> str:
    """``train_000003.mask``: the mask beside shard ``train_000003.bin``."""
    return shard.removesuffix(".bin") + MASK_SUFFIX


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


def mask_header(n_tokens: int) -> bytes:
    """A mask's 1 KiB header: `MASK_MAGIC`, `MASK_VERSION`, token count, zeros."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MASK_MAGIC, MASK_VERSION, n_tokens)
    return header.tobytes()


def open_mask(path: str | Path, n_tokens: int) -> np.memmap:
    """The mask of a shard of ``n_tokens`` tokens, memory-mapped read-only (uint8, 0 or 1),
    after checking its header against the shard."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing mask {path} (prepare the conversations again)")
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    if len(header) < 3 or header[0] != MASK_MAGIC or header[1] != MASK_VERSION:
        raise UserError(f"{path} is not a token mask (no header with magic 'MASK', version 1)")
    if int(header[2]) != n_tokens or path.stat().st_size != HEADER_BYTES + n_tokens:
        raise UserError(
            f"{path} does not fit its shard: {int(header[2])} mask bytes promised, "
            f"{path.stat().st_size - HEADER_BYTES} present, {n_tokens} tokens in the shard"
        )
    return np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


class ShardWriter:
    """Appends one split's tokens to shards of ``shard_tokens`` tokens (and, ``masked``, each
    token's mask byte to the mask beside its shard).

    Started with ``shard`` and ``tokens`` from a checkpoint, it resumes: shards before ``shard``
    are done, the partial shard (and partial mask) keeps its first ``tokens`` tokens, and
    anything written after the checkpoint is removed.
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
        trained: int = 0,
        masked: bool = False,
    ) -> None:
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shard, self.tokens, self.documents = shard, tokens, documents
        self.masked, self.trained = masked, trained  # trained: mask bytes that are 1, so far
        self.finished: list[str] = [shard_name(split, i) for i in range(shard)]
        self.stale: list[Path] = []  # full partials, deleted once a checkpoint no longer needs them
        self._remove_after_checkpoint()
        self._open_partials()

    def _partial_path(self, index: int, mask: bool = False) -> Path:
        name = shard_name(self.split, index)
        return self.folder / ((mask_name(name) if mask else name) + ".partial")

    def _remove_after_checkpoint(self) -> None:
        """Delete this split's shards, masks and partials that the checkpoint does not know."""
        for path in self.folder.glob(f"{self.split}_*"):
            digits = path.name[len(self.split) + 1 :].split(".")[0]
            if not digits.isdigit() or not path.name.endswith((".bin", MASK_SUFFIX, ".partial")):
                continue
            index = int(digits)
            keep = index < self.shard and not path.name.endswith(".partial")
            if not keep and not (index == self.shard and path.name.endswith(".partial")):
                path.unlink()

    def _open_partials(self) -> None:
        """The current shard's partial (and its mask's), opened at the recorded size."""
        self.file = self._open_partial(self._partial_path(self.shard), self.dtype.itemsize)
        mask = self._partial_path(self.shard, mask=True)
        self.mask_file = self._open_partial(mask, 1) if self.masked else None

    def _open_partial(self, path: Path, itemsize: int) -> BinaryIO:
        size = HEADER_BYTES + self.tokens * itemsize
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

    def append(self, ids: np.ndarray, documents: int = 0, mask: np.ndarray | None = None) -> None:
        """Add tokens (and, for a masked writer, their mask: one byte of flags per id); a shard
        that fills up is finished and a new one begun."""
        if (mask is not None) != self.masked or (mask is not None and len(mask) != len(ids)):
            raise ValueError("a masked writer takes one mask value per id, any other none")
        ids = ids.astype(self.dtype, copy=False)
        flags = mask.astype(np.uint8, copy=False) if mask is not None else None
        if flags is not None:
            self.trained += int(np.count_nonzero(flags & REPLY))
        while len(ids):
            take = min(len(ids), self.shard_tokens - self.tokens)
            self.file.write(ids[:take].tobytes())
            if flags is not None:
                assert self.mask_file is not None
                self.mask_file.write(flags[:take].tobytes())
                flags = flags[take:]
            self.tokens += take
            ids = ids[take:]
            if self.tokens == self.shard_tokens:
                self._finish_shard()
        self.documents += documents

    def _finish_shard(self) -> None:
        """Copy the full partial to its final name with its header (the mask likewise), then
        begin the next."""
        self.close_files()
        name = shard_name(self.split, self.shard)
        self._publish(self._partial_path(self.shard), name, shard_header(self.tokens, self.dtype))
        if self.masked:
            partial = self._partial_path(self.shard, mask=True)
            self._publish(partial, mask_name(name), mask_header(self.tokens))
        log.info("wrote %s (%d tokens)", name, self.tokens)
        self.finished.append(name)
        self.shard, self.tokens = self.shard + 1, 0
        self._open_partials()

    def _publish(self, partial: Path, name: str, header: bytes) -> None:
        """The full partial copied to its final ``name``, header filled in, atomically."""
        with atomic_file(self.folder / name) as tmp:
            shutil.copyfile(partial, tmp)
            with open(tmp, "r+b") as f:
                f.write(header)
        self.stale.append(partial)

    def close_files(self) -> None:
        """Close the open partials (a failed run, or a shard being finished)."""
        for f in (self.file, self.mask_file):
            if f is not None:
                f.close()

    def flush(self) -> None:
        for f in (self.file, self.mask_file):
            if f is not None:
                f.flush()

    def checkpointed(self) -> None:
        """The checkpoint now points past the stale partials: delete them."""
        for path in self.stale:
            path.unlink(missing_ok=True)
        self.stale.clear()

    def state(self) -> dict[str, int]:
        """What a checkpoint records to resume this writer (the constructor's arguments)."""
        state = {"shard": self.shard, "tokens": self.tokens, "documents": self.documents}
        return {**state, "trained": self.trained} if self.masked else state

    def close(self) -> list[str]:
        """Finish the last, shorter shard; return the names of all shards."""
        if self.tokens:
            self._finish_shard()
        self.close_files()
        self._partial_path(self.shard).unlink(missing_ok=True)
        self._partial_path(self.shard, mask=True).unlink(missing_ok=True)
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


def load_masks(data_dir: str | Path, split: str) -> list[np.memmap] | None:
    """The masks of one split's shards, in the same order as `load_split`'s (uint8 memory
    maps of `REPLY` and `CONVERSATION_START` flags); None for a folder without masks (plain text,
    every token trained)."""
    meta = read_meta(data_dir)
    masks = meta.get("masks")
    if not masks:
        return None
    names, shards = masks.get(split) or [], meta["shards"].get(split) or []
    if [mask_name(n) for n in shards] != names:
        raise UserError(f"{data_dir}/{META_FILE}: the {split} masks do not match its shards")
    folder = Path(data_dir)
    return [
        open_mask(folder / m, len(open_shard(folder / n)))
        for n, m in zip(shards, names, strict=True)
    ]
