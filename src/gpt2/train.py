"""The training loop: AdamW, warm-up then cosine decay, clipping, evaluation, checkpoints.

`Trainer` holds a run's state (model, optimizer, data) so that each step of the loop is a small
method a reader can follow and a test can call; nothing here lives in module globals.

One optimizer step, on each of ``world_size`` processes (see `gpt2.distributed`):

    for each of accum_steps micro-batches (batch_size x block_size tokens each):
        loss = model(x, y) / accum_steps;  loss.backward()   # gradients add up
    (the last backward also averages the gradients across processes)
    clip the gradient norm; AdamW step; zero the gradients

so the update is the mean gradient over ``total_batch_tokens`` tokens whatever the split into
processes and micro-batches. A run can stop at any step and resume exactly: a checkpoint holds
the weights, the optimizer, the step, every random generator, the gradient scaler and the data
loader's position (`gpt2.checkpoint`, `gpt2.loader`).

On conversations (a data folder with masks, from ``gpt2 prepare --chat``) only the assistant's
tokens are scored, and how many there are varies from micro-batch to micro-batch. Each
micro-batch's loss then weighs its share of the step's scored tokens (counted over all
processes), so the update is the mean gradient over the step's scored tokens rather than a mean
of per-micro-batch means, and the loss estimates are means over scored tokens too. The metrics
count those tokens (``trained_tokens``) beside the total.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gpt2 import distributed
from gpt2.checkpoint import (
    CHECKPOINT_SUBDIR,
    Checkpoint,
    RunCheckpoints,
    capture_rng,
    load_model,
    load_resumable,
    resolve_checkpoint_dir,
    restore_rng,
    save_checkpoint,
    seed_rngs,
)
from gpt2.config import GPTConfig, TrainConfig, padded_vocab_size
from gpt2.device import resolve_device, resolve_dtype
from gpt2.errors import UserError
from gpt2.evaluate import Task, load_task
from gpt2.files import make_folder
from gpt2.generate import SamplingParams, complete
from gpt2.loader import Layout, TrainBatches, WindowSequence, fixed_batches, grouped
from gpt2.metrics import (
    MetricsLog,
    flops_per_token,
    peak_flops,
    peak_memory_gb,
    precision_name,
)
from gpt2.model import GPT
from gpt2.shards import SPLITS, load_masks, load_split, read_meta
from gpt2.tokenizer import load_tokenizer
from gpt2.vocab_checks import check_ids_fit, tokenizer_difference

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
MAX_SKIPS_IN_A_ROW = 10  # --on-nan skip gives up after this many bad steps in a row
EVAL_TOKENS = 8192  # positions per forward when estimating the loss: several small batches at once
EVAL_LOGITS_BYTES = 1 << 27  # and at most this much of float32 logits


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


def accumulation_steps(total_batch_tokens: int, micro_tokens: int, world_size: int) -> int:
    """Micro-steps per optimizer step so that ``world_size`` processes of ``micro_tokens``
    tokens each reach ``total_batch_tokens`` (0: one micro-step)."""
    if total_batch_tokens == 0:
        return 1
    per_pass = micro_tokens * world_size
    if total_batch_tokens % per_pass:
        lower = max(per_pass, total_batch_tokens // per_pass * per_pass)
        raise UserError(
            f"total_batch_tokens {total_batch_tokens} is not a multiple of batch_size x "
            f"block_size x processes = {per_pass}; use {lower} or {lower + per_pass}, or change "
            f"batch_size"
        )
    return total_batch_tokens // per_pass


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's notice) ask the loop to stop after the step
    in progress; it saves a checkpoint and returns. A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        log.warning("%s: stopping after this step, then saving a checkpoint", self.signal_name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach the main thread only; nothing to install here
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


@dataclass
class StepStats:
    loss: float  # mean over the step's micro-batches and processes (scored tokens, for chat)
    grad_norm: float  # before clipping
    lr: float
    skipped: bool = False
    trained_tokens: int | None = None  # scored targets in the step, all processes (masked data)


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
    stopped_by: str = ""  # the signal that stopped the run early, if one did
    trained_tokens_per_s: float | None = None  # masked data: the scored tokens only


class Trainer:
    """One training run: build everything from the configs, then `run`."""

    def __init__(
        self,
        cfg: TrainConfig,
        model_overrides: dict[str, Any] | None = None,
        show_progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self._set_up_device()
        self.show_progress = show_progress and self.is_main
        self.data_dir, meta = self._open_data()
        self.tokenizer = load_tokenizer(self.data_dir)
        self.eval_task = self._load_eval_task()
        self.out_dir = Path(cfg.out_dir)
        self.checkpoints = RunCheckpoints(self.out_dir, cfg.keep_last)
        resume_from = self._checkpoint_to_resume()

        torch.manual_seed(cfg.seed)  # the same initial weights on every process
        model = self._build_model(meta, model_overrides or {}, resume_from)
        self.model = model.to(self.device)
        self._choose_precision()
        self.flops_per_token = flops_per_token(
            model.config, model.num_parameters(non_embedding=True)
        )
        seed_rngs(cfg.seed + self.env.rank)  # from here on each process draws its own numbers
        self._build_batches()

        self.wrapped = distributed.wrap_model(self.model, self.env, self.device, cfg.fsdp)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.train_model = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.step = 0
        self.trained_tokens = 0  # scored targets so far, all processes (masked data only)
        self.best_val_loss = math.inf
        self.skips_in_a_row = 0
        self.last_checkpoint: Path | None = None
        if resume_from is not None:
            self._restore(resume_from)
        else:
            self.checkpoints.replace_earlier_run()

    # --- building --------------------------------------------------------------------------

    def _set_up_device(self) -> None:
        """This process's place in the run, its device and precision (`gpt2.device`)."""
        cfg = self.cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.env = distributed.env_from_torchrun()
        self.device = distributed.setup(self.env, resolve_device(cfg.device))
        self.is_main = self.env.is_main
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
            torch.backends.cudnn.allow_tf32 = cfg.tf32
        # On the CPU the loss is computed a chunk of rows at a time (never the whole logits
        # tensor), in float32 under autocast too; GPUs take the plain path.
        self.chunked_loss = self.device.type == "cpu"

    def _choose_precision(self) -> None:
        """The dtype for this model on this device (`gpt2.device`), logged with its reason. The
        checkpoint records what ran, not "auto": a resume on another machine sees the change."""
        self.precision = resolve_dtype(self.cfg.dtype, self.device, self.model.config.n_embd)
        self.dtype = self.precision.dtype
        if self.is_main:
            log.info("dtype: %s (%s)", self.precision.name, self.precision.reason)
        self.cfg = dataclasses.replace(self.cfg, dtype=self.precision.name)

    def _open_data(self) -> tuple[Path, dict[str, Any]]:
        """The prepared folder and its ``meta.json`` (`gpt2.shards`)."""
        if not self.cfg.data:
            raise UserError(
                "no data folder: set data to a folder from `gpt2 prepare` (`gpt2 train` without "
                "--data prepares TinyShakespeare itself)"
            )
        return Path(self.cfg.data), read_meta(self.cfg.data)

    def _load_eval_task(self) -> Task | None:
        """The benchmark of --eval-task, read once now: a bad file stops the run before step 1."""
        cfg = self.cfg
        if not cfg.eval_task:
            return None
        return load_task(
            cfg.eval_task, self.tokenizer, cfg.eval_data or None, cfg.eval_limit or None
        )

    def _build_batches(self) -> None:
        """This rank's training batches, resumable (`gpt2.loader`), and the fixed batches that
        estimate the loss: the same text at every evaluation, so estimates are comparable."""
        cfg, env, block = self.cfg, self.env, self.model.config.block_size
        self.micro_tokens = cfg.batch_size * block
        self.accum_steps = accumulation_steps(
            cfg.total_batch_tokens, self.micro_tokens, env.world_size
        )
        layout = Layout(cfg.batch_size, self.accum_steps, env.rank, env.world_size)
        self.tokens_per_step = layout.windows_per_step * block
        splits = {split: load_split(self.data_dir, split) for split in SPLITS}
        masks = {split: load_masks(self.data_dir, split) for split in SPLITS}
        self.masked = masks["train"] is not None  # conversations: only replies are scored
        vocab = self.model.config.vocab_size
        check_ids_fit([a for arrays in splits.values() for a in arrays], vocab, str(self.data_dir))
        train = WindowSequence(splits["train"], block, cfg.seed, "the train split", masks["train"])
        self.batches = TrainBatches(train, layout)
        n_batches = -(-cfg.eval_iters // env.world_size) * env.world_size
        # Fewer, larger forwards; one batch a forward under torch.compile (a new shape recompiles).
        per_group = 1 if cfg.compile else min(
            EVAL_TOKENS // self.micro_tokens, EVAL_LOGITS_BYTES // (self.micro_tokens * vocab * 4)
        )  # fmt: skip
        sequences = {
            split: WindowSequence(
                arrays, block, cfg.seed + 1 + i, f"the {split} split", masks[split]
            )
            for i, (split, arrays) in enumerate(splits.items())
        }
        self.eval_batches = {
            split: grouped(
                fixed_batches(seq, cfg.batch_size, n_batches, env.rank, env.world_size), per_group
            )
            for split, seq in sequences.items()
        }

    def _checkpoint_to_resume(self) -> Checkpoint | None:
        """The checkpoint ``--resume`` names (``auto``: the newest valid one in out_dir)."""
        if not self.cfg.resume:
            return None
        if self.cfg.resume == "auto":
            candidates = self.checkpoints.candidates()
            if not candidates:
                if self.is_main:
                    log.info("no checkpoint in %s: starting from scratch", self.out_dir)
                return None
        else:
            candidates = [resolve_checkpoint_dir(self.cfg.resume)]
        # Rank 0 chooses, so that every process resumes from the same one.
        ckpt = load_resumable(candidates) if self.is_main else None
        chosen = distributed.broadcast_object(str(ckpt.path) if ckpt else None, self.env)
        if ckpt is None:
            ckpt = load_resumable([Path(chosen)])
        if ckpt.tokenizer.to_dict() != self.tokenizer.to_dict():
            raise UserError(
                f"checkpoint {ckpt.path} and the data in {self.data_dir} use different "
                f"tokenizers: {tokenizer_difference(ckpt.tokenizer, self.tokenizer)}"
            )
        if self.is_main:
            log.info("resuming from %s (step %s)", ckpt.path, ckpt.state.get("step", "?"))
        return ckpt

    def _build_model(
        self, meta: dict[str, Any], overrides: dict[str, Any], resume_from: Checkpoint | None
    ) -> GPT:
        """The checkpoint's model when resuming; else pretrained weights when ``init_from`` is
        set; else a fresh model of the preset's shape sized to the data's vocabulary."""
        if resume_from is not None:
            return resume_from.model
        if self.cfg.init_from:
            if self.cfg.pad_vocab and self.is_main:
                log.warning("pad_vocab applies to new models only; %s keeps its vocabulary",
                            self.cfg.init_from)  # fmt: skip
            return self._pretrained_model(overrides)
        vocab = meta["vocab_size"]
        if self.cfg.pad_vocab:
            vocab = padded_vocab_size(vocab)
        config = GPTConfig.preset(self.cfg.model, **{**overrides, "vocab_size": vocab})
        model = GPT(config)
        if self.is_main:
            log.info("model %s: %.2fM parameters, %s",
                     self.cfg.model, model.num_parameters() / 1e6, config)  # fmt: skip
        return model

    def _pretrained_model(self, overrides: dict[str, Any]) -> GPT:
        source = self.cfg.init_from
        model, tokenizer = load_model(source)  # ours, a Hugging Face folder or a Hub name
        if tokenizer.to_dict() != self.tokenizer.to_dict():
            raise UserError(
                f"{source} and the data in {self.data_dir} use different tokenizers "
                f"({tokenizer_difference(tokenizer, self.tokenizer)}); prepare the data with "
                "the model's tokenizer"
            )
        if tokenizer.chat_template != self.tokenizer.chat_template and self.is_main:
            log.info("%s has another chat template than the data; the checkpoints get the "
                     "data's", source)  # fmt: skip
        if overrides.get("block_size"):
            model.crop_block_size(overrides["block_size"])
        if overrides.get("dropout") is not None:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = overrides["dropout"]
        if self.is_main:
            log.info("initialised from %s (%.2fM parameters)", source, model.num_parameters() / 1e6)
        return model

    def _restore(self, ckpt: Checkpoint) -> None:
        """Everything but the weights (already in the model): optimizer, step, RNGs, data
        position, scaler. The configs may differ (a longer run, say); what changes is logged."""
        state = ckpt.trainer_state() or {}
        distributed.load_optimizer_state(self.model, self.optimizer, ckpt.optimizer_state())
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.trained_tokens = int(state.get("trained_tokens", 0))
        self.best_val_loss = float(state.get("best_val_loss", math.inf))
        changed = self.batches.load_state_dict(state["loader"])
        rngs = state.get("rng", [])
        if len(rngs) == self.env.world_size:
            restore_rng(rngs[self.env.rank])
        elif self.is_main:
            log.warning("the checkpoint was written by %d processes, this run has %d: random "
                        "numbers (dropout) will differ from the original run",
                        len(rngs), self.env.world_size)  # fmt: skip
        if not self.is_main:
            return
        if changed:
            log.warning(
                "the training data differs from the checkpoint's (%s): the batches "
                "will not be those of the original run",
                ", ".join(changed),
            )
        old, new = ckpt.train_config.to_dict(), self.cfg.to_dict()
        diffs = [f"{k} {old[k]!r} -> {new[k]!r}"
                 for k in new if k in old and old[k] != new[k] and k != "resume"]  # fmt: skip
        if diffs:
            log.info("settings changed since the checkpoint: %s", "; ".join(diffs))

    # --- one step ----------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _forward_loss(
        self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        with self._autocast():
            if self.chunked_loss and torch.is_grad_enabled():
                return model(x, y, return_logits=False)[1]
            return model(x, y)[1]

    def train_step(self) -> StepStats:
        """One optimizer step: accumulate the micro-batches' gradients, check the loss, clip,
        update. A NaN or infinite loss stops the run (`UserError`) or, with ``on_nan = skip``,
        discards the step's gradients."""
        cfg = self.cfg
        lr = learning_rate_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro_losses = []
        micro = self.batches.next_step()
        weights, n_trained = self._micro_weights(micro)
        for i, (x, y) in enumerate(micro):
            last = i == self.accum_steps - 1
            with distributed.gradient_sync(self.train_model, sync=last):
                loss = self._forward_loss(self.train_model, self._to_device(x), self._to_device(y))
                # Each micro-batch weighs 1/accum_steps (or its share of the scored tokens);
                # processes are averaged by the sync.
                share = loss / self.accum_steps if weights is None else loss * weights[i]
                self.scaler.scale(share).backward()
            micro_losses.append((loss if weights is None else share).detach())
        self.scaler.unscale_(self.optimizer)
        norm = self._clip_gradients()
        # One transfer for everything the host must look at: the losses and the norm.
        summary = torch.cat([torch.stack(micro_losses).float(), norm.float().reshape(1)])
        summary[:-1] = distributed.all_reduce(summary[:-1].clone(), self.env) / self.env.world_size
        values = summary.tolist()
        # Each micro-batch's loss (masked data: its share of the step's loss, which adds up).
        losses, grad_norm = values[:-1], values[-1]
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if bad is None and not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            bad = -1  # finite loss, infinite gradient (the fp16 scaler handles its own)
        self.step += 1
        if bad is not None:
            self._bad_step(bad, losses, grad_norm)
            return StepStats(float("nan"), grad_norm, lr, skipped=True)
        self.skips_in_a_row = 0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if n_trained is None:
            return StepStats(sum(losses) / len(losses), grad_norm, lr)
        self.trained_tokens += n_trained
        step_loss = sum(losses) if n_trained else float("nan")  # no reply in the whole step
        return StepStats(step_loss, grad_norm, lr, trained_tokens=n_trained)

    def _micro_weights(
        self, micro: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[list[float] | None, int | None]:
        """Masked data: each micro-batch's weight, ``scored * world_size / step_scored`` (the
        sync then averages the processes), and the step's scored targets on all processes.
        None, None for text, where every micro-batch weighs ``1 / accum_steps``."""
        if not self.masked:
            return None, None
        counts = [int((y != -1).sum()) for _, y in micro]
        total = torch.tensor([sum(counts)], dtype=torch.int64, device=self.device)
        n_trained = int(distributed.all_reduce(total, self.env).item())
        return [c * self.env.world_size / max(1, n_trained) for c in counts], n_trained

    def _clip_gradients(self) -> torch.Tensor:
        """The global gradient norm before clipping (a 0-dim tensor), clipping if asked."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP
        return full() if full is not None else norm

    def _bad_step(self, micro: int, losses: list[float], grad_norm: float) -> None:
        step = self.step  # already counted: steps are numbered from 1 in the logs
        where = f"micro-batch {micro + 1} of {len(losses)}" if micro >= 0 else "the gradients"
        value = losses[micro] if micro >= 0 else grad_norm
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.on_nan == "skip":
            self.skips_in_a_row += 1
            if self.skips_in_a_row <= MAX_SKIPS_IN_A_ROW:
                if self.is_main:
                    log.warning("step %d: %s gave %s; step skipped", step, where, value)
                return
        last = self.last_checkpoint
        last = f"; the last checkpoint ({last}) is intact" if last else ""
        tail = (
            f" ({MAX_SKIPS_IN_A_ROW} steps skipped in a row)" if self.cfg.on_nan == "skip" else ""
        )
        raise UserError(
            f"loss became {value} at step {step}, {where}{tail}{last}; lower the learning "
            f"rate, or pass --on-nan skip"
        )

    # --- evaluation, samples, checkpoints ----------------------------------------------------

    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float]:
        """Mean loss per scored target (every target, on text) over the fixed train and val
        batches (split across processes), dropout off."""
        model = self.train_model
        model.eval()
        out = {}
        for split, batches in self.eval_batches.items():
            total = torch.zeros(2, device=self.device)  # (sum of losses, scored targets)
            for x, y in batches:
                loss = self._forward_loss(model, self._to_device(x), self._to_device(y))
                scored = float((y != -1).sum())  # each forward weighs its scored targets
                total += torch.stack([loss.float() * scored, total.new_tensor(scored)])
            total = distributed.all_reduce(total, self.env)
            out[split] = (total[0] / total[1]).item()
        model.train()
        return out

    def sample(self, n_tokens: int, temperature: float = 0.8, top_k: int = 200) -> str:
        """A short sample from the start-of-text (end-of-text id, or a newline for characters),
        by the decode loop of `gpt2 sample` (ids past the tokenizer's, --pad-vocab's, masked)."""
        start = self.tokenizer.eot_token
        prompt = [start] if start is not None else self.tokenizer.encode("\n")
        # ignore_eot: a sample of a fixed length
        params = SamplingParams(n_tokens, temperature, top_k, seed=self.cfg.seed, ignore_eot=True)
        self.model.eval()
        with self._autocast():
            text = complete(self.model, [prompt], params, self.tokenizer)[0].text
        self.model.train()
        return text or ""

    def _samples_everywhere(self) -> bool:
        """Under FSDP every process must run the model (each holds a shard of the weights)."""
        return self.is_main or self.cfg.fsdp

    def save(self, losses: dict[str, float] | None = None) -> Path | None:
        """A checkpoint of this step in out_dir (on rank 0; every rank must call it). Returns
        its folder on rank 0, None elsewhere."""
        sharded = self.cfg.fsdp and self.env.enabled
        model_state = optimizer_state = None
        if sharded or self.is_main:
            model_state, optimizer_state = distributed.full_state(self.model, self.optimizer)
        rngs = distributed.all_gather_objects(capture_rng(), self.env)
        val = (losses or {}).get("val")
        is_best = val is not None and math.isfinite(val) and val < self.best_val_loss
        if is_best:
            self.best_val_loss = val
        if not self.is_main:
            return None
        trainer_state = {
            "step": self.step,
            "rng": rngs,
            "loader": self.batches.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "best_val_loss": self.best_val_loss,
            "world_size": self.env.world_size,
            "trained_tokens": self.trained_tokens,
        }
        state = {"step": self.step, **{f"{k}_loss": v for k, v in (losses or {}).items()}}

        def write(folder: Path) -> Path:
            return save_checkpoint(
                folder,
                self.model,
                self.tokenizer,
                self.cfg,
                state=state,
                model_state=model_state,
                optimizer_state=optimizer_state,
                trainer_state=trainer_state,
            )

        self.last_checkpoint = self.checkpoints.save(self.step, write, is_best=is_best)
        return self.last_checkpoint

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train to ``max_iters`` (or until SIGINT/SIGTERM), evaluating, logging, sampling and
        saving along the way; then plot the metrics and draw a final sample."""
        cfg = self.cfg
        metrics = self._open_metrics()
        peak = peak_flops(self.device, precision_name(self.dtype, cfg.tf32), cfg.peak_tflops)
        losses = {"train": float("nan"), "val": float("nan")}
        first_step, train_time, stopped_by = self.step, 0.0, ""
        first_trained = self.trained_tokens
        start = time.perf_counter()
        self.model.train()
        bar = tqdm(total=cfg.max_iters, initial=self.step, desc="training", unit="step",
                   disable=not self.show_progress)  # fmt: skip
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(metrics.close)
            cleanup.callback(bar.close)
            stop = cleanup.enter_context(StopRequest().installed())
            while self.step < cfg.max_iters:
                # --- one optimizer step
                t0 = time.perf_counter()
                stats = self.train_step()
                dt = time.perf_counter() - t0
                train_time += dt
                step = self.step
                bar.update(1)
                # --- log its loss, speed and memory
                if step % cfg.log_interval == 0:
                    bar.set_postfix(loss=f"{stats.loss:.4f}", refresh=False)
                    self._log_step(metrics, stats, dt, peak)
                # --- estimate the loss on the fixed batches, every eval_interval and at the end
                evaluate = step % cfg.eval_interval == 0 or step == cfg.max_iters
                if evaluate:
                    losses = self.estimate_loss()
                    tokens_per_s = self.tokens_per_step * (step - first_step) / train_time
                    trained_per_s = (self.trained_tokens - first_trained) / train_time
                    self._log_eval(metrics, losses, tokens_per_s, trained_per_s)
                # --- the benchmark (--eval-task) and a sample
                self._run_eval_task(metrics, evaluated=evaluate)
                if cfg.sample_interval and step % cfg.sample_interval == 0:
                    self._log_sample()
                # --- a checkpoint: with each estimate, every save_interval, and before stopping
                stop_now = self._stop_requested(stop)
                if evaluate or stop_now or (cfg.save_interval and step % cfg.save_interval == 0):
                    self.save(losses if evaluate else None)
                if stop_now:
                    stopped_by = stop.signal_name or "a signal to another process"
                    break
        wall = time.perf_counter() - start
        result = self._finish(losses, self.step - first_step, train_time, wall, stopped_by)
        if self.masked:
            trained = self.trained_tokens - first_trained
            result.trained_tokens_per_s = trained / max(train_time, 1e-9)
        return result

    def _open_metrics(self) -> MetricsLog:
        """``metrics.jsonl`` in out_dir (on rank 0), cut back to the resumed step."""
        if self.is_main:
            make_folder(self.out_dir, "--out-dir")
        return MetricsLog(
            self.out_dir / METRICS_FILE,
            enabled=self.is_main,
            resume_step=self.step if self.cfg.resume else None,
            tensorboard_dir=self.out_dir / "tensorboard" if self.cfg.tensorboard else None,
        )

    def _finish(
        self,
        losses: dict[str, float],
        steps_run: int,
        train_time: float,
        wall: float,
        stopped_by: str,
    ) -> TrainResult:
        """After the loop: say how to continue a stopped run, plot, draw the final sample."""
        cfg = self.cfg
        if stopped_by and self.is_main:
            log.warning(
                "stopped by %s at step %d; checkpoint %s; continue with --resume auto",
                stopped_by, self.step, self.last_checkpoint,
            )  # fmt: skip
        if self.is_main and cfg.plot:
            self._plot()
        sample = ""
        if cfg.sample_tokens and not stopped_by and self._samples_everywhere():
            sample = self.sample(cfg.sample_tokens)
        distributed.barrier(self.env)
        return TrainResult(
            step=self.step,
            train_loss=losses["train"],
            val_loss=losses["val"],
            ms_per_iter=1e3 * train_time / max(1, steps_run),
            tokens_per_s=self.tokens_per_step * steps_run / max(train_time, 1e-9),
            wall_s=wall,
            checkpoint=self.out_dir / CHECKPOINT_SUBDIR,
            sample=sample if self.is_main else "",
            stopped_by=stopped_by,
        )

    def _log_step(
        self, metrics: MetricsLog, stats: StepStats, dt: float, peak: float | None
    ) -> None:
        """One metrics line. ``tokens_per_s`` counts every token the model read (what MFU is
        made of); on masked data ``trained_tokens`` (so far) and ``trained_tokens_per_s``
        count the scored ones, the assistant's replies."""
        tokens_per_s = self.tokens_per_step / dt
        trained = (
            {"trained_tokens": self.trained_tokens, "trained_tokens_per_s": stats.trained_tokens / dt}
            if stats.trained_tokens is not None
            else {}
        )  # fmt: skip
        metrics.write(
            step=self.step,
            loss=stats.loss,
            lr=stats.lr,
            grad_norm=stats.grad_norm,
            ms_per_iter=dt * 1e3,
            tokens_per_s=tokens_per_s,
            **trained,
            mfu=tokens_per_s * self.flops_per_token / peak if peak else None,
            mem_gb=peak_memory_gb(self.device),
        )

    def _log_eval(
        self,
        metrics: MetricsLog,
        losses: dict[str, float],
        tokens_per_s: float,
        trained_per_s: float = 0.0,
    ) -> None:
        if self.is_main:
            trained = f" ({trained_per_s:.0f} trained on)" if self.masked else ""
            log.info("step %d: train loss %.4f, val loss %.4f, %.0f tokens/s%s",
                     self.step, losses["train"], losses["val"], tokens_per_s, trained)  # fmt: skip
        metrics.write(step=self.step, train_loss=losses["train"], val_loss=losses["val"])

    def _run_eval_task(self, metrics: MetricsLog, evaluated: bool) -> None:
        """--eval-task every eval_every steps (0: with each loss estimate). Every process scores
        (under FSDP each holds a shard of the weights); rank 0 logs."""
        every = self.cfg.eval_every
        if self.eval_task is None or not (self.step % every == 0 if every else evaluated):
            return
        with self._autocast():
            figures = self.eval_task.evaluate(self.model, self.cfg.batch_size)
        name = self.eval_task.name
        if self.is_main:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in figures.items() if isinstance(v, float))
            log.info("step %d: %s %s", self.step, name, shown)
        metrics.write(step=self.step, **{f"eval/{name}/{k}": v for k, v in figures.items()})

    def _log_sample(self) -> None:
        if self._samples_everywhere():
            text = self.sample(self.cfg.sample_tokens or 200)
            if self.is_main:
                log.info("step %d sample:\n%s", self.step, text)

    def _stop_requested(self, stop: StopRequest) -> bool:
        """Whether any process was asked to stop: all of them stop at the same step."""
        if not self.env.enabled:
            return bool(stop.signal_name)
        flag = torch.tensor([1.0 if stop.signal_name else 0.0], device=self.device)
        return bool(distributed.all_reduce(flag, self.env, op="max").item())

    def _plot(self) -> None:
        try:
            from gpt2.plot import plot_run
        except ImportError:
            log.info("matplotlib is not installed: no %s (pip install matplotlib)", PLOT_FILE)
            return
        try:
            plot_run(self.out_dir, self.out_dir / PLOT_FILE)
        except UserError as e:
            log.warning("no plot: %s", e)


def build_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (biases and LayerNorm gains are
    1-D: they set scales and offsets, and decaying them towards zero only hurts).

    The fused kernel (one pass over each tensor for the whole update) where the device has one:
    CUDA, and the CPU since torch 2.4; foreach elsewhere, and for FSDP's sharded parameters.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type in ("cuda", "cpu") and not cfg.fsdp
    kind = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), **kind)
