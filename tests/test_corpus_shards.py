"""``prepare`` for corpora: shards in order, whole documents to val, resume after a crash or a kill
to byte-identical shards, refusals, and the shards read back for training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpt2.corpus
import gpt2.prepare
import gpt2.shards
from gpt2.bpe import BPETokenizer
from gpt2.bpe_train import count_words, train_bpe
from gpt2.cli import main
from gpt2.corpus import Source, find_sources
from gpt2.errors import UserError
from gpt2.loader import WindowSequence
from gpt2.prepare import is_val_document, prepare_shards
from gpt2.shards import HEADER_BYTES, MAGIC, load_split, open_shard, read_meta
from gpt2.tokenizer import GPT2Tokenizer

EOT = 50256


@pytest.fixture(scope="module")
def documents(asset_cache: Path) -> list[str]:
    text = (asset_cache / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    return [d for d in text.split("\n\n") if d]


@pytest.fixture(scope="module")
def gpt2_tok(asset_cache: Path) -> GPT2Tokenizer:
    return GPT2Tokenizer()


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return path


def expected_streams(
    docs: list[str], tok: GPT2Tokenizer, val_fraction: float
) -> dict[str, list[int]]:
    streams: dict[str, list[int]] = {"train": [], "val": []}
    for n, doc in enumerate(docs):
        streams["val" if is_val_document(n, val_fraction) else "train"] += tok.encode_ordinary(
            doc
        ) + [EOT]
    return streams


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


def prepare(sources: list[Source], out: Path, tok, **kw) -> dict:
    kw.setdefault("show_progress", False)
    return prepare_shards(sources, out, tok, **kw)


def test_shards_hold_the_documents_in_order(
    tmp_path: Path, documents: list[str], gpt2_tok: GPT2Tokenizer
) -> None:
    docs = documents[:400]
    corpus = write_jsonl(tmp_path / "in" / "c.jsonl", docs)
    meta = prepare(
        find_sources([corpus]), tmp_path / "out", gpt2_tok, shard_tokens=3000, val_fraction=0.1
    )
    want = expected_streams(docs, gpt2_tok, 0.1)
    assert meta["documents"] == {"train": 360, "val": 40}
    for split in ("train", "val"):
        shards = load_split(tmp_path / "out", split)
        assert all(len(s) == 3000 for s in shards[:-1]) and 0 < len(shards[-1]) <= 3000
        assert np.concatenate(shards).tolist() == want[split]
        assert meta[f"{split}_tokens"] == len(want[split])
        header = np.fromfile(tmp_path / "out" / meta["shards"][split][0], dtype="<i4", count=3)
        assert header.tolist() == [MAGIC, 1, len(shards[0])]
    assert read_meta(tmp_path / "out")["vocab_size"] == 50257
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"meta.json", "tokenizer.json", *meta["shards"]["train"], *meta["shards"]["val"]}  # fmt: skip
    # the trainer's view: all train shards as one sequence
    shards = load_split(tmp_path / "out", "train")
    windows = WindowSequence(shards, block_size=16, seed=0)
    n0 = len(shards[0]) - 16  # windows in shard 0: they never cross into shard 1
    last, first = windows.gather(np.array([n0 - 1, n0])).tolist()
    assert last == want["train"][n0 - 1 : n0 + 16] and first == want["train"][3000:3017]


def test_workers_and_reference_encoder_give_identical_shards(tmp_path: Path, documents: list[str], gpt2_tok: GPT2Tokenizer) -> None:  # fmt: skip
    sources = find_sources([write_jsonl(tmp_path / "c.jsonl", documents[:300])])
    prepare(sources, tmp_path / "one", gpt2_tok, shard_tokens=2000, workers=1)
    prepare(sources, tmp_path / "two", gpt2_tok, shard_tokens=2000, workers=2)
    prepare(sources, tmp_path / "ref", gpt2_tok, shard_tokens=2000, workers=1, fast=False)
    assert (
        shard_bytes(tmp_path / "one")
        == shard_bytes(tmp_path / "two")
        == shard_bytes(tmp_path / "ref")
    )
    assert len(shard_bytes(tmp_path / "one")) > 5


class Crash(KeyboardInterrupt):
    """Stands in for a kill: not a UserError, so the run leaves its files as a kill would."""


@pytest.mark.parametrize("where", ["after_shard_rename", "mid_append"])
def test_resume_after_crash_gives_identical_shards(
    where: str,
    tmp_path: Path,
    documents: list[str],
    gpt2_tok: GPT2Tokenizer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sources = find_sources([write_jsonl(tmp_path / "c.jsonl", documents * 2)])
    kw = {"shard_tokens": 30_000, "val_fraction": 0.05}
    whole = prepare(sources, tmp_path / "whole", gpt2_tok, **kw)
    monkeypatch.setattr(gpt2.prepare, "BATCH_CHARS", 20_000)  # many batches; the output is the same
    calls = {"n": 0}
    original = (
        gpt2.shards.ShardWriter._finish_shard
        if where == "after_shard_rename"
        else gpt2.shards.ShardWriter.append
    )

    def crashing(self, *args):
        original(self, *args)
        calls["n"] += 1
        if calls["n"] == 7:
            if where == "mid_append":  # tokens written past the last checkpoint, then death
                self.file.write(b"\x01\x02" * 100)
                self.file.flush()
            raise Crash

    monkeypatch.setattr(gpt2.shards.ShardWriter, original.__name__, crashing)
    with pytest.raises(Crash):
        prepare(sources, tmp_path / "cut", gpt2_tok, **kw)
    assert (tmp_path / "cut" / "progress.json").is_file()
    monkeypatch.setattr(gpt2.shards.ShardWriter, original.__name__, original)
    resumed = prepare(sources, tmp_path / "cut", gpt2_tok, **kw)
    assert shard_bytes(tmp_path / "cut") == shard_bytes(tmp_path / "whole")
    assert resumed["shards"] == whole["shards"] and resumed["documents"] == whole["documents"]
    assert (
        not list((tmp_path / "cut").glob("*.partial"))
        and not (tmp_path / "cut" / "progress.json").exists()
    )


def run_until_killed(args: list[str], kill_at: str) -> None:
    """Run ``gpt2 prepare`` in a child process and SIGKILL it once it logs ``kill_at``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt2", "prepare", *args], stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if kill_at in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def corpus_of(tmp_path: Path, documents: list[str], copies: int) -> Path:
    return write_jsonl(
        tmp_path / "corpus" / "docs.jsonl", [f"{i}: {d}" for i in range(copies) for d in documents]
    )


