"""Hugging Face's tokenizer files, read into our tokenizers and written from them.

A Hugging Face GPT-2 folder keeps its tokenizer as ``vocab.json`` + ``merges.txt`` (what OpenAI
published), or as one ``tokenizer.json`` in the `tokenizers` library's format. Reading gives
GPT-2's own tokenizer when the files are GPT-2's, our byte-level BPE (`gpt2.bpe`) for another
vocabulary, and a `CharTokenizer` for a character vocabulary; writing does the reverse, so an
export loads in ``transformers.AutoTokenizer``. The weights and config live in `gpt2.hf`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from gpt2.bpe import BPETokenizer
from gpt2.errors import UserError
from gpt2.files import copy_file, read_json, write_json
from gpt2.tokenizer import (
    EOT_TEXT,
    TOKENIZER_FILE,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    tokenizer_from_dict,
)

log = logging.getLogger(__name__)

GPT2_VOCAB_SIZE = 50257
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where newer transformers versions save a template
# Tokenizer files that Hugging Face reads; an export removes the ones it does not write, so that a
# stale file from an earlier export never shadows the tokenizer written now.
HF_TOKENIZER_FILES = (
    TOKENIZER_FILE,
    VOCAB_FILE,
    MERGES_FILE,
    TOKENIZER_CONFIG_FILE,
    "special_tokens_map.json",
    CHAT_TEMPLATE_FILE,
)


def load_hf_tokenizer(folder: Path, vocab_size: int) -> Tokenizer:
    """The tokenizer of a Hugging Face folder: ``vocab.json`` + ``merges.txt``, else
    ``tokenizer.json``, else GPT-2's."""
    tokenizer = _tokenizer_in(folder, vocab_size)
    check_vocab_fits(tokenizer, vocab_size, str(folder))
    tokenizer.chat_template = _chat_template_in(folder) or tokenizer.chat_template
    return tokenizer


def _chat_template_in(folder: Path) -> str | None:
    """The folder's chat template: ``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template`` (a string, or a list of named ones of which "default" is used)."""
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if not (folder / TOKENIZER_CONFIG_FILE).is_file():
        return None
    template = read_json(folder / TOKENIZER_CONFIG_FILE).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _tokenizer_in(folder: Path, vocab_size: int) -> Tokenizer:
    vocab_path, merges_path = folder / VOCAB_FILE, folder / MERGES_FILE
    if vocab_path.is_file() and merges_path.is_file():
        vocab = read_json(vocab_path)
        merges = _merges_from_lines(merges_path.read_text(encoding="utf-8").splitlines())
        return _bpe_tokenizer(vocab, merges, folder, (vocab_path, merges_path))
    path = folder / TOKENIZER_FILE
    if path.is_file():
        data = read_json(path)
        if "type" in data:  # our own format, copied alongside
            return tokenizer_from_dict(data)
        return _tokenizer_from_hf_json(data, path)
    if vocab_size < GPT2_VOCAB_SIZE:
        raise UserError(
            f"{folder} has no tokenizer files ({VOCAB_FILE} + {MERGES_FILE}, or {TOKENIZER_FILE}), "
            f"and GPT-2's {GPT2_VOCAB_SIZE} ids do not fit the model's {vocab_size} embeddings"
        )
    log.info("%s has no tokenizer files; using GPT-2's", folder)
    return GPT2Tokenizer()


def _tokenizer_from_hf_json(data: Any, path: Path) -> Tokenizer:
    """A `tokenizers` ``tokenizer.json``: GPT-2-style byte-level BPE, or a character vocabulary
    (what `save_hf_tokenizer` writes for a `CharTokenizer`)."""
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise UserError(
            f"{path}: a {kind or 'unknown'} tokenizer; only byte-level BPE and characters load here"
        )
    vocab = dict(model.get("vocab") or {})
    for added in data.get("added_tokens") or []:
        vocab.setdefault(added["content"], added["id"])
    merges = _merges_from_lines(
        " ".join(m) if isinstance(m, list) else m for m in model.get("merges") or []
    )
    pre = data.get("pre_tokenizer")
    if pre is None and not merges:
        return _char_tokenizer(vocab, path)
    if not isinstance(pre, dict) or pre.get("type") != "ByteLevel":
        raise UserError(f"{path}: the BPE is not byte-level like GPT-2's; it cannot be loaded here")
    return _bpe_tokenizer(vocab, merges, path.parent, None)


def _char_tokenizer(vocab: dict[str, int], path: Path) -> CharTokenizer:
    chars = sorted(vocab)
    if any(len(c) != 1 for c in chars) or [vocab[c] for c in chars] != list(range(len(chars))):
        raise UserError(
            f"{path}: a vocabulary without merges that is not one id per character, in order"
        )
    return CharTokenizer(chars)


