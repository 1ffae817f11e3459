"""Preparing token files and reading them back as (input, target) windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2.data import TokenWindows, load_split, make_loader, prepare, text_chunks
from gpt2.errors import UserError
from gpt2.tokenizer import GPT2Tokenizer, load_tokenizer


def test_prepare_char_writes_splits_meta_and_tokenizer(tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("abcdefghij" * 10, encoding="utf-8")
    meta = prepare(src, tmp_path / "out", tokenizer="char", show_progress=False)
    assert meta["train_tokens"] == 90 and meta["val_tokens"] == 10
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 10 and meta["tokenizer"] == "char"
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    assert train[:10].tolist() == list(range(10))
    assert (
        load_tokenizer(tmp_path / "out").decode(load_split(tmp_path / "out", "val").tolist())
        == "abcdefghij"
    )


def test_prepare_gpt2_tinyshakespeare_keeps_every_token(shakespeare: Path, tmp_path: Path) -> None:
    meta = prepare(shakespeare, tmp_path, tokenizer="gpt2", show_progress=False)
    assert meta["train_tokens"] + meta["val_tokens"] == 338_025
    ids = np.concatenate([load_split(tmp_path, "train"), load_split(tmp_path, "val")])
    assert ids.tolist() == GPT2Tokenizer().encode(shakespeare.read_text(encoding="utf-8"))


def test_chunks_split_only_before_a_non_space_after_newline() -> None:
    text = "one\n\n  two\nthree\n four\nfive"
    chunks = list(text_chunks(text, size=3))
    assert "".join(chunks) == text
    for chunk in chunks[:-1]:
        assert chunk.endswith("\n")


def test_windows_are_shifted_by_one() -> None:
    tokens = np.arange(20, dtype=np.uint16)
    ds = TokenWindows(tokens, block_size=5)
    assert len(ds) == 15
    x, y = ds[3]
    assert x.tolist() == [3, 4, 5, 6, 7] and y.tolist() == [4, 5, 6, 7, 8]
    assert x.dtype == torch.int64


def test_loader_order_depends_only_on_seed() -> None:
    ds = TokenWindows(np.arange(100, dtype=np.uint16), block_size=4)
    first = [x for x, _ in make_loader(ds, 8, seed=1)]
    again = [x for x, _ in make_loader(ds, 8, seed=1)]
    other = [x for x, _ in make_loader(ds, 8, seed=2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_corpus_shorter_than_one_window() -> None:
    with pytest.raises(UserError, match="fewer than one window"):
        TokenWindows(np.arange(8, dtype=np.uint16), block_size=8)


@pytest.mark.parametrize(
    "content, message",
    [(None, "input file not found"), ("", "input file is empty"), ("   \n", "input file is empty")],
)
def test_prepare_bad_input(tmp_path: Path, content: str | None, message: str) -> None:
    src = tmp_path / "in.txt"
    if content is not None:
        src.write_text(content)
    with pytest.raises(UserError, match=message):
        prepare(src, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_prepare_refuses_non_utf8(tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_bytes(b"abc\xff\xfe")
    with pytest.raises(UserError, match="not UTF-8"):
        prepare(src, tmp_path / "out", show_progress=False)
