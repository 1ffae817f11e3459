"""``gpt2 prepare``: text to token files, from one text file up to a corpus of billions of tokens.

Every input becomes llm.c-format token shards (train_000000.bin, val_000000.bin, ...) with a
meta.json and the tokenizer. One text file (and no ``--shard-tokens``) gives one train and one val
shard, the last ``--val-fraction`` of its tokens held out (`gpt2.prepare.prepare_text`). Anything
else (several files, a folder, JSONL, Parquet, a Hugging Face dataset, or ``--shard-tokens``) is
streamed, whole documents held out for validation, resumable (`gpt2.prepare.prepare_shards`).

With --chat the documents are conversations (OpenAI's messages: one {"messages": [...]} per
JSONL line, or a dataset's messages column), rendered by the chat template; a mask beside each
shard marks the assistant's replies, the only tokens fine-tuning learns (docs/chat.md).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from gpt2.assets import fetch
from gpt2.commands.options import float_in, non_empty, positive_int
from gpt2.corpus import Source, find_sources, read_text
from gpt2.errors import UserError
from gpt2.prepare import prepare_shards, prepare_text
from gpt2.tokenizer import Tokenizer, get_tokenizer

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``gpt2 prepare`` to the command line."""
    p = sub.add_parser(
        "prepare",
        help="tokenize text files, JSONL, Parquet or a Hugging Face dataset into token files",
        # The module docstring, without its reST markup: --help shows it as plain text.
        description=__doc__.split("\n\n", 1)[1].replace("``", "") if __doc__ else None,
    )
    p.add_argument("--input", nargs="+", metavar="PATH", type=non_empty,
                   help="text files, .jsonl/.jsonl.gz, .parquet, or folders of them (default: TinyShakespeare, downloaded once)")  # fmt: skip
    p.add_argument("--hf-dataset", metavar="NAME",
                   help="a Hugging Face dataset, streamed (e.g. HuggingFaceFW/fineweb-edu), or a folder from save_to_disk; needs the datasets extra")  # fmt: skip
    p.add_argument(
        "--hf-subset", metavar="NAME", help="the dataset's configuration (e.g. sample-10BT)"
    )
    p.add_argument("--hf-split", default="train", help="the dataset's split (default: train)")
    p.add_argument("--tokenizer", help="char (one text file only), gpt2, or a folder with a tokenizer.json (default: gpt2)")  # fmt: skip
    p.add_argument("--out", required=True, type=non_empty, help="output folder")
    p.add_argument("--val-fraction", type=float_in(0, 1, low_open=True, high_open=True),
                   help="share held out for validation: of the tokens for one text file (default 0.1), of the documents for shards (default 0.01)")  # fmt: skip
    p.add_argument(
        "--shard-tokens",
        type=positive_int,
        metavar="N",
        help="tokens per shard (default for corpora: 100000000)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=os.cpu_count() or 1,
        help="encoding processes (default: one per CPU core)",
    )
    p.add_argument(
        "--text-field",
        type=non_empty,
        default="text",
        help="the JSONL field or Parquet/dataset column holding the text (default: text)",
    )
    p.add_argument("--on-bad-line", choices=("stop", "skip"), default="stop",
                   help="a JSONL line (or, with --chat, a row) that is not JSON or holds no text or conversation: stop with its file and line (default), or skip it and count it")  # fmt: skip
    p.add_argument("--chat", action="store_true",
                   help="the input holds conversations (OpenAI messages); only the assistant's replies are trained on (docs/chat.md)")  # fmt: skip
    p.add_argument("--messages-field", type=non_empty, metavar="NAME",
                   help="with --chat: the JSONL field or Parquet/dataset column holding the messages (default: messages)")  # fmt: skip
    p.add_argument("--chat-template", metavar="FILE.jinja",
                   help="with --chat: a Jinja chat template, saved in the folder's tokenizer.json (default: the built-in one, docs/chat.md)")  # fmt: skip
    p.add_argument("--reference-encoder", action="store_true",
                   help="encode with the readable BPE instead of tiktoken (the same ids, much slower)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """One text file split by tokens, anything else streamed by documents (module docstring)."""
    if args.input and args.hf_dataset:
        raise UserError("give --input or --hf-dataset, not both")
    if args.chat:
        return _prepare_chat(args)
    for given, flag in ((args.messages_field, "--messages-field"), (args.chat_template, "--chat-template")):  # fmt: skip
        if given is not None:
            raise UserError(f"{flag} is for conversations: add --chat")
    inputs = args.input or ([] if args.hf_dataset else [fetch("tinyshakespeare/input.txt")])
    sources = _sources(args, inputs)
    if (
        len(inputs) == 1
        and Path(inputs[0]).is_file()
        and sources[0].kind == "text"
        and args.shard_tokens is None
    ):
        return _prepare_one_file(args, sources[0].location)
    if args.tokenizer == "char":
        raise UserError(
            "the char tokenizer is for one text file; use --tokenizer gpt2 or a BPE folder for a corpus"
        )
    meta = _prepare_corpus(args, sources, get_tokenizer(args.tokenizer or "gpt2"), args.text_field)
    stats = meta["stats"]
    log.info(
        "wrote %s: %d train tokens in %d shards, %d val tokens in %d (%d + %d documents; "
        "%d empty documents, %d lines skipped, %d invalid UTF-8 sequences replaced)",
        args.out, meta["train_tokens"], len(meta["shards"]["train"]), meta["val_tokens"], len(meta["shards"]["val"]),
        meta["documents"]["train"], meta["documents"]["val"],
        stats["empty_documents"], stats["skipped_lines"], stats["replaced_characters"],
    )  # fmt: skip
    return 0


def _sources(args: argparse.Namespace, inputs: list[str], chat: bool = False) -> list[Source]:
    """The --hf-dataset, or the files behind ``inputs``."""
    if args.hf_dataset:
        return [Source("hf", args.hf_dataset, args.hf_subset, args.hf_split)]
    return find_sources(inputs, chat=chat)


def _prepare_corpus(
    args: argparse.Namespace,
    sources: list[Source],
    tokenizer: Tokenizer,
    text_field: str,
    chat: bool = False,
) -> dict[str, Any]:
    """`prepare_shards` with the flags' settings (a corpus's defaults where one is not given)."""
    return prepare_shards(
        sources, args.out, tokenizer, shard_tokens=args.shard_tokens or 100_000_000,
        val_fraction=0.01 if args.val_fraction is None else args.val_fraction,
        workers=args.workers, text_field=text_field, on_bad_line=args.on_bad_line,
        fast=not args.reference_encoder, show_progress=not args.quiet, chat=chat,
    )  # fmt: skip


def _prepare_one_file(args: argparse.Namespace, path: str) -> int:
    meta = prepare_text(
        path,
        args.out,
        tokenizer=args.tokenizer or "gpt2",
        val_fraction=0.1 if args.val_fraction is None else args.val_fraction,
        show_progress=not args.quiet,
    )
    log.info(
        "wrote %s: %d train and %d val tokens (%s, vocabulary %d, %s)",
        args.out, meta["train_tokens"], meta["val_tokens"], meta["tokenizer"], meta["vocab_size"], meta["dtype"],
    )  # fmt: skip
    return 0


def _prepare_chat(args: argparse.Namespace) -> int:
    """Conversations to masked shards, streamed and resumable like any corpus."""
    if not args.input and not args.hf_dataset:
        raise UserError("--chat needs --input (JSONL or Parquet files, or folders) or --hf-dataset")
    if args.tokenizer == "char":
        raise UserError("--chat needs a tokenizer with an end-of-text token to end each reply: gpt2 or a BPE folder")  # fmt: skip
    sources = _sources(args, args.input, chat=True)
    tokenizer = get_tokenizer(args.tokenizer or "gpt2")
    if args.chat_template:
        tokenizer.chat_template = read_text(args.chat_template)
    meta = _prepare_corpus(args, sources, tokenizer, args.messages_field or "messages", chat=True)
    trained, stats = meta["trained_tokens"], meta["stats"]
    log.info(
        "wrote %s: %d train tokens (%d trained on) in %d shards, %d val tokens (%d trained on) "
        "in %d; %d + %d conversations, %d lines skipped, %d invalid UTF-8 sequences replaced",
        args.out, meta["train_tokens"], trained["train"], len(meta["shards"]["train"]),
        meta["val_tokens"], trained["val"], len(meta["shards"]["val"]),
        meta["documents"]["train"], meta["documents"]["val"],
        stats["skipped_lines"], stats["replaced_characters"],
    )  # fmt: skip
    return 0
