"""``gpt2 eval``: perplexity, HellaSwag or LAMBADA for a checkpoint or a Hugging Face GPT-2."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gpt2.checkpoint import load_model
from gpt2.commands.options import non_empty, positive_int
from gpt2.device import resolve_device
from gpt2.errors import UserError
from gpt2.evaluate import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DATA,
    HELLASWAG_STYLES,
    TASKS,
    format_table,
    run_eval,
)
from gpt2.files import write_json

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    defaults = ", ".join(f"{task}: {asset}" for task, asset in DEFAULT_DATA.items())
    p = sub.add_parser(
        "eval",
        help="evaluate a model: perplexity, HellaSwag or LAMBADA",
        description=f"Evaluate a model on one task. Default data (downloaded once): {defaults}.",
    )
    p.add_argument(
        "--checkpoint", required=True, type=non_empty,
        help="checkpoint folder (or run folder holding ckpt/), or a Hugging Face GPT-2 name/folder",
    )  # fmt: skip
    p.add_argument("--task", required=True, choices=TASKS, help="what to measure")
    p.add_argument(
        "--data",
        help="a local copy of the data: text, .zip (WikiText) or .bin tokens for perplexity; "
        "jsonl for hellaswag and lambada (default: the task's public data set)",
    )
    p.add_argument(
        "--limit", type=positive_int, help="only the first N items (perplexity: N scored tokens)"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
        help=f"rows per forward pass (default: {DEFAULT_BATCH_SIZE})",
    )  # fmt: skip
    p.add_argument(
        "--stride", type=positive_int,
        help="perplexity: tokens the window moves each step; each token then has at least "
        "block_size - stride tokens of context (default: block_size, no overlap)",
    )  # fmt: skip
    p.add_argument(
        "--style", choices=HELLASWAG_STYLES, default="harness",
        help="hellaswag: prompt and length normalisation of lm-evaluation-harness (characters) or "
        "of build-nanogpt (tokens) (default: harness)",
    )  # fmt: skip
    p.add_argument(
        "--out", type=non_empty, help="JSON file for every figure (default: eval-TASK.json)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    if args.stride is not None and args.task != "perplexity":
        raise UserError("--stride applies to --task perplexity only")
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.checkpoint, device)
    if args.stride is not None and not 1 <= args.stride <= model.config.block_size:
        raise UserError(
            f"--stride must be between 1 and the model's block size {model.config.block_size}"
        )
    result = run_eval(
        model, tokenizer, args.task, args.checkpoint, data=args.data, limit=args.limit,
        batch_size=args.batch_size, stride=args.stride, style=args.style, show_progress=not args.quiet,
    )  # fmt: skip
    out = Path(args.out or f"eval-{args.task}.json")
    record = {**result.to_dict(), "device": str(device)}
    write_json(out, record)
    print(format_table(result))
    log.info("wrote %s", out)
    return 0
