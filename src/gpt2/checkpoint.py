"""Checkpoints: a folder that holds everything needed to sample from or resume a run.

    model.safetensors   the weights (the tied output head is stored once, as the embedding)
    config.json         {"format": 1, "model": GPTConfig, "train": TrainConfig, "state": {...}}
    tokenizer.json      the tokenizer
    optimizer.pt        AdamW's state, read back with ``torch.load(weights_only=True)``
    trainer.pt          what exact resume needs besides: step, every RNG state, the data
                        loader's position, the gradient scaler, the best val loss so far

Nothing is unpickled except plain tensors and containers. A checkpoint is written to a temp
folder beside its final place and renamed into it, so a crash never leaves a half-written one.

A training run keeps its checkpoints in its ``out_dir``::

    checkpoints/step-00000500/   one folder per save; the newest ``keep_last`` are kept
    checkpoints/best/            the save with the lowest val loss so far
    ckpt/                        the newest save: what `gpt2 sample`, `eval` and `export` find

``best/`` and ``ckpt/`` are hard links to the files of a step folder (files are never changed
once written, so sharing them is safe), copies where the file system has no hard links.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2.config import GPTConfig, TrainConfig
from gpt2.errors import UserError
from gpt2.files import atomic_file, read_json, replaced_folder, write_json
from gpt2.model import GPT
from gpt2.tokenizer import Tokenizer, load_tokenizer
from gpt2.torch_files import load_plain
from gpt2.vocab_checks import check_tokenizer_fits
from gpt2.weights_check import check_finite, check_header_matches

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_SUBDIR = "ckpt"  # inside a run's out_dir: the newest checkpoint
HISTORY_SUBDIR = "checkpoints"  # inside a run's out_dir: every kept checkpoint
BEST_NAME = "best"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"
TIED_KEY = "lm_head.weight"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    model: GPT
    tokenizer: Tokenizer
    train_config: TrainConfig
    state: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def optimizer_state(self) -> dict[str, Any] | None:
        """The saved optimizer state, if the checkpoint has one."""
        return self._torch_file(OPTIMIZER_FILE)

    def trainer_state(self) -> dict[str, Any] | None:
        """The saved resume state (see `TRAINER_FILE`), if the checkpoint has one."""
        return self._torch_file(TRAINER_FILE)

    def _torch_file(self, name: str) -> dict[str, Any] | None:
        if self.path is None or not (self.path / name).is_file():
            return None
        return load_plain(self.path / name, f"checkpoint {self.path} has a bad {name}")


def capture_rng() -> dict[str, Any]:
    """Every random generator this process draws from, as plain values and tensors."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def seed_rngs(seed: int) -> None:
    """Seed every generator `capture_rng` captures."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept a checkpoint folder, or a run folder (its newest checkpoint: ``ckpt/``, else the
    newest of ``checkpoints/``)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint folder not found: {path}")
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / CHECKPOINT_SUBDIR / CONFIG_FILE).is_file():
        return path / CHECKPOINT_SUBDIR
    history = step_checkpoints(path / HISTORY_SUBDIR) or step_checkpoints(path)
    if history:
        return history[0]
    raise UserError(f"{path} is not a checkpoint: it has no {CONFIG_FILE}")


def step_checkpoints(folder: Path) -> list[Path]:
    """The ``step-N`` checkpoint folders inside ``folder``, newest (highest step) first."""
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / CONFIG_FILE).is_file()
    ]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(
    folder: str | Path,
    model: GPT,
    tokenizer: Tokenizer,
    train_config: TrainConfig,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
    *,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint to ``folder``, replacing any old one only once it is whole.

    ``model_state`` and ``optimizer_state`` replace ``model.state_dict()`` and
    ``optimizer.state_dict()`` when given: a sharded (FSDP) run passes the gathered full ones.
    """
    folder = Path(folder)
    with replaced_folder(folder) as tmp:
        weights = model_state if model_state is not None else model.state_dict()
        weights = {k: v.detach().cpu().contiguous() for k, v in weights.items() if k != TIED_KEY}
        with atomic_file(tmp / WEIGHTS_FILE) as path:
            save_file(weights, str(path), metadata={"format": "pt"})
        config = {
            "format": FORMAT_VERSION,
            "model": model.config.to_dict(),
            "train": train_config.to_dict(),
            "state": state or {},
        }
        write_json(tmp / CONFIG_FILE, config)
        tokenizer.save(tmp)
        if optimizer_state is None and optimizer is not None:
            optimizer_state = optimizer.state_dict()
        for name, value in ((OPTIMIZER_FILE, optimizer_state), (TRAINER_FILE, trainer_state)):
            if value is not None:
                # torch.save on a file we opened: a failed write cannot leave torch's own open
                with atomic_file(tmp / name) as path, path.open("wb") as f:
                    torch.save(value, f)
    return folder


def link_checkpoint(source: Path, dest: Path) -> None:
    """Make ``dest`` a checkpoint with the same files as ``source`` (hard links, else copies),
    swapped into place whole."""
    with replaced_folder(dest) as tmp:
        for f in source.iterdir():
            try:
                os.link(f, tmp / f.name)
            except OSError:  # no hard links here (another device, some network file systems)
                shutil.copy2(f, tmp / f.name)


