"""``gpt2 export``: a checkpoint to a Hugging Face GPT-2 folder (see `gpt2.hf`), or to a GGUF file
for llama.cpp and Ollama (see `gpt2.gguf_export`)."""

from __future__ import annotations

import argparse
import logging

from gpt2.commands.options import non_empty
from gpt2.errors import UserError
from gpt2.gguf_export import DEFAULT_GGUF_TYPE, check_gguf_type, export_gguf

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face GPT-2 folder or a GGUF file (llama.cpp, Ollama)",
        description="--format hf (the default) writes config.json, model.safetensors, "
        "generation_config.json and the tokenizer files, loadable by "
        "transformers.AutoModelForCausalLM and AutoTokenizer. --format gguf writes one .gguf file "
        "(weights, hyperparameters and tokenizer) that llama.cpp's llama-cli and llama-server, "
        "Ollama and LM Studio run as llama.cpp's gpt2 architecture; its source may also be a "
        "Hugging Face GPT-2 folder. See docs/gguf.md.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        type=non_empty,
        help="checkpoint folder (or the run folder holding ckpt/); for --format gguf also a "
        "Hugging Face GPT-2 folder",
    )
    p.add_argument(
        "--out",
        required=True,
        type=non_empty,
        help="the Hugging Face folder, or the .gguf file, to write",
    )
    p.add_argument(
        "--format",
        choices=("hf", "gguf"),
        default="hf",
        help="hf: a Hugging Face folder (default); gguf: one GGUF file for llama.cpp / Ollama",
    )
    p.add_argument(
        "--gguf-type",
        default=None,
        metavar="TYPE",
        help="how --format gguf stores the weight matrices: f32 (default, exact), f16, bf16 "
        "(half the size) or q8_0 (8-bit blocks, about a quarter); biases, LayerNorms and the "
        "position embedding stay f32",
    )
    p.add_argument(
        "--force", action="store_true", help="write into a non-empty --out folder, or replace --out"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        return _run_gguf(args)
    if args.gguf_type is not None:
        raise UserError("--gguf-type applies to --format gguf only")
    from gpt2.hf import export_checkpoint  # torch loads only when the command runs

    out = export_checkpoint(args.checkpoint, args.out, force=args.force)
    files = ", ".join(sorted(p.name for p in out.iterdir() if not p.name.startswith(".")))
    log.info("wrote %s: %s", out, files)
    log.info("load it with transformers.AutoModelForCausalLM.from_pretrained(%r)", str(out))
    return 0


def _run_gguf(args: argparse.Namespace) -> int:
    gguf_type = args.gguf_type or DEFAULT_GGUF_TYPE
    check_gguf_type(gguf_type)

    out = export_gguf(args.checkpoint, args.out, gguf_type, force=args.force)
    log.info("run it with: llama-completion -m %s -no-cnv -p 'Once upon a time'", out)
    return 0
