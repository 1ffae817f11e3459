"""Reading ``torch.save`` files (``optimizer.pt``, ``trainer.pt``, ``pytorch_model.bin``) without
unpickling anything but tensors and plain containers, and failing in one line.

``torch.load(weights_only=True)`` already refuses what is not plain data; what it says then is
the problem: several lines, a warning on the side, and the advice to re-run with
``weights_only=False``, which is the one thing never to do with a file that may be malicious. Here
every failure becomes a `UserError` that names the file and says either that it holds more than
plain tensors (and will not be unpickled) or that it is not a readable torch file at all.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from gpt2.errors import UserError

# "Trying to load unsupported GLOBAL posix.system whose module posix is blocked", or
# "Unsupported global: GLOBAL os.system": the name is worth showing; torch's advice is not.
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_plain(path: str | Path, what: str) -> Any:
    """The tensors and containers in ``path`` (on the CPU); a `UserError` naming ``what`` (e.g.
    "checkpoint out/ckpt has a bad optimizer.pt") otherwise. torch's warnings are silenced."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _GLOBAL.search(str(e))
        inside = f" (it refers to {found.group(1)})" if found else ""
        raise UserError(
            f"{what}: the file is not plain tensors{inside}; it will not be unpickled"
        ) from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, TypeError, AttributeError):
        raise UserError(
            f"{what}: not a readable torch file (truncated, or not written by torch.save)"
        ) from None
