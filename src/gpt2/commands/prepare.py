"""``gpt2 prepare``: a text file to train/val token files."""

from __future__ import annotations

import argparse
import logging

from gpt2.assets import fetch
from gpt2.data import prepare

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize a text file into train/val token files")
    p.add_argument("--input", help="a UTF-8 text file (default: TinyShakespeare, downloaded once)")
    p.add_argument(
        "--tokenizer",
        default="char",
        help="char, gpt2, or a folder with a tokenizer.json (default: char)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder for train.bin, val.bin, meta.json, tokenizer.json",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of tokens held out for validation (default: 0.1)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    source = args.input or fetch("tinyshakespeare/input.txt")
    meta = prepare(
        source,
        args.out,
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        show_progress=not args.quiet,
    )
    log.info(
        "wrote %s: %d train and %d val tokens (%s, vocabulary %d, %s)",
        args.out,
        meta["train_tokens"],
        meta["val_tokens"],
        meta["tokenizer"],
        meta["vocab_size"],
        meta["dtype"],
    )
    return 0
