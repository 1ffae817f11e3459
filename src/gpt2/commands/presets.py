"""``gpt2 presets``: the model shapes by name, with their parameter counts."""

from __future__ import annotations

import argparse

import torch

from gpt2.commands.options import positive_int
from gpt2.config import MODEL_PRESETS, GPTConfig
from gpt2.model import GPT


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``gpt2 presets`` to the command line."""
    p = sub.add_parser(
        "presets",
        help="list the model presets and their parameter counts",
        description="List the model shapes `gpt2 train --model` accepts, with their parameter "
        "counts (each parameter counted once: the output head shares the token embedding).",
    )
    p.add_argument(
        "--vocab-size",
        type=positive_int,
        default=None,
        help="count with this vocabulary (default: the preset's, else 65)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print one line per preset; the models are built on the meta device (no memory)."""
    print(
        f"{'preset':<12} {'layers':>6} {'heads':>5} {'width':>5} {'context':>7} {'vocab':>6} {'parameters':>14}"
    )
    for name, values in MODEL_PRESETS.items():
        vocab = args.vocab_size or values.get("vocab_size", 65)
        config = GPTConfig.preset(name, vocab_size=vocab)
        with torch.device("meta"):  # shapes only: no memory is allocated
            n = GPT(config).num_parameters()
        print(
            f"{name:<12} {config.n_layer:>6} {config.n_head:>5} {config.n_embd:>5} {config.block_size:>7} {vocab:>6} {n:>14,}"
        )
    return 0
