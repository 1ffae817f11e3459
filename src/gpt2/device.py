"""Where a model runs and in what precision: the one policy every command uses (train, sample,
eval, serve).

``--device auto`` picks CUDA, then Apple's MPS, then the CPU. ``--dtype auto``:
- CUDA: bfloat16 where the GPU has it (Ampere and later), else float16 with the gradient scaler.
- CPU: bfloat16 autocast where the CPU multiplies bfloat16 in hardware (``avx512_bf16`` or
  ``amx_bf16`` among its flags) and the model is at least ``BF16_MIN_WIDTH`` wide; float32
  elsewhere. Without those instructions bfloat16 is emulated, about two orders of magnitude
  slower. The width is the narrowest that bench/bench_train.py measured faster in bf16 (figures
  in bench/NOTES.md); narrower products may not pay for autocast's casts. A size rule rather
  than a timed decision: a probe on a busy machine flipped the choice from run to run.
- Anything else (Apple's MPS): float32.

An explicit ``float32``, ``bfloat16`` or ``float16`` is taken as asked (float16 needs CUDA).
"""

from __future__ import annotations

import functools
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2.errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_MIN_WIDTH = 128  # the narrowest n_embd measured to train faster in bf16 autocast on the CPU


@dataclass(frozen=True)
class Precision:
    """A resolved dtype and the one-line reason it was chosen, for the log."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_field(name: str) -> str | None:
    """The first ``name : value`` of /proc/cpuinfo (None where there is none: macOS, Windows)."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name):
            return line.partition(":")[2].strip()
    return None


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo has none)."""
    return frozenset((_cpuinfo_field("flags") or "").split())


def cpu_name() -> str:
    """The CPU's model name, which every benchmark prints beside its figures."""
    return _cpuinfo_field("model name") or platform.processor() or "unknown CPU"


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), so that torch's
    oneDNN kernels run bfloat16 products faster than float32 ones."""
    return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


def matmul_flops(dtype: torch.dtype, m: int, k: int, n: int, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` (m, k) @ (k, n) products in ``dtype`` on the CPU, casts
    from float32 included (autocast pays them too)."""
    g = torch.Generator().manual_seed(0)  # its own generator: the run's numbers stay as they were
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    run = (lambda: a @ b) if dtype == torch.float32 else (lambda: a.to(dtype) @ b.to(dtype))
    run()  # warm-up: thread pool, caches, oneDNN's kernel choice
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


@functools.cache
def cpu_peak_flops(dtype: torch.dtype = torch.float32, size: int = 1024) -> float:
    """This CPU's best square product in ``dtype`` (about 0.1 s), measured once per process.
    On a busy machine it is lower than the hardware can do, which keeps MFU honest."""
    return matmul_flops(dtype, size, size, size, repeats=8)


def choose_cpu(n_embd: int) -> Precision:
    """bfloat16 or float32 on this CPU for a model of width ``n_embd``."""
    if not cpu_has_native_bf16():
        return Precision(torch.float32, "this CPU has no native bf16 (no AVX512-BF16 or AMX)")
    fp32 = cpu_peak_flops(torch.float32) / 1e9
    bf16 = cpu_peak_flops(torch.bfloat16) / 1e9
    peaks = f"{bf16:.0f} vs {fp32:.0f} GFLOP/s"
    if n_embd < BF16_MIN_WIDTH:
        return Precision(
            torch.float32,
            f"this CPU multiplies bf16 natively ({peaks}), but a model of width {n_embd} "
            f"(under {BF16_MIN_WIDTH}) was not measured to train faster in it",
        )
    return Precision(torch.bfloat16, f"this CPU multiplies bf16 natively: {peaks}")


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


def resolve_dtype(name: str, device: torch.device, n_embd: int = 768) -> Precision:
    """The precision for ``--dtype name`` on ``device`` (see the module's docstring)."""
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    if name == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return Precision(torch.bfloat16, "this GPU supports bf16")
            return Precision(torch.float16, "this GPU has no bf16: fp16 with loss scaling")
        if device.type == "cpu":
            return choose_cpu(n_embd)
        return Precision(torch.float32, f"the default on {device.type}")
    if name == "float16" and device.type != "cuda":
        raise UserError("dtype float16 needs a CUDA GPU; use bfloat16 or float32")
    if name == "bfloat16" and device.type == "cpu" and not cpu_has_native_bf16():
        return Precision(torch.bfloat16, "asked for; this CPU has no native bf16, so it is slow")
    return Precision(getattr(torch, name), "asked for")
