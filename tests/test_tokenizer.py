"""Tokenizers: round trips, the GPT-2 facts, and saving."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2.errors import UserError
from gpt2.tokenizer import CharTokenizer, GPT2Tokenizer, get_tokenizer, load_tokenizer


def test_char_round_trip_and_sorted_vocabulary() -> None:
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == [" ", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.vocab_size == 8
    assert tok.encode("hello") == [3, 2, 4, 4, 5]
    assert tok.decode(tok.encode("world hello")) == "world hello"
    assert tok.eot_token is None


def test_char_unknown_characters_are_named() -> None:
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UserError, match=r"2 character\(s\) outside.*'x', 'z'"):
        tok.encode("abzx")


def test_gpt2_hello_world() -> None:
    tok = GPT2Tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257
    assert tok.eot_token == 50256


def test_gpt2_tinyshakespeare_token_count(shakespeare: Path) -> None:
    text = shakespeare.read_text(encoding="utf-8")
    ids = GPT2Tokenizer().encode(text)
    assert len(ids) == 338_025
    assert GPT2Tokenizer().decode(ids) == text


def test_gpt2_matches_tiktoken_reference() -> None:
    # tiktoken's own "gpt2" encoding needs the network; compare against r50k ranks read here.
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from gpt2.assets import fetch

    ranks = load_tiktoken_bpe(str(fetch("gpt2-tokenizer/gpt2.tiktoken")))
    tok = GPT2Tokenizer()
    reference = tiktoken.Encoding(
        "r50k",
        pat_str=tok.enc._pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )
    text = "Héllo, wörld! 你好 🙂 it's 12345   \n\n\tdone"
    assert tok.encode(text) == reference.encode(text)


def test_gpt2_special_token_refused_unless_allowed() -> None:
    tok = GPT2Tokenizer()
    with pytest.raises(UserError, match="endoftext"):
        tok.encode("a<|endoftext|>b")
    assert tok.encode("a<|endoftext|>b", allowed_special="all")[1] == 50256
    assert 50256 not in tok.encode_ordinary("a<|endoftext|>b")


@pytest.mark.parametrize("make", [lambda: CharTokenizer.from_text("xyz\n"), GPT2Tokenizer])
def test_save_and_load(tmp_path: Path, make) -> None:
    tok = make()
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert type(again) is type(tok)
    assert again.encode("xyz\n") == tok.encode("xyz\n")
    assert get_tokenizer(str(tmp_path)).to_dict() == tok.to_dict()


def test_unknown_tokenizer_name() -> None:
    with pytest.raises(UserError, match="unknown tokenizer 'bpe9'"):
        get_tokenizer("bpe9")