class RunCheckpoints:
    """The checkpoints of one run (see the module docstring for the layout)."""

    def __init__(self, out_dir: str | Path, keep_last: int = 2) -> None:
        self.out_dir = Path(out_dir)
        self.history = self.out_dir / HISTORY_SUBDIR
        self.latest_link = self.out_dir / CHECKPOINT_SUBDIR
        self.best_link = self.history / BEST_NAME
        self.keep_last = max(1, keep_last)
        self._replace_earlier_run = False

    def replace_earlier_run(self) -> None:
        """This run starts afresh: at its first save (not before, so that a run that fails
        early costs nothing), the checkpoints of an earlier run in the same folder go."""
        self._replace_earlier_run = True

    def save(self, step: int, write: Callable[[Path], Any], is_best: bool = False) -> Path:
        """Call ``write(folder)`` (which must write a whole checkpoint there, atomically, as
        `save_checkpoint` does) for this step; then publish it as the newest (and best), and
        drop step folders older than the newest ``keep_last``."""
        folder = self.history / step_dir_name(step)
        if self._replace_earlier_run:
            earlier = step_checkpoints(self.history)
            if earlier:
                log.warning(
                    "removing %d checkpoint(s) of an earlier run in %s (pass --resume "
                    "auto to continue a run instead)",
                    len(earlier),
                    self.history,
                )
            for old in [*earlier, self.best_link]:
                shutil.rmtree(old, ignore_errors=True)
            self._replace_earlier_run = False
        write(folder)
        link_checkpoint(folder, self.latest_link)
        if is_best:
            link_checkpoint(folder, self.best_link)
        self._prune()
        return folder

    def _prune(self) -> None:
        for old in step_checkpoints(self.history)[self.keep_last :]:
            shutil.rmtree(old, ignore_errors=True)
        # Temp folders of saves that were killed halfway: nothing else refers to them.
        for stale in self.history.glob(".*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def candidates(self) -> list[Path]:
        """Checkpoints to resume from, newest first: the step folders, then a ``ckpt/`` that
        has none beside it (a run from before the history existed)."""
        found = step_checkpoints(self.history)
        if not found and (self.latest_link / CONFIG_FILE).is_file():
            found.append(self.latest_link)
        return found


def load_resumable(candidates: list[Path], device: str | torch.device = "cpu") -> Checkpoint:
    """The newest of ``candidates`` that loads whole (weights, optimizer and trainer state); the
    ones that do not are skipped with a warning. `UserError` when none loads."""
    problems = []
    for folder in candidates:
        try:
            ckpt = load_checkpoint(folder, device)
            if ckpt.trainer_state() is None or ckpt.optimizer_state() is None:
                raise UserError(f"checkpoint {folder} has no {TRAINER_FILE} or {OPTIMIZER_FILE}")
            return ckpt
        except UserError as e:
            log.warning("skipping %s: %s", folder, e)
            problems.append(str(e))
    raise UserError("no checkpoint to resume from: " + ("; ".join(problems) or "none found"))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model, tokenizer and configs from a checkpoint (or run) folder."""
    folder = resolve_checkpoint_dir(path)
    try:
        config = read_json(folder / CONFIG_FILE)
    except UserError as e:
        raise UserError(f"checkpoint {folder} has a corrupt {CONFIG_FILE}: {e}") from None
    if "model_type" in config and "model" not in config:
        raise UserError(
            f"{folder} is a Hugging Face model folder, not one of this project's checkpoints "
            "(it is already in Hugging Face's format; `gpt2 sample`, `gpt2 serve` and "
            "`gpt2 export --format gguf` read it)"
        )
    try:
        if not isinstance(config.get("model"), dict):
            raise UserError(f"checkpoint {folder} has a {CONFIG_FILE} with no model entry")
        model_config = GPTConfig.from_dict(config["model"])
        train_config = TrainConfig.from_dict(config.get("train", {}))
    except (UserError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint {folder} has a corrupt {CONFIG_FILE}: {e}") from None
    if not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"checkpoint {folder} has no {WEIGHTS_FILE}")
    where = f"checkpoint {folder}"
    check_header_matches(model_config, folder / WEIGHTS_FILE, where, skip=TIED_KEY)
    try:
        weights = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise UserError(f"checkpoint {folder} has corrupt weights ({WEIGHTS_FILE}): {e}") from None
    check_finite(weights, where)
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
    check_tokenizer_fits(tokenizer, model_config.vocab_size, where)
    return Checkpoint(model, tokenizer, train_config, config.get("state", {}), folder)


def own_checkpoint_dir(source: str | Path) -> Path | None:
    """The folder of one of our checkpoints at ``source`` (or a run folder's newest), else None.

    Ours and Hugging Face's both call their config ``config.json``; ours has ``format`` and
    ``model`` keys, theirs a ``model_type``.
    """
    if not Path(source).is_dir():
        return None
    try:
        folder = resolve_checkpoint_dir(source)
    except UserError:  # no config.json anywhere: not ours
        return None
    try:
        data = read_json(folder / CONFIG_FILE)
    except UserError:  # unreadable: load_checkpoint says so, naming the checkpoint
        return folder
    return folder if "format" in data and "model" in data else None


def load_model(source: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """The model and its tokenizer from any ``source`` a command takes: one of our checkpoint
    (or run) folders, a Hugging Face GPT-2 folder, or a Hub name (``gpt2``, ``gpt2-medium``,
    ``org/name``; see `gpt2.hf`). Every command and ``--init-from`` load through here."""
    path = Path(source).expanduser()
    own = own_checkpoint_dir(path)
    if own is None and path.is_dir() and not (path / CONFIG_FILE).is_file():
        own = path  # neither kind: load_checkpoint says what is missing
    if own is not None:
        ckpt = load_checkpoint(own, device)
        return ckpt.model, ckpt.tokenizer
    from gpt2.hf import load_hf, looks_local  # imported only here: gpt2.hf is large

    if not path.exists() and looks_local(str(source)):  # a mistyped path, not a Hub name
        raise UserError(f"checkpoint folder not found: {path}")

    return load_hf(path if path.exists() else str(source), device)
