"""Command-line flags generated from the config dataclasses, so each field is one flag whose
help is the field's docstring, and a flag given on the command line wins over a config file; and
the typed values every flag parses into, so that a value out of its range (0 where at least one is
needed, a negative count, NaN or infinity, an empty name) is one line from argparse before any
work starts, with the flag's name: ``--workers: must be at least 1, got '0'``.

Every ``type=float`` flag is finite without asking (`finite_float`, registered for ``float`` by
the command line's parser); ranges are named here, one function each, and given as ``type=``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from gpt2.model import GPT
    from gpt2.tokenizer import Tokenizer

Invalid = argparse.ArgumentTypeError


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise Invalid(f"must be an integer, got {text!r}") from None


def finite_float(text: str) -> float:
    """A number that is not NaN or infinite (``float("nan")`` parses, and then every
    comparison a range check makes is False)."""
    try:
        value = float(text)
    except ValueError:
        raise Invalid(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise Invalid(f"must be a finite number, got {text!r}")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer of at least ``low``."""

    def parse(text: str) -> int:
        value = _int(text)
        if value < low:
            raise Invalid(f"must be at least {low}, got {text!r}")
        return value

    parse.__name__ = f"int_at_least_{low}"
    return parse


positive_int = int_at_least(1)


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An integer in ``low..high``."""

    def parse(text: str) -> int:
        value = _int(text)
        if not low <= value <= high:
            raise Invalid(f"must be in {low}..{high}, got {text!r}")
        return value

    return parse


def float_in(
    low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """A finite number between ``low`` and ``high``, each end included unless said open."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    shown = f"{left}{low:g}, {high:g}{right}" if math.isfinite(high) else None

    def parse(text: str) -> float:
        value = finite_float(text)
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if below or above:
            what = f"in {shown}" if shown else ("above" if low_open else "at least") + f" {low:g}"
            raise Invalid(f"must be {what}, got {text!r}")
        return value

    return parse


def non_empty(text: str) -> str:
    """A string with something in it besides white space."""
    if not text.strip():
        raise Invalid("must not be empty")
    return text


FLAG_DEST_PREFIX = "cfg__"


def add_dataclass_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str,
    exclude: tuple[str, ...] = (),
    shown_defaults: dict[str, str] | None = None,
) -> None:
    """One ``--field-name`` flag per field of ``cls``, defaulting to None ("not given").

    ``shown_defaults`` replaces the help's "(default: ...)" for fields whose value, when the flag
    is not given, comes from elsewhere than the dataclass (a model preset's shape)."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        kind = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = (shown_defaults or {}).get(f.name, repr(default))
        help_text = f"{f.metadata.get('help', '')} (default: {shown})"
        dest = f"{FLAG_DEST_PREFIX}{cls.__name__}__{f.name}"
        if kind is bool:
            group.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            group.add_argument(
                flag, dest=dest, type=kind, default=None, help=help_text, metavar=f.name.upper()
            )


def given_flags(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` that were set on the command line."""
    prefix = f"{FLAG_DEST_PREFIX}{cls.__name__}__"
    return {
        key[len(prefix) :]: value
        for key, value in vars(args).items()
        if key.startswith(prefix) and value is not None
    }


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint`` and where and how the model runs (``--device``, ``--dtype``,
    ``--quantize``): one definition for ``gpt2 sample``, ``chat``, ``eval`` and ``serve``, which
    all load it by `load_for_inference`."""
    from gpt2.decode_layout import DECODE_DTYPES, QUANTIZE_MODES  # torch loads here, not before

    parser.add_argument(
        "--checkpoint", required=True, type=non_empty,
        help="checkpoint folder (or the run folder holding ckpt/), a Hugging Face GPT-2 folder, "
        "or a Hub name",
    )  # fmt: skip
    speed = parser.add_argument_group("speed")
    speed.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    speed.add_argument(
        "--dtype", choices=tuple(DECODE_DTYPES), default="float32",
        help="precision of the weights and activations: bfloat16 halves the bytes a token reads "
        "(fast on CPUs with AVX512-BF16 or AMX, and on GPUs), at a small cost in quality; the "
        "logits are float32 either way (default: float32)",
    )  # fmt: skip
    speed.add_argument(
        "--quantize", choices=QUANTIZE_MODES, default="none",
        help="int8: int8 weights for faster CPU decoding, at a small cost in quality (default: none)",
    )  # fmt: skip


def load_for_inference(args: argparse.Namespace) -> tuple[GPT, Tokenizer, torch.device]:
    """The model of `add_model_options`' flags, laid out for decoding
    (`gpt2.decode_layout.prepare_for_decoding`), its tokenizer and its device."""
    from gpt2.checkpoint import load_model
    from gpt2.decode_layout import prepare_for_decoding
    from gpt2.device import resolve_device

    device = resolve_device(args.device)
    model, tokenizer = load_model(args.checkpoint, device)
    return prepare_for_decoding(model, args.quantize, args.dtype), tokenizer, device
