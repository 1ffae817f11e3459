"""The readable byte-level BPE against tiktoken's GPT-2 encoding, and its file formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

import gpt2.bpe
from gpt2.bpe import BPETokenizer, merges_from_ranks, ordinary_encoder, text_to_token, token_to_text
from gpt2.errors import UserError
from gpt2.tokenizer import EOT_TEXT, GPT2Tokenizer, get_tokenizer, load_tokenizer

EOT = 50256


@pytest.fixture(scope="module")
def vocab_files(asset_cache: Path) -> tuple[Path, Path]:
    folder = asset_cache / "gpt2-tokenizer"
    return folder / "encoder.json", folder / "vocab.bpe"


@pytest.fixture(scope="module")
def reference(vocab_files: tuple[Path, Path]) -> tiktoken.Encoding:
    """tiktoken's own GPT-2 encoding (its pattern, its loader), built from the local files."""
    encoder_json, vocab_bpe = vocab_files
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json)
    )
    return tiktoken.Encoding(
        "gpt2-reference",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: EOT},
    )


@pytest.fixture(scope="module")
def bpe(vocab_files: tuple[Path, Path]) -> BPETokenizer:
    return BPETokenizer.from_gpt2_files(*vocab_files)


# --- byte-exactness ---------------------------------------------------------------------------


def test_tinyshakespeare_identical(
    bpe: BPETokenizer, reference: tiktoken.Encoding, shakespeare: Path
) -> None:
    text = shakespeare.read_text(encoding="utf-8")
    ids = bpe.encode(text)
    assert ids == reference.encode(text)
    assert len(ids) == 338025
    assert bpe.decode(ids) == text


def test_every_single_byte(bpe: BPETokenizer, reference: tiktoken.Encoding) -> None:
    for b in range(256):
        text = chr(b)  # the code point; 128..255 are two UTF-8 bytes
        assert bpe.encode_ordinary(text) == reference.encode_ordinary(text), b
        token = bpe.vocab[bytes([b])]  # the single byte as a token, alone: often invalid UTF-8
        assert token == reference.encode_single_token(bytes([b]))
        assert bpe.decode_bytes([token]) == bytes([b])
        assert bpe.decode([token]) == reference.decode([token], errors="replace")


SAMPLES = [
    "Café crème brûlée, naïve façade, Ångström, Straße",
    "漢字かなカナ、한국어 텍스트。中文分词测试",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️‍🔥",
    "العربية من اليمين إلى اليسار עברית גם כן",
    "tabs\there\t\tand\t \tmixed",
    "runs   of    spaces     and\n\n\nnewlines\r\n\r\n  \n \n",
    "digits 0 12 345 6789 1234567890 3.14159 1,000,000",
    "contractions: it's don't we're they've I'm you'll he'd IT'S DON'T 's 't",
    "   leading and trailing   ",
    "\n",
    "",
    " ",
    "a\u00a0b\u3000c\u2028d\u0085e\x0bf\x0cg",
    "<|endoftext|> spelled in text, and <|endoftext",
    "mixed123abc!!!???...---___ a-b_c.d",
    "\ufeffBOM and \ufffd replacement and \x00 null",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_hard_texts_identical(bpe: BPETokenizer, reference: tiktoken.Encoding, text: str) -> None:
    ids = bpe.encode_ordinary(text)
    assert ids == reference.encode_ordinary(text)
    assert bpe.decode(ids) == text


FRAGMENTS = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "'s", "'ll", "'", "a", "A", "é", "中", "😀", "1", "12",
             "!", "?!", ".", "\u00a0", "\u3000", "x", "the", " the", "ing", "\u200d", "\U0001f3fd"]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60))
def test_random_unicode_identical(
    bpe: BPETokenizer, reference: tiktoken.Encoding, text: str
) -> None:
    assert bpe.encode_ordinary(text) == reference.encode_ordinary(text)


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.sampled_from(FRAGMENTS), max_size=30))
def test_random_boundaries_identical(
    bpe: BPETokenizer, reference: tiktoken.Encoding, parts: list[str]
) -> None:
    text = "".join(parts)
    assert bpe.encode_ordinary(text) == reference.encode_ordinary(text)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, EOT), max_size=12))
