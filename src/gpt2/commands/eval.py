"""``gpt2 eval``: perplexity, HellaSwag or LAMBADA for a checkpoint or a Hugging Face GPT-2, or
any lm-evaluation-harness task (``--harness``, through `gpt2.harness`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gpt2.commands.options import (
    add_model_options,
    int_at_least,
    load_for_inference,
    non_empty,
    positive_int,
)
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
        help="evaluate a model: perplexity, HellaSwag, LAMBADA, or lm-eval tasks",
        description=f"Evaluate a model on one task (--task; default data, downloaded once: "
        f"{defaults}), or on lm-evaluation-harness tasks (--harness; needs "
        f"pip install -e '.[harness]'), run on the model directly, without exporting it.",
    )
    add_model_options(p)
    p.add_argument("--task", choices=TASKS, help="what to measure (or --harness)")
    p.add_argument(
        "--harness", metavar="TASKS",
        help="comma-separated lm-evaluation-harness task names (hellaswag,lambada_openai,...) "
        "instead of --task; results as lm-eval prints and writes them",
    )  # fmt: skip
    p.add_argument(
        "--include-path", metavar="DIR",
        help="--harness: a folder of task YAML files of your own (searched before lm-eval's)",
    )  # fmt: skip
    p.add_argument(
        "--num-fewshot", type=int_at_least(0), metavar="K",
        help="--harness: examples in each prompt (default: each task's own, mostly 0)",
    )  # fmt: skip
    p.add_argument(
        "--output-path", metavar="P",
        help="--harness: write lm-eval's results JSON here (default: not written)",
    )  # fmt: skip
    p.add_argument(
        "--data",
        help="a local copy of the data: text, .zip (WikiText) or .bin tokens for perplexity; "
        "jsonl for hellaswag and lambada (default: the task's public data set)",
    )
    p.add_argument(
        "--limit", type=positive_int,
        help="only the first N items (perplexity: N scored tokens; --harness: N per task)",
    )  # fmt: skip
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if (args.task is None) == (args.harness is None):
        raise UserError("give one of --task or --harness")
    if args.harness is not None:
        return run_harness(args)
    for option in ("include_path", "num_fewshot", "output_path"):
        if getattr(args, option) is not None:
            raise UserError(f"--{option.replace('_', '-')} applies to --harness only")
    if args.stride is not None and args.task != "perplexity":
        raise UserError("--stride applies to --task perplexity only")
    model, tokenizer, device = load_for_inference(args)  # what sample and serve run
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


def run_harness(args: argparse.Namespace) -> int:
    """``--harness TASKS``: lm-eval's tasks on our model (`gpt2.harness`)."""
    try:
        from gpt2 import harness
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith("lm_eval"):
            raise
        raise UserError(
            "--harness needs lm-evaluation-harness: pip install -e '.[harness]' "
            "(or pip install lm-eval)"
        ) from None
    tasks = [t.strip() for t in args.harness.split(",") if t.strip()]
    if not tasks:
        raise UserError("--harness needs at least one task name")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise UserError(f"--include-path {args.include_path}: not a folder")
    if args.stride is not None or args.data is not None or args.out is not None:
        raise UserError("--stride, --data and --out apply to --task; --harness has --output-path")
    model, tokenizer, _ = load_for_inference(args)  # what sample and serve run
    lm = harness.HarnessModel(
        model, tokenizer, batch_size=args.batch_size, show_progress=not args.quiet
    )
    results = harness.evaluate(
        lm, tasks, include_path=args.include_path, num_fewshot=args.num_fewshot, limit=args.limit
    )
    if args.output_path:
        out = Path(args.output_path)
        write_json(out, harness.jsonable(results))
        log.info("wrote %s", out)
    print(harness.format_results(results))
    return 0