@pytest.mark.parametrize("copies, shard_tokens", [pytest.param(6, 100_000, id="2M-tokens")])
def test_resume_after_sigkill_gives_identical_shards(
    copies: int, shard_tokens: int, tmp_path: Path, documents: list[str], gpt2_tok: GPT2Tokenizer
) -> None:
    corpus = corpus_of(tmp_path, documents, copies)
    options = ["--shard-tokens", str(shard_tokens), "--workers", "2"]
    run_until_killed(
        ["--input", str(corpus), "--out", str(tmp_path / "killed"), *options],
        "wrote train_000004.bin",
    )
    assert (tmp_path / "killed" / "progress.json").is_file() and not (
        tmp_path / "killed" / "meta.json"
    ).exists()
    assert (
        main(["-q", "prepare", "--input", str(corpus), "--out", str(tmp_path / "killed"), *options])
        == 0
    )
    prepare(
        find_sources([corpus]), tmp_path / "whole", gpt2_tok, shard_tokens=shard_tokens, workers=2
    )
    assert shard_bytes(tmp_path / "killed") == shard_bytes(tmp_path / "whole")
    meta = read_meta(tmp_path / "killed")
    assert meta["train_tokens"] + meta["val_tokens"] > copies * 340_000
    assert len(meta["shards"]["train"]) > 15


@pytest.mark.slow
def test_20m_tokens_killed_and_resumed(
    tmp_path: Path, documents: list[str], gpt2_tok: GPT2Tokenizer
) -> None:
    corpus = corpus_of(tmp_path, documents, 60)  # ~20.6M tokens
    options = ["--shard-tokens", "1000000", "--workers", "2"]
    run_until_killed(
        ["--input", str(corpus), "--out", str(tmp_path / "killed"), *options],
        "wrote train_000009.bin",
    )
    assert (
        main(["-q", "prepare", "--input", str(corpus), "--out", str(tmp_path / "killed"), *options])
        == 0
    )
    assert (
        main(["-q", "prepare", "--input", str(corpus), "--out", str(tmp_path / "whole"), *options])
        == 0
    )
    assert shard_bytes(tmp_path / "killed") == shard_bytes(tmp_path / "whole")
    meta = read_meta(tmp_path / "whole")
    assert meta["train_tokens"] + meta["val_tokens"] > 20_000_000


