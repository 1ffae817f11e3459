"""Checks on a weights file before and after it is read: its header against the config (before
anything is allocated), and its values (finite).

A checkpoint's ``config.json`` decides how much memory the model takes; a crafted one
(``"vocab_size": 1000000000``) would have `GPT(config)` ask for 512 GB before a single weight is
read. The safetensors header lists every tensor's shape in a few kilobytes at the start of the
file, so the config is compared with it first, on a model built on the meta device (no memory).
After loading, weights that are NaN or infinite are refused in one line: sampling from them
fails deep inside ``torch.multinomial``, and a server would answer with garbage.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from gpt2.config import GPTConfig
from gpt2.errors import UserError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


def safetensors_shapes(path: Path, where: str) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, from the header of the safetensors file at ``path``."""
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(where, path, "too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise _corrupt(where, path, f"a header length ({n}) past its end")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(where, path, f"an unreadable header: {e}") from None
    if not isinstance(header, dict):
        raise _corrupt(where, path, "its header is not a JSON object")
    shapes = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _corrupt(where, path, f"no valid shape for {name}")
        shapes[name] = tuple(shape)
    return shapes


def _corrupt(where: str, path: Path, why: str) -> UserError:
    return UserError(f"{where} has corrupt weights ({path.name}): {why}")


def check_header_matches(config: GPTConfig, path: Path, where: str, skip: str = "") -> None:
    """Every tensor a model of shape ``config`` holds is in the header of ``path`` with its
    shape (``skip``: a name stored elsewhere, the tied output head); nothing is allocated."""
    stored = safetensors_shapes(path, where)
    with torch.device("meta"):
        from gpt2.model import GPT

        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items() if k != skip}
    for name, shape in expected.items():
        if name not in stored:
            raise UserError(f"{where} does not match its config: {path.name} lacks {name}")
        if stored[name] != shape:
            raise UserError(
                f"{where} does not match its config: {name} is {list(stored[name])} in "
                f"{path.name}, but the config makes it {list(shape)}"
            )


def check_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse weights that hold NaN or infinity, naming the first such tensor."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(
                f"{where} has non-finite weights (NaN or infinity) in {name}; it cannot be used"
            )
