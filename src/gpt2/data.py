"""Data: a text file becomes token files on disk, which become (input, target) windows.

``gpt2 prepare`` writes a folder holding

    train.bin, val.bin   the token ids, little-endian uint16 (uint32 when the vocabulary needs it)
    meta.json            tokenizer name, vocabulary size, token counts, dtype, source and its sha256
    tokenizer.json       the tokenizer itself (see `gpt2.tokenizer`)

Training reads the ``.bin`` files through `numpy.memmap`, so a corpus never has to fit in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm.auto import tqdm

from gpt2.assets import sha256_file
from gpt2.corpus import SAFE_CUT_TEXT
from gpt2.errors import UserError
from gpt2.shards import open_shard
from gpt2.tokenizer import Tokenizer, get_tokenizer

META_FILE = "meta.json"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


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
    words on both sides as on the whole text (`gpt2.corpus.SAFE_CUT_TEXT`), so that encoding the
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


def write_tokens(path: Path, ids: np.ndarray) -> None:
    """Write atomically: a reader never sees a half-written file under the final name."""
    tmp = path.with_name(path.name + ".tmp")
    ids.tofile(tmp)
    os.replace(tmp, path)


def prepare(
    input_path: str | Path,
    out_dir: str | Path,
    tokenizer: str = "char",
    val_fraction: float = 0.1,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Tokenize a text file into ``out_dir`` and return the metadata written to ``meta.json``.

    The first ``1 - val_fraction`` of the tokens train, the rest validate.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    text = read_text(input_path)
    tok = get_tokenizer(tokenizer, text)
    encode = fast_encode(tok)
    pieces = []
    with tqdm(
        total=len(text), unit="char", unit_scale=True, desc="tokenizing", disable=not show_progress
    ) as bar:
        for chunk in text_chunks(text):
            pieces.append(np.asarray(encode(chunk), dtype=np.int64))
            bar.update(len(chunk))
    ids = np.concatenate(pieces)
    dtype = token_dtype(tok.vocab_size)
    n_val = int(len(ids) * val_fraction)
    splits = {"train": ids[: len(ids) - n_val], "val": ids[len(ids) - n_val :]}
    if n_val < 2 or len(splits["train"]) < 2:
        raise UserError(
            f"{input_path} gives only {len(ids)} tokens: too few to split into train and val"
        )

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {out}: {e.strerror}") from None
    for name, split in splits.items():
        write_tokens(out / f"{name}.bin", split.astype(dtype))
    tok.save(out)
    meta = {
        "version": 1,
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "train_tokens": int(len(splits["train"])),
        "val_tokens": int(len(splits["val"])),
        "source": str(input_path),
        "source_sha256": sha256_file(input_path),
    }
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / META_FILE)  # written last: its presence means the folder is complete
    return meta


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


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / META_FILE
    if not Path(data_dir).is_dir():
        raise UserError(f"data folder not found: {data_dir} (create it with `gpt2 prepare`)")
    if not path.is_file():
        raise UserError(
            f"{data_dir} has no {META_FILE}: not a prepared data folder (see `gpt2 prepare`)"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def load_split_shards(data_dir: str | Path, split: str) -> list[np.ndarray]:
    """The tokens of one split as a list of read-only memory maps, one per shard (a folder from
    `prepare`, with one file per split, gives a one-element list)."""
    meta = read_meta(data_dir)
    if "shards" not in meta:
        return [load_split(data_dir, split)]
    if split not in meta["shards"]:
        raise UserError(f"{data_dir} has no {split!r} split")
    if not meta["shards"][split]:
        raise UserError(f"{data_dir} has no {split} shards")
    return [open_shard(Path(data_dir) / name) for name in meta["shards"][split]]


class ShardedTokens:
    """Several token arrays read as one (``len`` and slices), without copying them into memory:
    lets code written for one array, such as `TokenWindows`, read a sharded split."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])  # (n_parts + 1,)
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise IndexError("ShardedTokens supports contiguous slices only")
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            local = start - int(self.starts[first])
            take = min(stop - start, len(self.parts[first]) - local)
            pieces.append(self.parts[first][local : local + take])
            start += take
            first += 1
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.dtype)


def load_split(data_dir: str | Path, split: str) -> np.memmap | ShardedTokens:
    """The tokens of one split, memory-mapped read-only (a sharded split: the shards read as
    one, see `ShardedTokens`)."""
    meta = read_meta(data_dir)
    if "shards" in meta:
        parts = load_split_shards(data_dir, split)
        return parts[0] if len(parts) == 1 else ShardedTokens(parts)
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise UserError(f"missing {path}")
    dtype = np.dtype(meta["dtype"])
    if path.stat().st_size == 0 or path.stat().st_size % dtype.itemsize:
        raise UserError(f"{path} is empty or truncated")
    return np.memmap(path, dtype=dtype, mode="r")


class TokenWindows(Dataset):
    """Every window of ``block_size + 1`` consecutive tokens, as (input, next-token target).

    Window ``i`` is ``tokens[i : i + block_size]`` and its targets are the same shifted by one.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, name: str = "data") -> None:
        if len(tokens) <= block_size:
            raise UserError(
                f"{name} has {len(tokens)} tokens, fewer than one window of block_size + 1 = "
                f"{block_size + 1}; use more text or a smaller block_size"
            )
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.tokens) - self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = torch.from_numpy(self.tokens[i : i + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


def make_loader(dataset: TokenWindows, batch_size: int, seed: int) -> DataLoader:
    """Shuffled batches, the order fixed by ``seed`` (the same seed gives the same batches)."""
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, generator=generator)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True)


def infinite_batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches forever, epoch after epoch, each epoch in a new shuffled order."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise UserError("the data loader produced no batch: fewer windows than batch_size")


def fixed_batches(
    dataset: TokenWindows, batch_size: int, n_batches: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same ``n_batches`` batches every call: loss estimates comparable across steps."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(dataset), (n_batches, batch_size), generator=g)
    batches = []
    for row in starts.tolist():
        xs, ys = zip(*(dataset[i] for i in row), strict=True)
        batches.append((torch.stack(xs), torch.stack(ys)))
    return batches