def _bpe_tokenizer(
    vocab: Any, merges: tuple[str, ...], folder: Path, files: tuple[Path, Path] | None
) -> Tokenizer:
    """GPT-2's tokenizer when the vocabulary and merges are GPT-2's, else our own BPE."""
    if not isinstance(vocab, dict):
        raise UserError(f"{folder}: {VOCAB_FILE} is not a JSON object of token -> id")
    gpt2_vocab, gpt2_merges = gpt2_vocab_and_merges()
    if vocab == gpt2_vocab and merges == gpt2_merges:
        return GPT2Tokenizer()
    if files is not None:
        return BPETokenizer.from_hf_files(*files)
    with tempfile.TemporaryDirectory() as tmp:  # from tokenizer.json: write the pair it reads
        vocab_path, merges_path = Path(tmp, VOCAB_FILE), Path(tmp, MERGES_FILE)
        vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return BPETokenizer.from_hf_files(vocab_path, merges_path)


def _merges_from_lines(lines: Any) -> tuple[str, ...]:
    """Merges as "left right" strings, without the ``#version`` header or blank lines."""
    return tuple(line for line in lines if line.strip() and not line.startswith("#version"))


@lru_cache(maxsize=1)
def gpt2_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """GPT-2's ``encoder.json`` and the merges of ``vocab.bpe``, from the asset cache."""
    from gpt2.assets import fetch

    vocab = json.loads(fetch("gpt2-tokenizer/encoder.json").read_text(encoding="utf-8"))
    lines = fetch("gpt2-tokenizer/vocab.bpe").read_text(encoding="utf-8").splitlines()
    return vocab, _merges_from_lines(lines)


def check_vocab_fits(tokenizer: Tokenizer, vocab_size: int, where: str) -> None:
    if tokenizer.vocab_size > vocab_size:
        raise UserError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model only {vocab_size} "
            "token embeddings"
        )


def check_exportable(tokenizer: Tokenizer) -> None:
    if not isinstance(tokenizer, (GPT2Tokenizer, CharTokenizer)) and not hasattr(
        tokenizer, "save_hf"
    ):
        raise UserError(
            f"the {tokenizer.kind!r} tokenizer has no Hugging Face form in this version; only GPT-2's "
            "BPE and character vocabularies export"
        )


def save_hf_tokenizer(tokenizer: Tokenizer, folder: Path, block_size: int) -> None:
    """Write ``tokenizer`` as ``transformers.AutoTokenizer`` reads it.

    GPT-2's BPE becomes ``vocab.json`` + ``merges.txt`` (the files OpenAI published, byte for
    byte). A character vocabulary becomes a `tokenizers` ``tokenizer.json``: a BPE with no
    merges and no pre-tokenizer splits text into single characters, and the ``Fuse`` decoder
    joins them back with nothing between. A character it never saw is dropped there, where
    `CharTokenizer` raises an error.
    """
    check_exportable(tokenizer)
    for name in HF_TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    settings: dict[str, Any] = {
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": False,
    }
    if isinstance(tokenizer, GPT2Tokenizer):
        from gpt2.assets import fetch

        copy_file(fetch("gpt2-tokenizer/encoder.json"), folder / VOCAB_FILE)
        copy_file(fetch("gpt2-tokenizer/vocab.bpe"), folder / MERGES_FILE)
        special = {f"{k}_token": EOT_TEXT for k in ("bos", "eos", "unk")}
        settings = {
            "tokenizer_class": "GPT2Tokenizer",
            **special,
            "add_prefix_space": False,
            **settings,
        }
    elif isinstance(tokenizer, CharTokenizer):
        write_json(folder / TOKENIZER_FILE, _char_tokenizer_json(tokenizer))
        settings = {"tokenizer_class": "PreTrainedTokenizerFast", **settings}
        write_json(folder / TOKENIZER_CONFIG_FILE, settings)
        return  # no end-of-text token: no reply could end, so no chat template
    else:
        tokenizer.save_hf(folder)  # type: ignore[attr-defined]  # our own BPE (gpt2.bpe)
        if (folder / TOKENIZER_CONFIG_FILE).is_file():
            return
        settings = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, **settings}
        if tokenizer.eot_token is not None:
            eot_text = tokenizer.decode([tokenizer.eot_token])
            settings.update({f"{k}_token": eot_text for k in ("bos", "eos", "unk")})
    if tokenizer.eot_token is not None:
        from gpt2.chat import template_of

        settings["chat_template"] = template_of(tokenizer)
    write_json(folder / TOKENIZER_CONFIG_FILE, settings)


def _char_tokenizer_json(tokenizer: CharTokenizer) -> dict[str, Any]:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": dict(tokenizer.stoi),
            "merges": [],
        },
    }
