"""Training batches that can be resumed exactly and split across ranks.

The training data is a list of token arrays (one per shard, or a single split). A *window* is
``block_size + 1`` consecutive tokens of one array, starting at any offset; windows never cross
from one array into the next, because the arrays are separate documents or shards.

Every window has an id, ``0 .. n_windows - 1``. The run reads windows in one endless sequence:
epoch ``e`` is a pseudo-random permutation of all the ids, keyed by ``(seed, e)``. Element ``k`` of
that sequence is computed directly (a Feistel network; no permutation is ever stored), so

* the loader's whole state is one number, the count of windows already consumed, and resuming
  from a checkpoint reads exactly the windows the uninterrupted run would have read;
* a 10B-token corpus costs no more memory than TinyShakespeare;
* ranks share the sequence without talking: optimizer step ``s`` consumes the next
  ``world_size * accum_steps * batch_size`` windows, and micro-step ``a`` of rank ``r`` takes
  slice ``a * world_size + r`` of them. Two ranks with one micro-step each therefore read the
  same windows as one process with two micro-steps, which makes the two runs comparable.

Conversations (``gpt2 prepare --chat``) come with a mask per array (`gpt2.shards`): a bit for
each token to be learned (an assistant's reply) and a bit on each conversation's first token.
There a window is a *conversation*: row ``i`` starts at its first token, as a conversation does
when the model is asked to reply, and every target that is not a reply of that conversation
is -1, which the loss skips (`gpt2.model.GPT.forward`); the row runs on into the next
conversation (or padding at the end of an array), whose tokens a causal model cannot see from
earlier positions. A conversation longer than the window is learned up to ``block_size`` tokens.
Windows at every offset of the packed stream would start most rows in mid-conversation, at
positions no reply ever starts from, which a small model with learned positions does not carry
over (bench/NOTES.md, "Chat fine-tuning on the CPU"). The ids, the order and the one-number
state work as for text, with one id per conversation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gpt2.errors import UserError
from gpt2.shards import CONVERSATION_START, REPLY

_FEISTEL_ROUNDS = 4
_ID_BLOCK = 4096  # window ids computed per call of `WindowSequence._id_block`


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a fast 64-bit hash in which every input bit affects every output
    bit. ``x`` is a uint64 array; the arithmetic wraps modulo 2**64 as intended."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A pseudo-random bijection of ``0 .. n - 1`` keyed by ``key``, evaluated per element.

    A balanced Feistel network permutes ``0 .. 4**h - 1`` (the smallest such range holding
    ``n``); values that land at or above ``n`` are sent through again ("cycle walking") until they
    fall inside, which keeps the map a bijection of ``0 .. n - 1``. At most three in four values
    need another pass, so the loop ends quickly.
    """

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError("a permutation needs at least one element")
        self.n = n
        self.half_bits = max(1, (int(n - 1).bit_length() + 1) // 2)
        self.half_mask = np.uint64((1 << self.half_bits) - 1)
        with np.errstate(over="ignore"):
            base = _mix64(np.array([key & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
            self.round_keys = list(
                _mix64(base + np.arange(1, _FEISTEL_ROUNDS + 1, dtype=np.uint64))
            )

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        bits = np.uint64(self.half_bits)
        left, right = x >> bits, x & self.half_mask
        for k in self.round_keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.half_mask)
        return (left << bits) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        """The images of ``index`` (int64 array of values in ``0 .. n - 1``)."""
        with np.errstate(over="ignore"):
            x = self._feistel(index.astype(np.uint64))
            outside = x >= self.n
            while outside.any():
                x[outside] = self._feistel(x[outside])
                outside = x >= self.n
        return x.astype(np.int64)


class WindowSequence:
    """The endless, epoch-by-epoch shuffled sequence of windows over a list of token arrays."""

    def __init__(
        self,
        arrays: Sequence[np.ndarray],
        block_size: int,
        seed: int,
        name: str = "the data",
        masks: Sequence[np.ndarray] | None = None,
    ) -> None:
        self.arrays = list(arrays)
        self.masks = list(masks) if masks is not None else None
        if self.masks is not None and [len(m) for m in self.masks] != [len(a) for a in arrays]:
            raise ValueError("one mask per array, as long as it")
        self.block_size = block_size
        self.seed = seed
        # Conversations: the offsets where windows begin and where each one's conversation ends.
        self.starts: list[np.ndarray] | None = None
        self.ends: list[np.ndarray] | None = None
        if self.masks is not None:
            self.starts = [np.flatnonzero(m & CONVERSATION_START) for m in self.masks]
            self.ends = [
                np.append(st[1:], len(a)) for st, a in zip(self.starts, self.arrays, strict=True)
            ]
            counts = np.array([len(st) for st in self.starts], dtype=np.int64)
        else:  # array i holds len - block_size windows (each needs block_size + 1 tokens)
            counts = np.array([max(0, len(a) - block_size) for a in self.arrays], dtype=np.int64)
        self.n_windows = int(counts.sum())
        if self.starts is not None and self.n_windows == 0:
            raise UserError(
                f"{name} marks no conversation starts (a folder from an earlier version of "
                "`gpt2 prepare --chat`, or no conversations): prepare the conversations again"
            )
        if self.n_windows == 0:
            longest = max((len(a) for a in self.arrays), default=0)
            raise UserError(
                f"{name} has fewer than one window of block_size + 1 = {block_size + 1} tokens "
                f"(its longest piece has {longest}); use more text or a smaller block_size"
            )
        self.first_id = np.concatenate(([0], np.cumsum(counts)))  # window ids of array i start here
        self._cached_block: tuple[int, np.ndarray] | None = None

    def window_ids(self, first: int, count: int) -> np.ndarray:
        """The ids of elements ``first .. first + count - 1`` of the sequence."""
        blocks = range(first // _ID_BLOCK, (first + count - 1) // _ID_BLOCK + 1)
        ids = np.concatenate([self._id_block(b) for b in blocks])
        start = first - blocks[0] * _ID_BLOCK
        return ids[start : start + count]

    def _id_block(self, block: int) -> np.ndarray:
        """Ids of positions ``block * _ID_BLOCK ..``, computed a block at a time (and the last
        block kept) because numpy's cost per call, not per element, dominates small batches."""
        if self._cached_block is None or self._cached_block[0] != block:
            positions = np.arange(block * _ID_BLOCK, (block + 1) * _ID_BLOCK, dtype=np.int64)
            epochs = positions // self.n_windows
            ids = np.empty(_ID_BLOCK, dtype=np.int64)
            for epoch in np.unique(epochs):
                inside = epochs == epoch
                perm = Permutation(self.n_windows, self._epoch_key(int(epoch)))
                ids[inside] = perm(positions[inside] % self.n_windows)
            self._cached_block = (block, ids)
        return self._cached_block[1]

    def _epoch_key(self, epoch: int) -> int:
        return (self.seed * 1_000_003 + epoch) & 0xFFFFFFFFFFFFFFFF

    def gather(self, ids: np.ndarray) -> torch.Tensor:
        """The windows with these ids, as an int64 tensor (len(ids), block_size + 1)."""
        return torch.from_numpy(self._gather(self.arrays, ids, np.int64))

    def gather_mask(self, ids: np.ndarray) -> torch.Tensor:
        """Which tokens of the windows with these ids are learned, as a bool tensor
        (len(ids), block_size + 1): a reply of the window's own conversation; all True for data
        without masks."""
        if self.masks is None:
            return torch.ones((len(ids), self.block_size + 1), dtype=torch.bool)
        return torch.from_numpy(self._gather(self.masks, ids, np.uint8, own_only=True) == 1)

    def _gather(
        self, arrays: list[np.ndarray], ids: np.ndarray, dtype: Any, own_only: bool = False
    ) -> np.ndarray:
        """The windows with these ids, read from ``arrays`` (the tokens, or the masks); with
        ``own_only``, the reply bit alone and only within each window's own conversation."""
        which = np.searchsorted(self.first_id, ids, side="right") - 1
        index = ids - self.first_id[which]  # the window's number within its array
        out = np.zeros((len(ids), self.block_size + 1), dtype=dtype)
        span = np.arange(self.block_size + 1, dtype=np.int64)
        for a in np.unique(which):  # one fancy-indexing read per array involved
            rows = which == a
            if self.starts is None or self.ends is None:
                out[rows] = arrays[a][index[rows, None] + span]
                continue
            pos = self.starts[a][index[rows], None] + span
            inside = pos < len(arrays[a])  # past the array's end: padding (0)
            got = np.where(inside, arrays[a][np.minimum(pos, len(arrays[a]) - 1)], 0)
            if own_only:
                got = np.where(pos < self.ends[a][index[rows], None], got & REPLY, 0)
            out[rows] = got
        return out

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (count, block_size), of elements ``first ..``;
        a target the mask leaves out is -1."""
        ids = self.window_ids(first, count)
        windows = self.gather(ids)  # (count, block_size + 1)
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        if self.masks is not None:  # not in place: a one-row slice shares x's memory
            y = y.masked_fill(~self.gather_mask(ids)[:, 1:], -1)
        return x, y


@dataclass(frozen=True)
class Layout:
    """How one optimizer step's windows are split: micro-batch size, micro-steps, ranks."""

    batch_size: int
    accum_steps: int = 1
    rank: int = 0
    world_size: int = 1

    @property
    def windows_per_step(self) -> int:
        return self.batch_size * self.accum_steps * self.world_size

    def first_window(self, step_start: int, micro_step: int) -> int:
        """Where this rank's ``micro_step`` begins, given where the step's windows begin."""
        return step_start + (micro_step * self.world_size + self.rank) * self.batch_size


class TrainBatches:
    """This rank's micro-batches, step after step, with a position that can be saved and restored.

    ``position`` counts the windows consumed by every rank together, so it is the same number on
    every rank and does not depend on how a step is split into ranks and micro-steps.
    """

    def __init__(self, sequence: WindowSequence, layout: Layout) -> None:
        self.sequence = sequence
        self.layout = layout
        self.position = 0

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's ``accum_steps`` micro-batches for the next optimizer step."""
        start, lay = self.position, self.layout
        micro = [
            self.sequence.batch(lay.first_window(start, a), lay.batch_size)
            for a in range(lay.accum_steps)
        ]
        self.position += lay.windows_per_step
        return micro

    def state_dict(self) -> dict[str, Any]:
        seq = self.sequence
        return {
            "position": self.position,
            "seed": seq.seed,
            "n_windows": seq.n_windows,
            "block_size": seq.block_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        """Restore the position; return what differs from the saved data (empty: nothing), so
        the caller can warn that the batches will not be those of the original run."""
        seq = self.sequence
        now = {"seed": seq.seed, "n_windows": seq.n_windows, "block_size": seq.block_size}
        changed = [f"{k} {state.get(k)} -> {v}" for k, v in now.items() if state.get(k) != v]
        self.position = int(state["position"])
        return changed


def fixed_batches(
    sequence: WindowSequence, batch_size: int, n_batches: int, rank: int = 0, world_size: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n_batches`` batches of ``sequence`` that belong to this rank (batch ``i`` goes
    to rank ``i % world_size``): the same text at every evaluation, split across ranks."""
    return [sequence.batch(i * batch_size, batch_size) for i in range(rank, n_batches, world_size)]


def grouped(
    batches: list[tuple[torch.Tensor, torch.Tensor]], per_group: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` concatenated ``per_group`` at a time, for evaluation: fewer forwards of a small
    model (less per-call overhead, fewer waits at thread barriers), the same mean loss per target."""
    if per_group <= 1:
        return batches
    return [
        (torch.cat([x for x, _ in batches[i : i + per_group]]),
         torch.cat([y for _, y in batches[i : i + per_group]]))
        for i in range(0, len(batches), per_group)
    ]  # fmt: skip
