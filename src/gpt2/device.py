"""Where a model runs and in what precision: the one policy every command uses (train, sample,
eval, serve)."""

from __future__ import annotations

import logging

import torch

from gpt2.errors import UserError

log = logging.getLogger(__name__)


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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast precision. ``auto`` is bfloat16 only on CUDA GPUs with native support: a
    CPU without it emulates bfloat16 about 100x slower than float32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name == "float16" and device.type != "cuda":
        raise UserError("dtype float16 needs a CUDA GPU; use bfloat16 or float32")
    if name == "bfloat16" and device.type == "cpu":
        log.warning(
            "bfloat16 on the CPU: fast only on CPUs with native bfloat16 (AVX512-BF16, AMX)"
        )
    return getattr(torch, name)
