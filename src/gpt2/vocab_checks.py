"""Checks that a tokenizer, a model and token files agree on the vocabulary, each in one line.

Three places trust that they do, and fail far from the cause when they do not: an id past the
embedding crashes training with an IndexError at some step; a tokenizer smaller than the model
samples ids it cannot print; resuming or fine-tuning with another tokenizer scrambles the text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gpt2.config import padded_vocab_size
from gpt2.errors import UserError
from gpt2.tokenizer import Tokenizer

CHUNK = 1 << 24  # ids scanned at a time: the maximum of a memory map, without reading it all in


def check_ids_fit(arrays: Sequence[np.ndarray], vocab_size: int, where: str) -> None:
    """Every id in ``arrays`` is below ``vocab_size``; else name the file and the first bad id.
    Reads each array once, a chunk at a time (about a second per GB on a CPU)."""
    for array in arrays:
        for start in range(0, len(array), CHUNK):
            top = int(np.asarray(array[start : start + CHUNK]).max(initial=0))
            if top >= vocab_size:
                name = getattr(array, "filename", None) or where
                raise UserError(
                    f"{name} holds token id {top}, outside the model's vocabulary of "
                    f"{vocab_size} (prepared with another tokenizer?)"
                )


def check_tokenizer_fits(tokenizer: Tokenizer, vocab_size: int, where: str) -> None:
    """A checkpoint's tokenizer and model belong together: the same number of ids, or the model
    padded past the tokenizer by `gpt2 train --pad-vocab`'s rule (those ids are never sampled).
    A smaller tokenizer would be handed ids it has no text for; a larger one, ids the model
    cannot embed."""
    padded = padded_vocab_size(tokenizer.vocab_size)
    if tokenizer.vocab_size != vocab_size and vocab_size != padded:
        raise UserError(
            f"{where}: its tokenizer has {tokenizer.vocab_size} ids but its model {vocab_size}; "
            "they were not saved together"
        )


def tokenizer_difference(ours: Tokenizer, theirs: Tokenizer) -> str:
    """What differs between two tokenizers, in words (their kinds, sizes or characters)."""
    if ours.kind != theirs.kind:
        return f"a {ours.kind} tokenizer, not {theirs.kind}"
    a, b = ours.to_dict(), theirs.to_dict()
    if ours.vocab_size != theirs.vocab_size:
        return f"{ours.kind} tokenizers of {ours.vocab_size} and {theirs.vocab_size} ids"
    if "chars" in a and "chars" in b:
        only = sorted(set(a["chars"]) ^ set(b["chars"]))
        if only:
            return f"{ours.kind} tokenizers whose characters differ ({''.join(only[:10])!r} ...)"
        return f"{ours.kind} tokenizers with the same characters in another order"
    return f"{ours.kind} tokenizers with different vocabularies"