def test_finished_folder_is_left_alone(
    tmp_path: Path, documents: list[str], gpt2_tok: GPT2Tokenizer
) -> None:
    sources = find_sources([write_jsonl(tmp_path / "c.jsonl", documents[:100])])
    first = prepare(sources, tmp_path / "out", gpt2_tok, shard_tokens=1000)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    assert prepare(sources, tmp_path / "out", gpt2_tok, shard_tokens=1000) == first
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == stamps


def test_folder_of_another_tokenizer_or_settings_is_refused(tmp_path: Path, documents: list[str], gpt2_tok: GPT2Tokenizer) -> None:  # fmt: skip
    sources = find_sources([write_jsonl(tmp_path / "c.jsonl", documents[:100])])
    prepare(sources, tmp_path / "out", gpt2_tok, shard_tokens=1000)
    before = shard_bytes(tmp_path / "out")
    small = train_bpe(count_words(documents[:100]), 300, ["<|endoftext|>"], show_progress=False)
    with pytest.raises(UserError, match="holds shards prepared with a different tokenizer"):
        prepare(sources, tmp_path / "out", small, shard_tokens=1000)
    with pytest.raises(UserError, match="different setting 'shard_tokens'"):
        prepare(sources, tmp_path / "out", gpt2_tok, shard_tokens=2000)
    assert shard_bytes(tmp_path / "out") == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine " * 50)
    with pytest.raises(UserError, match="not empty and holds no prepare run"):
        prepare(sources, tmp_path / "other", gpt2_tok)
    assert main(["-q", "prepare", "--input", str(tmp_path / "other" / "notes.txt"), "--out", str(tmp_path / "classic")]) == 0  # fmt: skip
    with pytest.raises(UserError, match="different setting"):
        prepare(sources, tmp_path / "classic", gpt2_tok)


def test_bad_input_leaves_nothing_behind(
    tmp_path: Path, documents: list[str], gpt2_tok: GPT2Tokenizer
) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", documents[:200])
    with open(corpus, "a", encoding="utf-8") as f:
        f.write("{broken\n")
    with pytest.raises(UserError, match=r"c.jsonl:201: not valid JSON"):
        prepare(find_sources([corpus]), tmp_path / "out", gpt2_tok, shard_tokens=500)
    assert not (tmp_path / "out").exists()
    meta = prepare(
        find_sources([corpus]), tmp_path / "out", gpt2_tok, shard_tokens=500, on_bad_line="skip"
    )
    assert (
        meta["stats"]["skipped_lines"] == 1
        and meta["documents"]["train"] + meta["documents"]["val"] == 200
    )
    one_doc = write_jsonl(tmp_path / "one.jsonl", ["only one document"])
    with pytest.raises(UserError, match="0 train and 1 val documents"):
        prepare(find_sources([one_doc]), tmp_path / "one", gpt2_tok)
    assert not (tmp_path / "one").exists()
    with pytest.raises(UserError, match="must be at least 1"):
        prepare(find_sources([one_doc]), tmp_path / "x", gpt2_tok, shard_tokens=0)


