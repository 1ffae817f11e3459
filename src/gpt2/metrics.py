"""What a training run reports about itself: the metrics log, FLOPs utilisation (MFU), memory.

MFU is the share of the hardware's peak arithmetic that the model's own FLOPs use: FLOPs per
token (below) times tokens per second, over the peak. The peak comes from a table of data-centre
GPUs (dense tensor-core figures from the vendors' data sheets), or, on the CPU, from a short
probe: the best of a few matrix products in the run's own dtype, timed here and now.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from gpt2.config import GPTConfig
from gpt2.device import cpu_peak_flops
from gpt2.errors import UserError
from gpt2.files import open_log, read_lines, write_line, write_text

# Dense peak TFLOP/s by precision, matched against torch.cuda.get_device_name() (first match wins,
# so the more specific names come first). "float32" is the non-tensor-core figure.
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9},
    "H100 PCIe": {"bfloat16": 756.0, "float16": 756.0, "tf32": 378.0, "float32": 51.2},
    "H100": {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0, "float32": 19.5},
    "L40S": {"bfloat16": 362.1, "float16": 362.1, "tf32": 183.0, "float32": 91.6},
    "L4": {"bfloat16": 121.0, "float16": 121.0, "tf32": 60.0, "float32": 30.3},
    "V100": {"float16": 125.0, "float32": 15.7},
}


def flops_per_token(config: GPTConfig, non_embedding_params: int) -> float:
    """Training FLOPs per token (forward and backward): 6 per weight that multiplies the token,
    plus attention's score and value products, 12 * n_layer * n_embd * block_size (PaLM paper,
    appendix B). The position embedding is a lookup, so it is left out of the weights."""
    return 6 * non_embedding_params + 12 * config.n_layer * config.n_embd * config.block_size


def precision_name(dtype: torch.dtype, tf32: bool) -> str:
    if dtype == torch.float32:
        return "tf32" if tf32 else "float32"
    return str(dtype).removeprefix("torch.")


def gpu_peak_flops(device: torch.device, precision: str) -> float | None:
    """The table's peak for this GPU and precision, in FLOP/s; None for a GPU not in it."""
    name = torch.cuda.get_device_name(device)
    for key, peaks in GPU_PEAK_TFLOPS.items():
        if key in name:
            value = peaks.get(precision, peaks.get("float32"))
            return value * 1e12 if value else None
    return None


def peak_flops(device: torch.device, precision: str, override_tflops: float = 0.0) -> float | None:
    """The peak MFU is measured against: the override, the GPU table, or the CPU probe."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type == "cuda":
        return gpu_peak_flops(device, precision)
    if device.type == "cpu":  # the probe of the dtype the run computes in
        return cpu_peak_flops(torch.bfloat16 if precision == "bfloat16" else torch.float32)
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: GPU memory allocated by torch on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return peak_rss_bytes() / 1e9


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux's VmHWM, where there is one: ``ru_maxrss``
    survives ``exec``, so a child process would report its parent's peak if that was higher."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


class MetricsLog:
    """The run's metrics: one JSON object a line in ``metrics.jsonl``, and TensorBoard scalars
    when asked. Only rank 0 writes (``enabled``).

    On resume from step ``resume_step``, records of later steps (written after that checkpoint
    by the run that stopped) are dropped first, so that each step appears once.
    """

    def __init__(
        self,
        path: Path,
        enabled: bool = True,
        resume_step: int | None = None,
        tensorboard_dir: Path | None = None,
    ) -> None:
        self.file = None
        self.tensorboard = None
        if not enabled:
            return
        if resume_step is not None and path.is_file():
            kept = [line for line in read_lines(path) if _step_of(line) <= resume_step]
            write_text(path, "".join(line + "\n" for line in kept))
            self.file = open_log(path, append=True)
        else:
            self.file = open_log(path)
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.close()
                raise UserError(
                    "TensorBoard logging needs the tensorboard package: pip install tensorboard"
                ) from None
            self.tensorboard = SummaryWriter(str(tensorboard_dir))

    def write(self, **record: Any) -> None:
        if self.file is None:
            return
        # JSON has no NaN: a skipped step's loss is written as null.
        clean = {
            k: (v if not isinstance(v, float) or math.isfinite(v) else None)
            for k, v in record.items()
        }
        write_line(self.file, json.dumps(clean))
        if self.tensorboard is not None:
            for key, value in clean.items():
                if key != "step" and isinstance(value, int | float):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", math.inf))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return math.inf  # a torn last line from a killed run: dropped