def test_decode_of_any_ids_matches_replace(
    bpe: BPETokenizer, reference: tiktoken.Encoding, ids: list[int]
) -> None:
    assert bpe.decode_bytes(ids) == reference.decode_bytes(ids)
    assert bpe.decode(ids) == reference.decode(ids, errors="replace")


def test_invalid_utf8_decodes_like_tiktoken(
    bpe: BPETokenizer, reference: tiktoken.Encoding
) -> None:
    cases = [b"\xe2\x82", b"\xff", b"\xc3", b"\x80\x80", b"\xed\xa0\x80", b"\xf0\x9f\x98"]
    for raw in cases:
        ids = [bpe.vocab[bytes([b])] for b in raw]
        assert (
            bpe.decode(ids)
            == reference.decode(ids, errors="replace")
            == raw.decode("utf-8", "replace")
        )
    half_emoji = bpe.encode("😀")[:1]  # the first token of a multi-token character
    assert bpe.decode(half_emoji) == reference.decode(half_emoji, errors="replace")


def test_special_tokens_follow_tiktoken(bpe: BPETokenizer, reference: tiktoken.Encoding) -> None:
    text = "Hello<|endoftext|> world<|endoftext|>"
    with pytest.raises(UserError, match="special token '<\\|endoftext\\|>'"):
        bpe.encode(text)
    with pytest.raises(ValueError):
        reference.encode(text)
    for allowed in ({EOT_TEXT}, "all"):
        ids = bpe.encode(text, allowed_special=allowed)
        assert ids == reference.encode(text, allowed_special=allowed)
        assert ids.count(EOT) == 2
    assert bpe.encode_ordinary(text) == reference.encode_ordinary(text)
    assert EOT not in bpe.encode_ordinary(text)
    assert bpe.encode(text, disallowed_special=()) == reference.encode(text, disallowed_special=())
    assert bpe.decode(bpe.encode(text, allowed_special="all")) == text
    assert bpe.eot_token == EOT and bpe.vocab_size == 50257


def test_gpt2_tokenizer_and_fast_path_equal_the_reader(
    bpe: BPETokenizer, shakespeare: Path
) -> None:
    text = shakespeare.read_text(encoding="utf-8")[:200_000] + "".join(SAMPLES)
    fast = GPT2Tokenizer()
    assert fast.encode_ordinary(text) == bpe.encode_ordinary(text)
    assert fast.encode(text, allowed_special="all") == bpe.encode(text, allowed_special="all")
    assert bpe.tiktoken_mismatch is None
    assert list(ordinary_encoder(bpe)(text)) == bpe.encode_ordinary(text)
    assert list(ordinary_encoder(fast)(text)) == bpe.encode_ordinary(text)


def test_word_cache_is_bounded(
    vocab_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = BPETokenizer.from_gpt2_files(*vocab_files)
    monkeypatch.setattr(gpt2.bpe, "WORD_CACHE_SIZE", 10)
    text = " ".join(f"w{i}" for i in range(100))
    assert tok.encode(text) == tok.encode(text)
    assert 0 < len(tok._cache) <= 10


# --- file formats ------------------------------------------------------------------------------


def same_vocabulary(a: BPETokenizer, b: BPETokenizer) -> bool:
    return a.vocab == b.vocab and a.merges == b.merges and a.special_tokens == b.special_tokens


def test_token_text_mapping_round_trips() -> None:
    for b in range(256):
        assert text_to_token(token_to_text(bytes([b]))) == bytes([b])
    assert token_to_text(b" the\n") == "ĠtheĊ"
    assert text_to_token("<pad>") == b"<pad>"
    assert text_to_token("a b") is None  # a raw space is not byte-level text


def test_hf_pair_round_trip(
    bpe: BPETokenizer, vocab_files: tuple[Path, Path], tmp_path: Path
) -> None:
    vocab_json, merges_txt = bpe.save_hf(tmp_path)
    assert merges_txt.read_text(encoding="utf-8") == vocab_files[1].read_text(encoding="utf-8")
    assert json.loads(vocab_json.read_text(encoding="utf-8")) == json.loads(
        vocab_files[0].read_text(encoding="utf-8")
    )
    again = BPETokenizer.from_hf_files(vocab_json, merges_txt)
    assert same_vocabulary(again, bpe)
    assert again.special_tokens == {EOT_TEXT: EOT}


def test_transformers_reads_our_hf_pair(
    bpe: BPETokenizer, tmp_path: Path, shakespeare: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    bpe.save_hf(tmp_path)
    hf = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    text = shakespeare.read_text(encoding="utf-8")[:100_000] + "".join(SAMPLES)
    assert hf(text)["input_ids"] == bpe.encode(
        text, allowed_special="all"
    )  # HF reads specials in text


def test_tiktoken_file_gives_the_same_vocabulary(
    bpe: BPETokenizer, asset_cache: Path, tmp_path: Path
) -> None:
    from_ranks = BPETokenizer.from_tiktoken_file(asset_cache / "gpt2-tokenizer" / "gpt2.tiktoken")
    assert same_vocabulary(from_ranks, bpe)
    written = bpe.save_tiktoken(tmp_path / "copy.tiktoken")
    assert written.read_bytes() == (asset_cache / "gpt2-tokenizer" / "gpt2.tiktoken").read_bytes()


def test_merges_from_ranks_small() -> None:
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"ab": 256, b"abc": 257, b"bc": 258, b"abab": 259})
    assert merges_from_ranks(ranks) == [(b"a", b"b"), (b"ab", b"c"), (b"b", b"c"), (b"ab", b"ab")]