def test_cli_folder_hf_dataset_and_training_on_shards(tmp_path: Path, documents: list[str], capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, doc in enumerate(documents[:300]):
        (folder / f"{i:04d}.txt").write_text(doc, encoding="utf-8")
    (folder / "bad.txt").write_bytes(b"caf\xe9\n")
    out = tmp_path / "out"
    assert main(["prepare", "--input", str(folder), "--out", str(out), "--shard-tokens", "2000", "--val-fraction", "0.1"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "301 documents" not in err and "1 invalid UTF-8 sequences replaced" in err
    meta = read_meta(out)
    assert meta["documents"] == {"train": 270, "val": 31} and len(meta["shards"]["train"]) > 3
    args = ["-q", "train", "--data", str(out), "--out-dir", str(tmp_path / "run"), "--model", "tiny", "--max-iters", "2",
            "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "2", "--sample-tokens", "4"]  # fmt: skip
    assert main(args) == 0
    assert (
        main(
            ["prepare", "--input", str(folder), "--tokenizer", "char", "--out", str(tmp_path / "c")]
        )
        == 2
    )
    assert "char tokenizer is for one text file" in capsys.readouterr().err
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": documents[:50]}).save_to_disk(str(tmp_path / "ds"))
    assert main(["-q", "prepare", "--hf-dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "hf"), "--shard-tokens", "2000"]) == 0  # fmt: skip
    assert sum(len(s) for s in load_split(tmp_path / "hf", "train")) > 1000


def test_gpt2_prepare_of_one_text_file_writes_llmc_shards(
    tmp_path: Path, shakespeare: Path
) -> None:
    assert main(["-q", "prepare", "--input", str(shakespeare), "--out", str(tmp_path)]) == 0
    meta = read_meta(tmp_path)
    assert meta["shards"] == {"train": ["train_000000.bin"], "val": ["val_000000.bin"]}
    for split in ("train", "val"):
        header = np.fromfile(tmp_path / f"{split}_000000.bin", dtype="<i4", count=3)
        assert header.tolist() == [MAGIC, 1, meta[f"{split}_tokens"]]  # gpt2 ids: uint16
    [train] = load_split(tmp_path, "train")
    assert isinstance(train, np.memmap) and len(train) == meta["train_tokens"]


def test_truncated_shard_is_refused(
    tmp_path: Path, documents: list[str], gpt2_tok: GPT2Tokenizer
) -> None:
    meta = prepare(
        find_sources([write_jsonl(tmp_path / "c.jsonl", documents[:50])]),
        tmp_path / "out",
        gpt2_tok,
    )
    path = tmp_path / "out" / meta["shards"]["train"][0]
    assert len(open_shard(path)) == meta["train_tokens"]
    with open(path, "r+b") as f:
        f.truncate(HEADER_BYTES + 10)
    with pytest.raises(UserError, match="truncated"):
        load_split(tmp_path / "out", "train")


def test_trained_bpe_tokenizer_prepares_shards(tmp_path: Path, documents: list[str]) -> None:
    tok = train_bpe(count_words(documents[:500]), 500, ["<|endoftext|>"], show_progress=False)
    assert isinstance(tok, BPETokenizer) and tok.tiktoken_encoding() is not None
    sources = find_sources([write_jsonl(tmp_path / "c.jsonl", documents[:200])])
    prepare(sources, tmp_path / "fast", tok, shard_tokens=3000)
    prepare(sources, tmp_path / "slow", tok, shard_tokens=3000, fast=False)
    assert shard_bytes(tmp_path / "fast") == shard_bytes(tmp_path / "slow")
    train = np.concatenate(load_split(tmp_path / "fast", "train"))
    assert train.max() == tok.eot_token == 499


def test_network_failure_keeps_the_checkpoint(
    tmp_path: Path, documents: list[str], gpt2_tok: GPT2Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = documents[:300]

    def stream(source: Source, offset: int, field: str, fail_at: int | None = None):
        for n in range(offset, len(rows)):
            if n == fail_at:
                raise gpt2.corpus.ReadInterrupted(
                    "cannot read dataset 'web/text': connection reset"
                )
            yield rows[n], True, n + 1, n + 1

    hf = [Source("hf", "web/text")]
    monkeypatch.setattr(gpt2.prepare, "BATCH_CHARS", 2000)
    monkeypatch.setattr(gpt2.corpus, "read_hf_dataset", stream)
    whole = prepare(hf, tmp_path / "whole", gpt2_tok, shard_tokens=1000)
    monkeypatch.setattr(
        gpt2.corpus, "read_hf_dataset", lambda s, o, f: stream(s, o, f, fail_at=200)
    )
    with pytest.raises(UserError, match="connection reset; run the same command again to resume"):
        prepare(hf, tmp_path / "cut", gpt2_tok, shard_tokens=1000)
    assert (tmp_path / "cut" / "progress.json").is_file()
    monkeypatch.setattr(gpt2.corpus, "read_hf_dataset", stream)
    assert prepare(hf, tmp_path / "cut", gpt2_tok, shard_tokens=1000)["shards"] == whole["shards"]
    assert shard_bytes(tmp_path / "cut") == shard_bytes(tmp_path / "whole")
