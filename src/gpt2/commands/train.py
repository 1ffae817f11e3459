"""``gpt2 train``: train a model; with no options, the TinyShakespeare character demo.

Under ``torchrun --nproc_per_node=N -m gpt2 train ...`` each process runs this command; they
find each other through torchrun's environment (see `gpt2.distributed`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
from importlib import resources
from pathlib import Path

from gpt2.commands.options import add_dataclass_flags, given_flags
from gpt2.config import MODEL_PRESETS, GPTConfig, TrainConfig, load_toml
from gpt2.errors import UserError

log = logging.getLogger(__name__)

DEMO_DATA_DIR = Path("data/shakespeare-char")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (no options: a small character model on TinyShakespeare)",
        description="Train a GPT. Values come from the defaults, then --config, then flags "
        "(flags win). Ready-made configs: " + ", ".join(packaged_configs()) + ".",
    )
    p.add_argument(
        "--config",
        help="TOML file (training fields at the top level; a [model] table with the preset "
        "and fields that override it), or the name of a ready-made config",
    )
    add_dataclass_flags(p, TrainConfig, "training")
    add_dataclass_flags(
        p,
        GPTConfig,
        "model shape (overrides the preset)",
        exclude=("vocab_size",),
        shown_defaults=preset_defaults(TrainConfig().model),
    )
    p.set_defaults(func=run)


def preset_defaults(preset: str) -> dict[str, str]:
    """What a run without shape flags uses: the default preset's values (not GPTConfig's own
    defaults, which are GPT-2 124M's)."""
    values = {**GPTConfig().to_dict(), **MODEL_PRESETS[preset]}
    return {name: f"{value!r}, from --model {preset}" for name, value in values.items()}


def packaged_configs() -> list[str]:
    """Names of the configs shipped in ``gpt2/configs`` (without ``.toml``)."""
    folder = resources.files("gpt2") / "configs"
    return sorted(
        f.name.removesuffix(".toml") for f in folder.iterdir() if f.name.endswith(".toml")
    )


def config_path(name: str) -> Path:
    """A TOML file path as given, else a packaged config of that name."""
    if Path(name).is_file() or name.endswith(".toml") or "/" in name:
        return Path(name)
    packaged = resources.files("gpt2") / "configs" / f"{name}.toml"
    if not packaged.is_file():
        known = ", ".join(packaged_configs())
        raise UserError(f"config {name!r} is neither a file nor a ready-made config ({known})")
    return Path(str(packaged))


def resolve_configs(args: argparse.Namespace) -> tuple[TrainConfig, dict]:
    """Defaults, then the TOML file, then the flags."""
    file_values = load_toml(config_path(args.config)) if args.config else {}
    model_values = file_values.pop("model", {})
    if isinstance(model_values, str):  # model = "gpt2": the preset, with no [model] table
        model_values = {"preset": model_values}
    if not isinstance(model_values, dict):
        raise UserError("config file: model must be a preset name or a [model] table")
    model_values = dict(model_values)
    if "preset" in model_values:  # [model] preset = "gpt2", then fields that override it
        file_values["model"] = model_values.pop("preset")
    if "vocab_size" in model_values:
        raise UserError("config file: vocab_size comes from the data; remove it from [model]")
    unknown = set(model_values) - set(GPTConfig.__dataclass_fields__)
    if unknown:
        raise UserError(f"config file: unknown model field(s) {', '.join(sorted(unknown))}")
    train = TrainConfig.from_dict({**file_values, **given_flags(args, TrainConfig)})
    overrides = {**model_values, **given_flags(args, GPTConfig)}
    # The shape is checked now, before data is prepared or read (its vocabulary comes later).
    GPTConfig.preset(train.model, **{**overrides, "vocab_size": 1})
    return train, overrides


def demo_data_dir(show_progress: bool = True) -> Path:
    """TinyShakespeare as characters, prepared on first use (again, if an older gpt2 prepared
    it): the built-in demo's data."""
    from gpt2.assets import fetch
    from gpt2.prepare import prepare_text
    from gpt2.shards import read_meta

    try:
        read_meta(DEMO_DATA_DIR)
    except UserError:
        source = fetch("tinyshakespeare/input.txt")
        log.info("preparing %s as characters in %s", source, DEMO_DATA_DIR)
        prepare_text(
            source, DEMO_DATA_DIR, tokenizer="char", val_fraction=0.1, show_progress=show_progress
        )
    return DEMO_DATA_DIR


def run(args: argparse.Namespace) -> int:
    from gpt2 import distributed
    from gpt2.train import Trainer

    cfg, overrides = resolve_configs(args)
    if not cfg.data:
        cfg = dataclasses.replace(cfg, data=str(demo_data_dir(show_progress=not args.quiet)))
    env = distributed.env_from_torchrun()
    try:
        result = Trainer(cfg, overrides, show_progress=not args.quiet).run()
    finally:
        distributed.teardown(env)
    if not env.is_main:
        return exit_status(result.stopped_by)
    log.info(
        "%s: %d steps in %.1fs (%.1f ms/step, %.0f tokens/s); train loss %.4f, val loss %.4f",
        f"stopped by {result.stopped_by}" if result.stopped_by else "done",
        result.step,
        result.wall_s,
        result.ms_per_iter,
        result.tokens_per_s,
        result.train_loss,
        result.val_loss,
    )
    if result.trained_tokens_per_s is not None:
        log.info("of those, trained on (the replies): %.0f tokens/s", result.trained_tokens_per_s)
    log.info("checkpoint: %s", result.checkpoint)
    if result.sample:
        print(f"--- sample ---\n{result.sample}")
    return exit_status(result.stopped_by)


def exit_status(stopped_by: str) -> int:
    """0 for a run that reached max_iters; for one a signal stopped (after saving), the shell's
    128 + the signal's number (SIGINT 130, SIGTERM 143), so that a script can tell it stopped
    early. Another process's signal (under torchrun) counts as SIGTERM."""
    if not stopped_by:
        return 0
    try:
        return 128 + signal.Signals[stopped_by].value
    except KeyError:
        return 128 + signal.SIGTERM.value
