"""``prepare_text``: one text file becomes a train and a val shard (llm.c's format), split by
tokens; re-preparing replaces the folder whole or not at all; older folders are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import gpt2.prepare
from gpt2.cli import main
from gpt2.corpus import text_chunks
from gpt2.errors import UserError
from gpt2.loader import WindowSequence
from gpt2.prepare import prepare_text
from gpt2.shards import MAGIC, load_split, read_meta
from gpt2.tokenizer import CharTokenizer, GPT2Tokenizer, load_tokenizer


def test_prepare_char_writes_two_shards_meta_and_tokenizer(tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("abcdefghij" * 10, encoding="utf-8")
    meta = prepare_text(src, tmp_path / "out", tokenizer="char", show_progress=False)
    assert meta["train_tokens"] == 90 and meta["val_tokens"] == 10
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 10 and meta["tokenizer"] == "char"
    assert meta["shards"] == {"train": ["train_000000.bin"], "val": ["val_000000.bin"]}
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    header = np.fromfile(tmp_path / "out" / "train_000000.bin", dtype="<i4", count=3)
    assert header.tolist() == [MAGIC, 1, 90]
    [train] = load_split(tmp_path / "out", "train")
    assert train[:10].tolist() == list(range(10))
    [val] = load_split(tmp_path / "out", "val")
    assert load_tokenizer(tmp_path / "out").decode(val.tolist()) == "abcdefghij"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "meta.json", "tokenizer.json", "train_000000.bin", "val_000000.bin"
    ]  # fmt: skip
    assert (tmp_path / "out" / "train_000000.bin").stat().st_mode & 0o777 == 0o644


def test_prepare_gpt2_tinyshakespeare_keeps_every_token(shakespeare: Path, tmp_path: Path) -> None:
    meta = prepare_text(shakespeare, tmp_path / "d", show_progress=False)  # gpt2: the default
    assert meta["tokenizer"] == "gpt2" and meta["train_tokens"] + meta["val_tokens"] == 338_025
    ids = np.concatenate(load_split(tmp_path / "d", "train") + load_split(tmp_path / "d", "val"))
    assert ids.tolist() == GPT2Tokenizer().encode(shakespeare.read_text(encoding="utf-8"))


def test_chunks_split_only_before_a_non_space_after_newline() -> None:
    text = "one\n\n  two\nthree\n four\nfive"
    chunks = list(text_chunks(text, size=3))
    assert "".join(chunks) == text
    for chunk in chunks[:-1]:
        assert chunk.endswith("\n")


def test_windows_of_a_prepared_split_are_shifted_by_one(tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("abcdefghij" * 10, encoding="utf-8")
    prepare_text(src, tmp_path / "out", tokenizer="char", show_progress=False)
    windows = WindowSequence(load_split(tmp_path / "out", "train"), block_size=5, seed=0)
    x, y = windows.batch(0, 4)
    assert x.shape == (4, 5) and str(x.dtype) == str(y.dtype) == "torch.int64"
    assert (x[:, 1:] == y[:, :-1]).all() and ((y - x) % 10 == 1).all()


@pytest.mark.parametrize(
    "content, message",
    [(None, "input file not found"), ("", "input file is empty"), ("   \n", "input file is empty")],
)
def test_prepare_bad_input(tmp_path: Path, content: str | None, message: str) -> None:
    src = tmp_path / "in.txt"
    if content is not None:
        src.write_text(content)
    with pytest.raises(UserError, match=message):
        prepare_text(src, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_prepare_refuses_non_utf8(tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_bytes(b"abc\xff\xfe")
    with pytest.raises(UserError, match="not UTF-8"):
        prepare_text(src, tmp_path / "out", show_progress=False)


def test_reprepare_replaces_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, out = tmp_path / "in.txt", tmp_path / "out"
    src.write_text("abcdefghij" * 10, encoding="utf-8")
    prepare_text(src, out, tokenizer="char", show_progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match=r"another tokenizer \(char, 10 ids; now gpt2, 50257\)"):
        prepare_text(src, out, tokenizer="gpt2", show_progress=False)

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gpt2.prepare, "write_shard", full_disk)
    with pytest.raises(UserError, match=f"cannot write {out}: No space left on device"):
        prepare_text(src, out, tokenizer="char", val_fraction=0.2, show_progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out"]  # no temp folder left
    monkeypatch.undo()
    meta = prepare_text(src, out, tokenizer="char", val_fraction=0.2, show_progress=False)
    assert meta["val_tokens"] == 20 and read_meta(out) == meta


def test_a_folder_from_an_older_release_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Before shards, ``gpt2 prepare`` wrote headerless train.bin/val.bin and a meta.json."""
    old = tmp_path / "old"
    old.mkdir()
    np.arange(100, dtype=np.uint16).tofile(old / "train.bin")
    np.arange(10, dtype=np.uint16).tofile(old / "val.bin")
    (old / "meta.json").write_text(json.dumps({"version": 1, "tokenizer": "char", "vocab_size": 100, "dtype": "uint16"}))  # fmt: skip
    args = ["train", "--data", str(old), "--out-dir", str(tmp_path / "run"), "--model", "tiny"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "prepared by an older gpt2 (headerless train.bin/val.bin)" in err
    assert "run `gpt2 prepare` again" in err


def test_the_demo_prepares_its_data_again_over_an_older_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shakespeare: Path
) -> None:
    from gpt2.commands.train import DEMO_DATA_DIR, demo_data_dir

    monkeypatch.chdir(tmp_path)
    DEMO_DATA_DIR.mkdir(parents=True)
    np.arange(100, dtype=np.uint16).tofile(DEMO_DATA_DIR / "train.bin")
    (DEMO_DATA_DIR / "meta.json").write_text('{"version": 1, "dtype": "uint16"}')
    CharTokenizer.from_text(shakespeare.read_text(encoding="utf-8")).save(DEMO_DATA_DIR)
    with pytest.raises(UserError, match="older gpt2"):
        read_meta(DEMO_DATA_DIR)
    meta = read_meta(demo_data_dir())  # replaced whole, with the same characters
    n_chars = len(shakespeare.read_text(encoding="utf-8"))
    assert meta["tokenizer"] == "char" and meta["vocab_size"] == 65
    assert meta["train_tokens"] + meta["val_tokens"] == n_chars
    assert meta["val_tokens"] == int(n_chars * 0.1)
    assert sorted(p.name for p in DEMO_DATA_DIR.iterdir()) == [
        "meta.json", "tokenizer.json", "train_000000.bin", "val_000000.bin"
    ]  # fmt: skip
    assert demo_data_dir() == DEMO_DATA_DIR and read_meta(DEMO_DATA_DIR) == meta  # kept as is


def test_a_trainer_without_data_says_what_to_do() -> None:
    from gpt2.config import TrainConfig
    from gpt2.train import Trainer

    with pytest.raises(UserError, match="no data folder: set data to a folder from `gpt2 prepare`"):
        Trainer(TrainConfig(), show_progress=False)
