"""Reading corpora: text files in pieces, JSONL(.gz), Parquet, saved Hugging Face datasets, folders;
positions to resume from; bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

import gpt2.corpus
from gpt2.corpus import Position, ReadStats, Source, find_sources, read_corpus, text_chunks
from gpt2.errors import UserError
from gpt2.tokenizer import GPT2Tokenizer

# Texts where a careless cut changes the ids: blank lines, trailing spaces, runs of white space.
TRICKY = "a\n\nb  \nc\t\n d\n\n\ne   f\r\ng 'll\n" * 50 + "x" * 100 + " é\n中\n😀 end"


@pytest.fixture(scope="module")
def gpt2_tok(asset_cache: Path) -> GPT2Tokenizer:
    return GPT2Tokenizer()


def pieces_of(sources: list[Source], start: Position | None = None, **kw) -> list:
    return list(read_corpus(sources, start or Position(), **kw))


def test_text_file_pieces_give_the_ids_of_the_whole(
    tmp_path: Path, shakespeare: Path, gpt2_tok: GPT2Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpt2.corpus, "PIECE_BYTES", 4096)
    text = shakespeare.read_text(encoding="utf-8")[:300_000] + TRICKY
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    pieces = pieces_of(find_sources([path]))
    assert len(pieces) > 50
    assert "".join(p.text for p in pieces) == text
    assert [p.ends_doc for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert {p.doc for p in pieces} == {0}
    ids = [i for p in pieces for i in gpt2_tok.encode_ordinary(p.text)]
    assert ids == gpt2_tok.encode_ordinary(text)


def test_text_chunks_give_the_ids_of_the_whole(gpt2_tok: GPT2Tokenizer) -> None:
    text = TRICKY * 20
    chunks = list(text_chunks(text, size=100))
    assert len(chunks) > 20 and "".join(chunks) == text
    assert [i for c in chunks for i in gpt2_tok.encode(c)] == gpt2_tok.encode(text)


def test_text_without_safe_cuts_is_cut_at_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpt2.corpus, "PIECE_BYTES", 100)
    monkeypatch.setattr(gpt2.corpus, "MAX_PIECE_BYTES", 1000)
    path = tmp_path / "one-line.txt"
    path.write_text("x" * 5000, encoding="utf-8")
    pieces = pieces_of(find_sources([path]))
    assert "".join(p.text for p in pieces) == "x" * 5000
    assert max(len(p.text) for p in pieces) <= 1100


def test_resume_from_any_position_gives_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpt2.corpus, "PIECE_BYTES", 256)
    (tmp_path / "a.txt").write_text(TRICKY, encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5))
    )
    (tmp_path / "c.txt").write_text("last file\n", encoding="utf-8")
    sources = find_sources([tmp_path])
    assert [s.kind for s in sources] == ["text", "jsonl", "text"]
    everything = pieces_of(sources)
    assert [p.doc for p in everything if p.ends_doc] == list(range(7))
    for k, piece in enumerate(everything):
        assert pieces_of(sources, piece.after) == everything[k + 1 :]


def test_jsonl_and_gz(tmp_path: Path) -> None:
    docs = ["first doc", "second\ndoc with newline", "", "third ünïcödé"]
    lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
    (tmp_path / "plain.jsonl").write_text(lines + "\n", encoding="utf-8")
    with gzip.open(tmp_path / "packed.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    for name in ("plain.jsonl", "packed.jsonl.gz"):
        stats = ReadStats()
        pieces = pieces_of(find_sources([tmp_path / name]), stats=stats)
        assert [p.text for p in pieces] == [
            "first doc",
            "second\ndoc with newline",
            "third ünïcödé",
        ]
        assert [p.doc for p in pieces] == [0, 1, 2] and all(p.ends_doc for p in pieces)
        assert stats.documents == 3 and stats.empty_documents == 1
        # resuming inside a compressed file reads on from the recorded place
        assert pieces_of(find_sources([tmp_path / name]), pieces[0].after) == pieces[1:]


def test_malformed_jsonl_stops_or_skips(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken\n{"other": 1}\n["x"]\n{"text": "fine"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON .*--on-bad-line skip"):
        pieces_of(find_sources([path]))
    stats = ReadStats()
    pieces = pieces_of(find_sources([path]), stats=stats, on_bad_line="skip")
    assert [p.text for p in pieces] == ["ok", "fine"]
    assert stats.skipped_lines == 3
    with pytest.raises(UserError, match="bad.jsonl:1: no string field 'body'"):
        pieces_of(find_sources([path]), field="body")


def test_non_utf8_is_replaced_and_counted(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 ok \xff\xfe end \xef\xbf\xbd kept")
    (tmp_path / "b.jsonl").write_bytes(
        b'{"text": "bad \xc3 byte"}\n{"text": "lone \\ud800 surrogate"}\n'
    )
    stats = ReadStats()
    texts = [p.text for p in pieces_of(find_sources([tmp_path]), stats=stats)]
    assert texts == [
        "caf\ufffd ok \ufffd\ufffd end \ufffd kept",
        "bad \ufffd byte",
        "lone \ufffd surrogate",
    ]
    assert stats.replaced_characters == 5  # the U+FFFD already in the file is not counted


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"row {i}" for i in range(50)] + [None, ""]
    pq.write_table(
        pa.table({"text": texts, "n": list(range(52))}), tmp_path / "d.parquet", row_group_size=7
    )
    sources = find_sources([tmp_path])
    stats = ReadStats()
    pieces = pieces_of(sources, stats=stats)
    assert [p.text for p in pieces] == texts[:50]
    assert stats.empty_documents == 2
    for k in (0, 6, 7, 8, 30):  # inside and at the edges of row groups
        assert pieces_of(sources, pieces[k].after) == pieces[k + 1 :]
    with pytest.raises(UserError, match="has no column 'body' \\(columns: text, n\\)"):
        pieces_of(sources, field="body")
    (tmp_path / "d.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        pieces_of(sources)


def test_hf_dataset_saved_to_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    texts = [f"document number {i}" for i in range(30)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    source = Source("hf", str(tmp_path / "ds"))
    pieces = pieces_of([source])
    assert [p.text for p in pieces] == texts
    assert pieces_of([source], pieces[9].after) == pieces[10:]
    with pytest.raises(UserError, match="no column 'body'"):
        pieces_of([source], field="body")
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["v"]})}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert [
        p.text for p in pieces_of([Source("hf", str(tmp_path / "dd"), split="validation")])
    ] == ["v"]


def test_find_sources_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="input file not found"):
        find_sources([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.csv").write_text("a,b")
    with pytest.raises(UserError, match="holds no .txt"):
        find_sources([tmp_path / "empty"])
    with pytest.raises(UserError, match="no input"):
        find_sources([])


def test_folder_is_read_in_sorted_order(tmp_path: Path) -> None:
    for name in ("b.txt", "a/z.txt", "a/y.md", "c.jsonl.gz", "skip.csv"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".gz"):
            with gzip.open(path, "wt") as f:
                f.write('{"text": "gz"}\n')
        else:
            path.write_text(name)
    assert [Path(s.location).relative_to(tmp_path).as_posix() for s in find_sources([tmp_path])] == [
        "a/y.md", "a/z.txt", "b.txt", "c.jsonl.gz",
    ]  # fmt: skip
