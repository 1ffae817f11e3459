"""``gpt2 train``: train a model; with no options, the TinyShakespeare character demo."""

from __future__ import annotations

import argparse
import logging

from gpt2.commands.options import add_dataclass_flags, given_flags
from gpt2.config import GPTConfig, TrainConfig, load_toml
from gpt2.errors import UserError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (no options: a small character model on TinyShakespeare)",
        description="Train a GPT. Values come from the defaults, then --config, then flags (flags win).",
    )
    p.add_argument(
        "--config",
        help="TOML file: training fields at the top level, model fields in a [model] table",
    )
    add_dataclass_flags(p, TrainConfig, "training")
    add_dataclass_flags(p, GPTConfig, "model shape (overrides the preset)", exclude=("vocab_size",))
    p.set_defaults(func=run)


def resolve_configs(args: argparse.Namespace) -> tuple[TrainConfig, dict]:
    """Defaults, then the TOML file, then the flags."""
    file_values = load_toml(args.config) if args.config else {}
    model_values = file_values.pop("model", {})
    if not isinstance(model_values, dict):
        raise UserError("config file: [model] must be a table")
    if "vocab_size" in model_values:
        raise UserError("config file: vocab_size comes from the data; remove it from [model]")
    unknown = set(model_values) - set(GPTConfig.__dataclass_fields__)
    if unknown:
        raise UserError(f"config file: unknown model field(s) {', '.join(sorted(unknown))}")
    train = TrainConfig.from_dict({**file_values, **given_flags(args, TrainConfig)})
    overrides = {**model_values, **given_flags(args, GPTConfig)}
    return train, overrides


def run(args: argparse.Namespace) -> int:
    from gpt2.train import Trainer

    cfg, overrides = resolve_configs(args)
    result = Trainer(cfg, overrides, show_progress=not args.quiet).run()
    log.info(
        "done: %d steps in %.1fs (%.1f ms/step, %.0f tokens/s); train loss %.4f, val loss %.4f",
        result.step, result.wall_s, result.ms_per_iter, result.tokens_per_s, result.train_loss, result.val_loss,
    )
    log.info("checkpoint: %s", result.checkpoint)
    if result.sample:
        print(f"--- sample ---\n{result.sample}")
    return 0
