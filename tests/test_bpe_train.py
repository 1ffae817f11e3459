"""Training a byte-level BPE: the learned merges, incremental counts, and the trained tokenizer
used everywhere a tokenizer is."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from gpt2.bpe import BPETokenizer
from gpt2.bpe_train import PairIndex, count_words, merge_ids, train_bpe
from gpt2.cli import main
from gpt2.errors import UserError
from gpt2.shards import load_split
from gpt2.tokenizer import EOT_TEXT, load_tokenizer


@pytest.fixture(scope="module")
def shakespeare_text(asset_cache: Path) -> str:
    return (asset_cache / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def trained(shakespeare_text: str) -> BPETokenizer:
    counts = count_words([shakespeare_text], special_tokens=[EOT_TEXT])
    return train_bpe(counts, 4096, [EOT_TEXT], show_progress=False)


def test_trained_4096_round_trips_every_document(
    trained: BPETokenizer, shakespeare_text: str
) -> None:
    assert trained.vocab_size == 4096
    assert len(trained.merges) == 4096 - 256 - 1
    assert trained.special_tokens == {EOT_TEXT: 4095}
    documents = shakespeare_text.split("\n\n")
    assert len(documents) > 7000
    for doc in documents:
        assert trained.decode(trained.encode(doc)) == doc
    ids = trained.encode(shakespeare_text)
    assert trained.decode(ids) == shakespeare_text
    assert len(ids) < 0.32 * len(
        shakespeare_text.encode("utf-8")
    )  # it compresses: ~3.2 bytes a token


def test_trained_fast_path_and_transformers_give_identical_ids(
    trained: BPETokenizer, shakespeare_text: str, tmp_path: Path
) -> None:
    ids = trained.encode(shakespeare_text)
    encoding = trained.tiktoken_encoding()
    assert encoding is not None, trained.tiktoken_mismatch
    assert encoding.encode_ordinary(shakespeare_text) == ids
    transformers = pytest.importorskip("transformers")
    trained.save_hf(tmp_path)
    hf = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    assert hf(shakespeare_text)["input_ids"] == ids
    assert hf.convert_tokens_to_ids(EOT_TEXT) == 4095


def test_trained_saves_and_loads(trained: BPETokenizer, tmp_path: Path) -> None:
    trained.save(tmp_path)
    assert load_tokenizer(tmp_path).to_dict() == trained.to_dict()
    again = BPETokenizer.from_hf_files(*trained.save_hf(tmp_path / "hf"))
    assert again.to_dict() == trained.to_dict() | {"name": "bpe"}


def test_most_frequent_pair_first_and_ties_by_bytes() -> None:
    counts = {"aab": 3, "ab": 2, "cd": 5, "dc": 5}
    tok = train_bpe(counts, 256 + 4, show_progress=False)
    # (a,b), (c,d) and (d,c) all occur 5 times: the smallest bytes first; then (a,ab), 3 times.
    assert tok.merges == [(b"a", b"b"), (b"c", b"d"), (b"d", b"c"), (b"a", b"ab")]
    assert tok.encode("aab cd") == [259, 32, 257]


def test_training_is_deterministic_whatever_the_order(shakespeare_text: str) -> None:
    counts = count_words([shakespeare_text[:200_000]])
    items = list(counts.items())
    random.Random(0).shuffle(items)
    a = train_bpe(counts, 600, show_progress=False)
    b = train_bpe(dict(items), 600, show_progress=False)
    assert a.merges == b.merges and a.vocab == b.vocab


def full_pair_count(words: list[list[int]], freqs: list[int]) -> Counter:
    counts: Counter = Counter()
    for word, freq in zip(words, freqs, strict=True):
        for pair in zip(word, word[1:], strict=False):
            counts[pair] += freq
    return counts


def test_incremental_counts_equal_a_full_recount(shakespeare_text: str) -> None:
    index = PairIndex(count_words([shakespeare_text[:50_000]]))
    for new_id in range(256, 356):
        pair = max(index.counts, key=lambda p: (index.counts[p], -p[0], -p[1]))
        index.merge(pair, new_id)
        recount = full_pair_count(index.words, index.freqs)
        assert {p: c for p, c in index.counts.items() if c} == dict(recount)


def test_merge_ids_left_to_right() -> None:
    assert merge_ids([1, 1, 1], (1, 1), 9) == [9, 1]
    assert merge_ids([1, 1, 1, 1], (1, 1), 9) == [9, 9]
    assert merge_ids([2, 1, 2, 1], (1, 2), 9) == [2, 9, 1]


def test_special_tokens_are_not_learned() -> None:
    counts = count_words(["hello<|endoftext|>hello<|endoftext|>" * 50], special_tokens=[EOT_TEXT])
    assert set(counts) == {"hello"}
    tok = train_bpe(counts, 300, [EOT_TEXT, "<pad>"], show_progress=False)
    assert tok.special_tokens == {EOT_TEXT: tok.vocab_size - 2, "<pad>": tok.vocab_size - 1}


def test_vocab_size_too_small() -> None:
    with pytest.raises(UserError, match="below the 256 bytes \\+ 1 special"):
        train_bpe({"ab": 1}, 256, [EOT_TEXT], show_progress=False)


def test_small_corpus_stops_when_pairs_run_out(caplog: pytest.LogCaptureFixture) -> None:
    tok = train_bpe({"abc": 1}, 1000, show_progress=False)
    assert tok.merges == [(b"a", b"b"), (b"ab", b"c")]
    assert "ran out of pairs" in caplog.text


def test_cli_trained_tokenizer_prepares_trains_and_samples(
    tmp_path: Path, shakespeare_text: str
) -> None:
    corpus = tmp_path / "in.txt"
    corpus.write_text(shakespeare_text[:100_000], encoding="utf-8")
    tok_dir, data, run = tmp_path / "tok", tmp_path / "data", tmp_path / "run"
    assert (
        main(
            [
                "-q",
                "tokenizer",
                "train",
                "--input",
                str(corpus),
                "--vocab-size",
                "400",
                "--out",
                str(tok_dir),
            ]
        )
        == 0
    )
    assert {p.name for p in tok_dir.iterdir()} == {"tokenizer.json", "vocab.json", "merges.txt"}
    assert (
        main(
            [
                "-q",
                "prepare",
                "--input",
                str(corpus),
                "--tokenizer",
                str(tok_dir),
                "--out",
                str(data),
            ]
        )
        == 0
    )
    tok = load_tokenizer(data)
    [train_ids] = load_split(data, "train")
    assert tok.vocab_size == 400 and train_ids.max() < 400
    assert tok.decode(train_ids.tolist()) == shakespeare_text[: len(tok.decode(train_ids.tolist()))]
    args = ["-q", "train", "--data", str(data), "--out-dir", str(run), "--model", "tiny", "--max-iters", "2",
            "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "2", "--sample-tokens", "4"]  # fmt: skip
    assert main(args) == 0
    assert (
        main(
            [
                "-q",
                "sample",
                "--checkpoint",
                str(run),
                "--max-new-tokens",
                "5",
                "--prompt",
                "ROMEO:",
            ]
        )
        == 0
    )
    hf_dir = tmp_path / "hf"
    assert (
        main(["-q", "tokenizer", "export-hf", "--tokenizer", str(tok_dir), "--out", str(hf_dir)])
        == 0
    )
    assert (
        BPETokenizer.from_hf_files(hf_dir / "vocab.json", hf_dir / "merges.txt").merges
        == tok.merges
    )


def test_cli_tokenizer_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = tmp_path / "in.txt"
    corpus.write_text("some text", encoding="utf-8")
    cases = [
        (["--input", str(tmp_path / "nope.txt"), "--vocab-size", "300"], "input file not found"),
        (["--input", str(corpus), "--vocab-size", "256"], "below the 256 bytes + 1 special"),
        (["--input", str(tmp_path / "empty_dir"), "--vocab-size", "300"], "holds no"),
    ]
    (tmp_path / "empty_dir").mkdir()
    for extra, message in cases:
        code = main(["tokenizer", "train", *extra, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
