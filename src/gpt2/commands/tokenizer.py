"""``gpt2 tokenizer``: train a byte-level BPE vocabulary, or export one for Hugging Face."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from gpt2.bpe import BPETokenizer
from gpt2.bpe_train import count_words, train_bpe
from gpt2.commands.options import non_empty, positive_int
from gpt2.corpus import ReadStats, find_sources, read_corpus
from gpt2.errors import UserError
from gpt2.files import make_folder, refuse_non_folder
from gpt2.tokenizer import EOT_TEXT, get_tokenizer

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``gpt2 tokenizer train`` and ``gpt2 tokenizer export-hf`` to the command line."""
    p = sub.add_parser(
        "tokenizer", help="train a byte-level BPE tokenizer, or export one for Hugging Face"
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=type(p))

    t = actions.add_parser("train", help="learn a GPT-2-style byte-level BPE vocabulary from text")
    t.add_argument("--input", nargs="+", required=True, metavar="PATH", type=non_empty,
                   help="text files, .jsonl/.jsonl.gz, .parquet, or folders of them")  # fmt: skip
    t.add_argument(
        "--vocab-size",
        type=positive_int,
        required=True,
        help="ids in all: 256 bytes + merges + special tokens",
    )
    t.add_argument(
        "--out",
        required=True,
        type=non_empty,
        help="output folder: tokenizer.json, plus vocab.json and merges.txt",
    )
    t.add_argument("--special", action="append", metavar="TOKEN", type=non_empty,
                   help=f"a special token, repeatable (default: {EOT_TEXT})")  # fmt: skip
    t.add_argument(
        "--text-field",
        type=non_empty,
        default="text",
        help="the JSONL field or Parquet column holding the text (default: text)",
    )
    t.add_argument(
        "--on-bad-line",
        choices=("stop", "skip"),
        default="stop",
        help="a malformed JSONL line: stop (default) or skip",
    )
    t.set_defaults(func=run_train)

    e = actions.add_parser(
        "export-hf", help="write a tokenizer's vocab.json and merges.txt for transformers"
    )
    e.add_argument("--tokenizer", required=True, help="gpt2, or a folder with a BPE tokenizer.json")
    e.add_argument(
        "--out", required=True, type=non_empty, help="output folder for vocab.json and merges.txt"
    )
    e.set_defaults(func=run_export)


def _texts(
    inputs: list[str], text_field: str, on_bad_line: str, show_progress: bool
) -> Iterator[str]:
    sources = find_sources(inputs)
    stats = ReadStats()
    with tqdm(
        unit="char", unit_scale=True, desc="counting words", disable=not show_progress
    ) as bar:
        for piece in read_corpus(sources, stats=stats, field=text_field, on_bad_line=on_bad_line):  # type: ignore[arg-type]
            bar.update(len(piece.text))
            yield piece.text
    log.info("read %d documents (%d lines skipped, %d invalid UTF-8 sequences replaced)",
             stats.documents, stats.skipped_lines, stats.replaced_characters)  # fmt: skip


def run_train(args: argparse.Namespace) -> int:
    """Count the words of the inputs, learn the merges, write the tokenizer in both forms."""
    specials = args.special or [EOT_TEXT]
    if args.vocab_size < 256 + len(specials):
        raise UserError(
            f"--vocab-size {args.vocab_size} is below the 256 bytes + {len(specials)} special token(s)"
        )
    refuse_non_folder(args.out)  # before the work
    counts = count_words(
        _texts(args.input, args.text_field, args.on_bad_line, not args.quiet),
        special_tokens=specials,
    )
    if not counts:
        raise UserError("the input holds no text to learn from")
    tokenizer = train_bpe(
        counts, args.vocab_size, specials, name=Path(args.out).name, show_progress=not args.quiet
    )
    out = make_folder(args.out)
    tokenizer.save(out)
    tokenizer.save_hf(out)
    log.info("wrote %s: %d ids (%d merges, %d special), from %d distinct words",
             out, tokenizer.vocab_size, len(tokenizer.merges), len(specials), len(counts))  # fmt: skip
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Write ``vocab.json`` + ``merges.txt`` alone, a folder transformers loads as it is."""
    tokenizer = get_tokenizer(args.tokenizer)
    if tokenizer.kind == "gpt2":
        tokenizer = BPETokenizer.gpt2()
    if not isinstance(tokenizer, BPETokenizer):
        raise UserError(
            f"a {tokenizer.kind} tokenizer has no Hugging Face BPE files; only gpt2 and BPE tokenizers do"
        )
    vocab, merges = tokenizer.save_hf(args.out)
    log.info("wrote %s and %s", vocab, merges)
    return 0