def test_own_format_round_trips_and_loads_by_folder(bpe: BPETokenizer, tmp_path: Path) -> None:
    bpe.save(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["type"] == "bpe" and len(data["merges"]) == 50000
    loaded = get_tokenizer(str(tmp_path))
    assert isinstance(loaded, BPETokenizer) and same_vocabulary(loaded, bpe)
    assert load_tokenizer(tmp_path).to_dict() == bpe.to_dict()
    assert loaded.encode("Hello world") == [15496, 995]


def test_gpt2_from_asset_cache(bpe: BPETokenizer) -> None:
    assert same_vocabulary(BPETokenizer.gpt2(), bpe)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def small_vocab() -> dict[str, int]:
    return {token_to_text(bytes([b])): b for b in range(256)}


@pytest.mark.parametrize(
    "vocab, merges, message",
    [
        (None, "#version: 0.2\na b\n", "file not found"),
        ("{not json", "#version: 0.2\n", "not valid JSON"),
        ('{"a": 0}', "#version: 0.2\n", "needs all 256 bytes"),
        ("SMALL", "#version: 0.2\na b c\n", "merges.txt:2: expected a merge"),
        ("SMALL", "#version: 0.2\na b\n", "'ab' is not in the vocabulary"),
        ("SMALL+ab", "#version: 0.2\na b\na b\n", "same pair twice"),
    ],
)
def test_bad_hf_files(tmp_path: Path, vocab: str | None, merges: str, message: str) -> None:
    vocab_path = tmp_path / "vocab.json"
    if vocab is not None:
        if vocab.startswith("SMALL"):
            table = small_vocab() | ({"ab": 256} if vocab.endswith("+ab") else {})
            vocab = json.dumps(table)
        write(vocab_path, vocab)
    merges_path = write(tmp_path / "merges.txt", merges)
    with pytest.raises(UserError, match=message):
        BPETokenizer.from_hf_files(vocab_path, merges_path)


def test_bad_tiktoken_file_and_ids(bpe: BPETokenizer, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="bad.tiktoken:1: expected 'base64-token rank'"):
        BPETokenizer.from_tiktoken_file(write(tmp_path / "bad.tiktoken", "!!notbase64 x\n"))
    with pytest.raises(UserError, match="token id 99999 is not in this vocabulary"):
        bpe.decode([99999])


def test_extra_special_tokens_from_hf_vocab(tmp_path: Path) -> None:
    table = small_vocab() | {"ab": 256, "<|endoftext|>": 257, "<pad>": 258}
    vocab_path = write(tmp_path / "vocab.json", json.dumps(table))
    tok = BPETokenizer.from_hf_files(
        vocab_path, write(tmp_path / "merges.txt", "#version: 0.2\na b\n")
    )
    assert tok.special_tokens == {"<|endoftext|>": 257, "<pad>": 258}
    assert tok.encode("abab<pad>", allowed_special="all") == [256, 256, 258]
    assert tok.tiktoken_mismatch is None
