"""Configuration: the model's shape (`GPTConfig`) and how to train it (`TrainConfig`).

The two are kept apart on purpose: a checkpoint's architecture must not change when a user
changes the learning rate, and a preset such as ``gpt2`` names a shape, never an optimizer.

Every field carries a ``help`` string in its metadata; the command line builds its flags
from these, so a field documented here is documented in ``gpt2 train --help`` too.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2.errors import UserError
from gpt2.files import read_toml

VOCAB_MULTIPLE = 64  # --pad-vocab rounds up to this: tensor cores like multiples of 64

# Sane upper bounds for a model's shape, checked before anything is allocated: a crafted
# config.json ("vocab_size": 1000000000) must be refused, not asked for 512 GB. Each is far
# above what GPT-2 (50257 ids, 48 layers, width 1600, context 1024) or any model this code could
# train needs; the weights file's own header is checked against the config as well.
SHAPE_LIMITS = {
    "block_size": 1 << 20,
    "vocab_size": 1 << 21,
    "n_layer": 1024,
    "n_head": 1024,
    "n_embd": 1 << 16,
}
MAX_PARAMETERS = 1 << 40  # ~1.1e12: the embeddings plus 12 x n_embd^2 per layer


def check_field_types(config: Any, what: str) -> None:
    """Each field of the dataclass ``config`` holds its declared type (a TOML or JSON file may
    give a string where a number belongs) and a float field is finite: NaN passes every range
    check, since each comparison with it is False."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), hints[f.name]
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise UserError(f"{what}: {f.name} must be {_KIND_NAMES[kind]}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise UserError(f"{what}: {f.name} must be a finite number, got {value!r}")


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """The embedding size `gpt2 train --pad-vocab` gives ``vocab_size`` ids (GPT-2's 50257:
    50304); the ids past ``vocab_size`` have no text."""
    return -(-vocab_size // multiple) * multiple


def _help(text: str, **kw: Any) -> Any:
    """A dataclass field whose help text is shown by the command line."""
    return field(metadata={"help": text}, **kw)


@dataclass
class GPTConfig:
    """The shape of a GPT-2 model."""

    block_size: int = _help(
        "context length in tokens (the number of position embeddings)", default=1024
    )
    vocab_size: int = _help(
        "number of token embeddings; GPT-2's is 50257 (50,000 merges + 256 bytes + <|endoftext|>)",
        default=50257,
    )
    n_layer: int = _help("number of transformer blocks", default=12)
    n_head: int = _help("attention heads per block; must divide n_embd", default=12)
    n_embd: int = _help("width of the residual stream", default=768)
    dropout: float = _help(
        "dropout probability (0 for pre-training small models and for GPT-2)", default=0.0
    )
    bias: bool = _help("biases in Linear and LayerNorm layers, as GPT-2 has", default=True)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `UserError` with a message naming the first field that is out of range."""
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"model config: {name} must be a positive integer, got {value!r}")
            if value > SHAPE_LIMITS[name]:
                raise UserError(
                    f"model config: {name} is {value}, over the limit of {SHAPE_LIMITS[name]}"
                )
        check_field_types(self, "model config")
        e, n = self.n_embd, self.n_layer
        estimate = (self.vocab_size + self.block_size) * e + 12 * n * e * e
        if estimate > MAX_PARAMETERS:
            raise UserError(
                f"model config: this shape has about {estimate:.2e} parameters, over the limit "
                f"of {MAX_PARAMETERS:.2e}"
            )
        if self.n_embd % self.n_head != 0:
            raise UserError(
                f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model config: dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_size(self) -> int:
        """Width of one attention head: n_embd / n_head (64 in every GPT-2 size)."""
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named shape, with any field overridden (explicit values win over the preset)."""
        if name not in MODEL_PRESETS:
            known = ", ".join(MODEL_PRESETS)
            raise UserError(f"unknown model preset {name!r}; known presets: {known}")
        values = {**MODEL_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values (a checkpoint's ``config.json`` ``model`` entry)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """The inverse of `to_dict`; an unknown field is a `UserError`, not silently dropped."""
        return cls(**_known_fields(cls, data, "model config"))


# The four OpenAI sizes (Radford et al. 2019, table 2) and small shapes that train on a CPU.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab_size=50257),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50257),
    # nanoGPT's character-level CPU recipe: 4 blocks of width 128, context 64.
    "char-small": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),
    # A few-second model for tests and smoke runs.
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=32),
    # A bigger character model, still quick on a CPU: 6 blocks of width 192, context 256 (about
    # 2.7M parameters besides the embeddings). Not nanoGPT's GPU recipe, which is 6 x 6 x 384.
    "char-medium": dict(n_layer=6, n_head=6, n_embd=192, block_size=256),
}


@dataclass
class TrainConfig:
    """Everything about a training run that is not the model's shape."""

    data: str = _help(
        "prepared data folder (from `gpt2 prepare`); empty: TinyShakespeare, characters", default=""
    )
    out_dir: str = _help(
        "folder for the checkpoint, the metrics log and the samples", default="out/shakespeare-char"
    )
    model: str = _help(
        "model preset (see `gpt2 presets`); vocab size comes from the data", default="char-small"
    )
    init_from: str = _help(
        "start from these weights: a checkpoint folder or a Hugging Face GPT-2 name/folder",
        default="",
    )
    max_iters: int = _help("optimizer steps to run", default=2000)
    batch_size: int = _help("sequences per micro-batch on each process", default=12)
    learning_rate: float = _help("peak learning rate, reached after the warm-up", default=1e-3)
    min_lr: float = _help("learning rate at the end of the cosine decay", default=1e-4)
    warmup_iters: int = _help("steps of linear warm-up from 0 to learning_rate", default=100)
    lr_decay_iters: int = _help(
        "step at which the cosine decay reaches min_lr (0: max_iters)", default=0
    )
    weight_decay: float = _help("AdamW weight decay, applied to 2-D weights only", default=0.1)
    beta1: float = _help("AdamW beta1", default=0.9)
    beta2: float = _help("AdamW beta2 (0.99 suits small batches)", default=0.99)
    grad_clip: float = _help("clip the global gradient norm to this (0 disables)", default=1.0)
    eval_interval: int = _help("estimate train and val loss every this many steps", default=250)
    eval_iters: int = _help("batches per loss estimate (the same batches each time)", default=50)
    log_interval: int = _help("write a metrics line every this many steps", default=10)
    sample_tokens: int = _help("tokens to sample at the end of training (0: none)", default=300)
    seed: int = _help("random seed for initialisation, batch order and dropout", default=1337)
    device: str = _help(
        "auto, cpu, cuda, cuda:N or mps; auto picks CUDA, then MPS, then the CPU", default="auto"
    )
    num_threads: int = _help("CPU threads for torch (0: torch's default)", default=0)
    # Scale, precision and distribution (see docs/training.md).
    total_batch_tokens: int = _help(
        "tokens per optimizer step over all processes; the micro-batches (batch_size x "
        "block_size on each process) are accumulated to reach it (0: one micro-batch each)",
        default=0,
    )
    dtype: str = _help(
        "auto, float32, bfloat16 or float16 (autocast; float16 on CUDA only, with a gradient "
        "scaler); auto is bfloat16 on CUDA GPUs that have it (else float16) and on CPUs that "
        "multiply bf16 natively for a model of width 128 or more, else float32",
        default="auto",
    )
    tf32: bool = _help("let CUDA do float32 matrix products in TF32", default=True)
    compile: bool = _help("torch.compile the model for training and evaluation", default=False)
    pad_vocab: bool = _help(
        "round the vocabulary up to a multiple of 64 for faster matrix products (the extra ids "
        "never occur in the data; a new model only)",
        default=False,
    )
    fsdp: bool = _help(
        "under torchrun, shard weights, gradients and optimizer state with FSDP2 instead of "
        "replicating them with DDP",
        default=False,
    )
    resume: str = _help(
        "auto: continue from the newest valid checkpoint in out_dir (start afresh if none); "
        "or a checkpoint folder to continue from",
        default="",
    )
    save_interval: int = _help(
        "save a checkpoint every this many steps (0: at every evaluation)", default=0
    )
    keep_last: int = _help(
        "checkpoints to keep in out_dir/checkpoints (the best by val loss is kept apart)",
        default=2,
    )
    on_nan: str = _help("a NaN or infinite loss: stop (default) or skip the step", default="stop")
    sample_interval: int = _help(
        "log a sample every this many steps (0: at the end only)", default=0
    )
    tensorboard: bool = _help("also log to TensorBoard in out_dir/tensorboard", default=False)
    plot: bool = _help("draw out_dir/metrics.png at the end (needs matplotlib)", default=True)
    peak_tflops: float = _help(
        "the device's peak TFLOP/s for MFU (0: a table of GPUs, or a CPU probe)", default=0.0
    )
    # A benchmark during training (gpt2.evaluate; see docs/evaluation.md).
    eval_task: str = _help(
        "run this benchmark during training: perplexity, hellaswag or lambada (empty: none)",
        default="",
    )
    eval_every: int = _help(
        "run eval_task every this many steps (0: with every loss estimate)", default=0
    )
    eval_limit: int = _help(
        "use the first N items of eval_task (perplexity: N tokens; 0: all)", default=0
    )
    eval_data: str = _help(
        "a local copy of eval_task's data (empty: its public data set)", default=""
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `UserError` naming the first field that is out of range."""
        check_field_types(self, "train config")
        at_least_one = ("max_iters", "batch_size", "eval_interval", "eval_iters", "log_interval")
        at_least_one += ("keep_last",)
        non_negative = ("warmup_iters", "lr_decay_iters", "sample_tokens", "num_threads")
        non_negative += ("total_batch_tokens", "save_interval", "sample_interval", "peak_tflops")
        non_negative += ("eval_every", "eval_limit", "weight_decay", "grad_clip")
        problems = [
            *(f"{n} must be at least 1, got {getattr(self, n)}"
              for n in at_least_one if getattr(self, n) < 1),
            *(f"{n} must not be negative, got {getattr(self, n)}"
              for n in non_negative if getattr(self, n) < 0),
            *(f"{n} must be in [0, 1), got {getattr(self, n)}"
              for n in ("beta1", "beta2") if not 0 <= getattr(self, n) < 1),
        ]  # fmt: skip
        if self.learning_rate <= 0:
            problems.append(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.min_lr <= self.learning_rate:
            problems.append("min_lr must be between 0 and learning_rate")
        if not self.out_dir.strip():
            problems.append("out_dir must not be empty")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            problems.append(f"unknown device {self.device!r} (auto, cpu, cuda, mps)")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            problems.append(f"unknown dtype {self.dtype!r} (auto, float32, bfloat16, float16)")
        if self.on_nan not in ("stop", "skip"):
            problems.append(f"on_nan must be stop or skip, got {self.on_nan!r}")
        if self.eval_task not in ("", "perplexity", "hellaswag", "lambada"):  # evaluate.TASKS
            problems.append(
                f"unknown eval_task {self.eval_task!r} (perplexity, hellaswag, lambada)"
            )
        if problems:
            raise UserError(f"train config: {problems[0]}")

    @property
    def decay_iters(self) -> int:
        """The step at which the cosine decay reaches ``min_lr`` (``lr_decay_iters``, 0: the end)."""
        return self.lr_decay_iters or self.max_iters

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values (a checkpoint's ``config.json`` ``train`` entry)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The inverse of `to_dict`; an unknown field is a `UserError`, not silently dropped."""
        return cls(**_known_fields(cls, data, "train config"))


def _known_fields(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{what}: unknown field(s) {', '.join(unknown)}")
    return dict(data)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML run file: top-level keys for training, a ``[model]`` table for the shape."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    return read_toml(path)
