"""The training loop: AdamW, warm-up then cosine decay, clipping, periodic evaluation.

`Trainer` holds a run's state (model, optimizer, data) so that each step of the loop is a small
method a reader can follow and a test can call; nothing here lives in module globals.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gpt2.assets import fetch
from gpt2.checkpoint import CHECKPOINT_SUBDIR, save_checkpoint
from gpt2.config import GPTConfig, TrainConfig
from gpt2.data import TokenWindows, fixed_batches, infinite_batches, load_split, make_loader, prepare, read_meta
from gpt2.errors import UserError
from gpt2.generate import generate
from gpt2.model import GPT
from gpt2.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path("data/shakespeare-char")
METRICS_FILE = "metrics.jsonl"


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; anything else is checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for, but torch sees no CUDA GPU")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device mps was asked for, but it is not available")
    return device


def learning_rate_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``learning_rate``, cosine decay to ``min_lr`` at ``decay_iters``,
    then flat at ``min_lr``."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    if step >= cfg.decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, cfg.decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def default_data_dir() -> Path:
    """TinyShakespeare as characters, prepared on first use: the built-in demo's data."""
    if not (DEFAULT_DATA_DIR / "meta.json").is_file():
        source = fetch("tinyshakespeare/input.txt")
        log.info("preparing %s as characters in %s", source, DEFAULT_DATA_DIR)
        prepare(source, DEFAULT_DATA_DIR, tokenizer="char")
    return DEFAULT_DATA_DIR


@dataclass
class TrainResult:
    step: int
    train_loss: float
    val_loss: float
    ms_per_iter: float
    tokens_per_s: float
    wall_s: float
    checkpoint: Path
    sample: str


