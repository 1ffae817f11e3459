"""``gpt2 export``: a checkpoint to a Hugging Face GPT-2 folder (see `gpt2.hf`)."""

from __future__ import annotations

import argparse
import logging

from gpt2.commands.options import non_empty

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face GPT-2 folder (transformers, vLLM, lm-eval)",
        description="Write config.json, model.safetensors, generation_config.json and the tokenizer "
        "files, loadable by transformers.AutoModelForCausalLM and AutoTokenizer.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        type=non_empty,
        help="checkpoint folder (or the run folder holding ckpt/)",
    )
    p.add_argument("--out", required=True, type=non_empty, help="the Hugging Face folder to write")
    p.add_argument("--force", action="store_true", help="write into --out even if it is not empty")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gpt2.hf import export_checkpoint  # torch loads only when the command runs

    out = export_checkpoint(args.checkpoint, args.out, force=args.force)
    files = ", ".join(sorted(p.name for p in out.iterdir() if not p.name.startswith(".")))
    log.info("wrote %s: %s", out, files)
    log.info("load it with transformers.AutoModelForCausalLM.from_pretrained(%r)", str(out))
    return 0
