"""Checkpoints: a folder that holds everything needed to sample from or resume a run.

    model.safetensors   the weights (the tied output head is stored once, as the embedding)
    config.json         {"format": 1, "model": GPTConfig, "train": TrainConfig, "state": {...}}
    tokenizer.json      the tokenizer
    optimizer.pt        AdamW's state, read back with ``torch.load(weights_only=True)``

Nothing is unpickled except plain tensors and containers. A checkpoint is written to a temp
folder beside its final place and renamed into it, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2.config import GPTConfig, TrainConfig
from gpt2.errors import UserError
from gpt2.model import GPT
from gpt2.tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 1
CHECKPOINT_SUBDIR = "ckpt"  # inside a run's out_dir
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.pt"
TIED_KEY = "lm_head.weight"


@dataclass
class Checkpoint:
    model: GPT
    tokenizer: Tokenizer
    train_config: TrainConfig
    state: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def optimizer_state(self) -> dict[str, Any] | None:
        """The saved optimizer state, if the checkpoint has one."""
        if self.path is None or not (self.path / OPTIMIZER_FILE).is_file():
            return None
        return torch.load(self.path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept a checkpoint folder or a run folder that holds one in ``ckpt/``."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint folder not found: {path}")
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / CHECKPOINT_SUBDIR / CONFIG_FILE).is_file():
        return path / CHECKPOINT_SUBDIR
    raise UserError(f"{path} is not a checkpoint: it has no {CONFIG_FILE}")


def save_checkpoint(
    folder: str | Path,
    model: GPT,
    tokenizer: Tokenizer,
    train_config: TrainConfig,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint to ``folder``, replacing any old one only once it is whole."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != TIED_KEY}
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config = {
            "format": FORMAT_VERSION,
            "model": model.config.to_dict(),
            "train": train_config.to_dict(),
            "state": state or {},
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        tokenizer.save(tmp)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        _swap_into_place(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _swap_into_place(new: Path, final: Path) -> None:
    """Rename ``new`` to ``final``; an existing ``final`` is moved aside first, then removed."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, final)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model, tokenizer and configs from a checkpoint (or run) folder."""
    folder = resolve_checkpoint_dir(path)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        model_config = GPTConfig.from_dict(config["model"])
        train_config = TrainConfig.from_dict(config.get("train", {}))
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint {folder} has a corrupt {CONFIG_FILE}: {e}") from None
    if not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"checkpoint {folder} has no {WEIGHTS_FILE}")
    try:
        weights = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise UserError(f"checkpoint {folder} has corrupt weights ({WEIGHTS_FILE}): {e}") from None
    model = GPT(model_config)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"checkpoint {folder} does not match its config: {first}") from None
    missing = [k for k in missing if k != TIED_KEY]
    if missing or unexpected:
        problem = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(f"checkpoint {folder} does not match its config: {problem}")
    model.to(device)
    tokenizer = load_tokenizer(folder)
    return Checkpoint(model, tokenizer, train_config, config.get("state", {}), folder)