class Trainer:
    """One training run: build everything from the configs, then `run`."""

    def __init__(
        self,
        cfg: TrainConfig,
        model_overrides: dict[str, Any] | None = None,
        show_progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.show_progress = show_progress
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = resolve_device(cfg.device)
        self.data_dir = Path(cfg.data) if cfg.data else default_data_dir()
        meta = read_meta(self.data_dir)
        self.tokenizer = load_tokenizer(self.data_dir)
        torch.manual_seed(cfg.seed)
        self.model = self._build_model(meta, model_overrides or {}).to(self.device)
        block = self.model.config.block_size
        self.train_set = TokenWindows(load_split(self.data_dir, "train"), block, "the train split")
        self.val_set = TokenWindows(load_split(self.data_dir, "val"), block, "the val split")
        self.batches = infinite_batches(make_loader(self.train_set, cfg.batch_size, cfg.seed))
        # Fixed batches make successive loss estimates comparable (the same text every time).
        self.eval_batches = {
            "train": fixed_batches(self.train_set, cfg.batch_size, cfg.eval_iters, cfg.seed + 1),
            "val": fixed_batches(self.val_set, cfg.batch_size, cfg.eval_iters, cfg.seed + 2),
        }
        self.optimizer = self.model.configure_optimizer(
            cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), self.device.type
        )
        self.out_dir = Path(cfg.out_dir)
        self.step = 0

    def _build_model(self, meta: dict[str, Any], overrides: dict[str, Any]) -> GPT:
        """A fresh model of the preset's shape sized to the data's vocabulary, or pretrained
        weights when ``init_from`` is set."""
        if self.cfg.init_from:
            return self._pretrained_model(overrides)
        config = GPTConfig.preset(self.cfg.model, **{**overrides, "vocab_size": meta["vocab_size"]})
        model = GPT(config)
        log.info("model %s: %.2fM parameters, %s", self.cfg.model, model.num_parameters() / 1e6, config)
        return model

    def _pretrained_model(self, overrides: dict[str, Any]) -> GPT:
        source = self.cfg.init_from
        # One of our checkpoints, a Hugging Face folder or a Hub name: gpt2.hf tells them apart
        # (both kinds of folder hold a config.json and may hold a tokenizer.json).
        from gpt2.hf import load_pretrained

        model, tokenizer = load_pretrained(source)
        if tokenizer.to_dict() != self.tokenizer.to_dict():
            raise UserError(
                f"{source} uses a {tokenizer.kind} tokenizer but the data was prepared with "
                f"{self.tokenizer.kind}; prepare the data with the model's tokenizer"
            )
        if overrides.get("block_size"):
            model.crop_block_size(overrides["block_size"])
        if overrides.get("dropout") is not None:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = overrides["dropout"]
        log.info("initialised from %s (%.2fM parameters)", source, model.num_parameters() / 1e6)
        return model

    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float]:
        """Mean loss over the fixed train and val batches, with dropout off."""
        self.model.eval()
        out = {}
        for split, batches in self.eval_batches.items():
            losses = [self.model(x.to(self.device), y.to(self.device))[1].item() for x, y in batches]
            out[split] = sum(losses) / len(losses)
        self.model.train()
        return out

    def train_step(self) -> float:
        """One optimiser step on the next batch; returns its loss."""
        lr = learning_rate_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = next(self.batches)
        x, y = x.to(self.device), y.to(self.device)
        _, loss = self.model(x, y)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.item()

    def save(self, losses: dict[str, float]) -> Path:
        state = {"step": self.step, **{f"{k}_loss": v for k, v in losses.items()}}
        return save_checkpoint(
            self.out_dir / CHECKPOINT_SUBDIR, self.model, self.tokenizer, self.cfg, self.optimizer, state
        )

    def sample(self, n_tokens: int, temperature: float = 0.8, top_k: int = 200) -> str:
        """A short sample from the start-of-text (end-of-text id, or a newline for characters)."""
        start = self.tokenizer.eot_token
        prompt = [start] if start is not None else self.tokenizer.encode("\n")
        idx = torch.tensor([prompt], dtype=torch.long, device=self.device)
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        self.model.eval()
        out = generate(self.model, idx, n_tokens, temperature=temperature, top_k=top_k, generator=g)
        self.model.train()
        return self.tokenizer.decode(out[0, len(prompt) :].tolist())

    def run(self) -> TrainResult:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics = (self.out_dir / METRICS_FILE).open("w", encoding="utf-8")
        tokens_per_step = cfg.batch_size * self.model.config.block_size
        losses = {"train": float("nan"), "val": float("nan")}
        train_time = 0.0
        start = time.perf_counter()
        self.model.train()
        bar = tqdm(total=cfg.max_iters, desc="training", unit="step", disable=not self.show_progress)
        try:
            while self.step < cfg.max_iters:
                t0 = time.perf_counter()
                loss = self.train_step()
                dt = time.perf_counter() - t0
                train_time += dt
                if not math.isfinite(loss):
                    raise UserError(f"loss became {loss} at step {self.step}; lower the learning rate")
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.step % cfg.log_interval == 0:
                    self._write(metrics, step=self.step, loss=loss, lr=learning_rate_at(self.step - 1, cfg),
                                ms_per_iter=dt * 1e3, tokens_per_s=tokens_per_step / dt)
                if self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters:
                    losses = self.estimate_loss()
                    tps = tokens_per_step * self.step / train_time
                    log.info("step %d: train loss %.4f, val loss %.4f, %.0f tokens/s",
                             self.step, losses["train"], losses["val"], tps)
                    self._write(metrics, step=self.step, train_loss=losses["train"], val_loss=losses["val"])
                    self.save(losses)
        finally:
            bar.close()
            metrics.close()
        wall = time.perf_counter() - start
        sample = self.sample(cfg.sample_tokens) if cfg.sample_tokens else ""
        return TrainResult(
            step=self.step,
            train_loss=losses["train"],
            val_loss=losses["val"],
            ms_per_iter=1e3 * train_time / max(1, self.step),
            tokens_per_s=tokens_per_step * self.step / max(train_time, 1e-9),
            wall_s=wall,
            checkpoint=self.out_dir / CHECKPOINT_SUBDIR,
            sample=sample,
        )

    @staticmethod
    def _write(f: Any, **record: Any) -> None:
        f.write(json.dumps(record) + "\n")
        f.flush()
