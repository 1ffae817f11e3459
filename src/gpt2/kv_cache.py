"""The key/value cache: what decoding keeps so that each new token costs one position, not all.

Without a cache, generating token t re-runs the model over all t tokens before it. Keys and values
of a position never change once computed (attention is causal), so they are stored here, one
preallocated tensor pair per layer, and each decode step feeds only the newest token.

Layout: ``k[layer]`` and ``v[layer]`` are (rows, n_head, max_len, head_size). A *row* holds one
sequence. Each row keeps two indices:

- ``start``: the cache index of its first real token. Positions before it are left padding (a
  batch of prompts of different lengths is right-aligned so that all rows decode in step); they are
  masked out of attention and do not count as positions: position id = index - start.
- ``end``: the index where its next token will be written.

Rows need not move together: each one writes at its own ``end``, so sequences that started at
different times (a server's slots) decode in one batch. A forward pass may also use a subset of
rows (`select`), reading and writing only those.

The model sees the cache through three calls, made by `gpt2.model.GPT.forward`:
`begin` (reserve T positions per row, get their position ids), `update` (per layer: store the new
keys/values, get all of the row's keys/values so far) and the mask attributes for attention.
"""

from __future__ import annotations

import copy

import torch

from gpt2.config import GPTConfig


class KVCache:
    """Keys and values of every layer for ``batch`` rows of up to ``max_len`` positions each."""

    def __init__(
        self,
        config: GPTConfig,
        batch: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if batch < 1 or max_len < 1:
            raise ValueError(
                f"a cache needs at least one row and one position, got {batch}x{max_len}"
            )
        shape = (config.n_layer, batch, config.n_head, max_len, config.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = config.block_size
        self.max_len = max_len
        self.start = [0] * batch  # per row: index of the first real token (left padding before)
        self.end = [0] * batch  # per row: index of the next token to write
        self.rows = list(range(batch))  # the rows a forward pass through this object uses
        # Set by `begin` for the forward pass in progress.
        self.attn_mask: torch.Tensor | None = None  # (B, 1, T, L) True where attention may look
        self.is_causal = False  # no mask needed beyond the plain causal one (L == T)
        self._length = 0  # L: keys attended to, indices [0, L)
        # When every row writes at the same index (the usual case), the views of all layers that
        # this pass writes and reads, made once by `begin`: (n_layer, B, nh, T or L, hs) each.
        self._new: tuple[torch.Tensor, torch.Tensor] | None = None  # keys, values to write
        self._all: tuple[torch.Tensor, torch.Tensor] | None = None  # keys, values to read
        self._row_index: torch.Tensor | None = None  # (B, 1) rows, for the general write
        self._write_index: torch.Tensor | None = None  # (B, T) cache index of each new token
        self._read_rows: slice | torch.Tensor | None = None  # the rows read, for the general case

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch: int, max_len: int | None = None) -> KVCache:
        """A cache shaped for ``model`` (a `GPT`), on its device and in its dtype, or in the
        dtype its attention rounds keys and values to (`CausalSelfAttention.kv_dtype`)."""
        p = model.transformer.wte.weight
        dtype = p.dtype if p.dtype.is_floating_point else torch.float32
        kv_dtype = model.transformer.h[0].attn.kv_dtype if len(model.transformer.h) else None
        dtype = kv_dtype or dtype
        return cls(model.config, batch, max_len or model.config.block_size, p.device, dtype)

    @property
    def batch(self) -> int:
        return self.k.size(1)

    @property
    def device(self) -> torch.device:
        return self.k.device

    def select(self, rows: list[int]) -> KVCache:
        """A view of this cache that runs a forward pass on ``rows`` only (storage is shared)."""
        if not rows or any(not 0 <= r < self.batch for r in rows):
            raise ValueError(
                f"rows must be a non-empty list of indices below {self.batch}, got {rows}"
            )
        view = copy.copy(self)  # shares k, v and the start/end lists
        view.rows = list(rows)
        return view

    def length(self, row: int) -> int:
        """Real tokens held by ``row`` (its next position id)."""
        return self.end[row] - self.start[row]

    # The three calls the model makes --------------------------------------------------------

    def begin(self, T: int) -> torch.Tensor:
        """Reserve the next ``T`` positions of every selected row; their position ids (B, T).

        Also prepares what `update` and attention need for this forward pass.
        """
        rows, start, end = self.rows, self.start, self.end
        for r in rows:
            if end[r] + T > self.max_len:
                raise ValueError(
                    f"cache row {r} is full: {end[r]} + {T} > {self.max_len} positions"
                )
            if end[r] - start[r] + T > self.block_size:
                raise ValueError(
                    f"cache row {r} would pass the context: {end[r] - start[r]} + {T} > {self.block_size}"
                )
        dev = self.device
        ends = [end[r] for r in rows]
        starts = [start[r] for r in rows]
        L = max(ends) + T
        self._length = L
        same_end = all(e == ends[0] for e in ends)
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        # Writes (and reads) are plain views when the rows are contiguous and write at one index.
        views = same_end and contiguous
        # One query that sees every key, or a fresh prompt: plain (causal) attention, no mask,
        # and the same positions in every row.
        plain = same_end and all(s == 0 for s in starts) and (T == 1 or ends[0] == 0)
        for r in rows:
            end[r] += T
        if views:
            r0, r1, e = rows[0], rows[-1] + 1, ends[0]
            self._new = (self.k[:, r0:r1, :, e : e + T], self.v[:, r0:r1, :, e : e + T])
            self._all = (self.k[:, r0:r1, :, :L], self.v[:, r0:r1, :, :L])
        else:
            self._new = self._all = None
        # (B, T): cache index of each new token; the usual decode step (views, plain) needs none.
        write = None
        if not (views and plain):
            write = torch.tensor(ends, device=dev)[:, None] + torch.arange(T, device=dev)
        if not views:
            self._row_index = torch.tensor(rows, device=dev)[:, None]  # (B, 1)
            self._write_index = write
            # Reading: a view of contiguous rows, else a gather of the selected ones.
            self._read_rows = slice(rows[0], rows[-1] + 1) if contiguous else self._row_index[:, 0]
        if plain:
            self.attn_mask, self.is_causal = None, T > 1
            return torch.arange(ends[0], ends[0] + T, device=dev).expand(len(rows), T)
        start_t = torch.tensor(starts, device=dev)  # (B,)
        keys = torch.arange(L, device=dev)  # (L,)
        q = write[:, :, None]  # (B, T, 1)
        # A key is visible if it is a real token of the row at or before the query. A padding
        # query may see itself, so that its (ignored) output is finite rather than NaN.
        visible = (keys <= q) & ((keys >= start_t[:, None, None]) | (keys == q))  # (B, T, L)
        self.attn_mask, self.is_causal = visible[:, None], False  # (B, 1, T, L)
        return (write - start_t[:, None]).clamp_(min=0)  # (B, T); padding gets position 0

    def advance(self, rows: list[int]) -> tuple[list[int], list[int], list[int]]:
        """One new position in each of ``rows``, for a caller that writes the cache itself
        (`gpt2.native_step`): each row's position id, the index its token goes to, and the
        first index it attends to."""
        start, end = self.start, self.end
        for r in rows:
            if end[r] + 1 > self.max_len:
                raise ValueError(f"cache row {r} is full: {end[r]} + 1 > {self.max_len} positions")
            if end[r] - start[r] + 1 > self.block_size:
                raise ValueError(f"cache row {r} would pass the context {self.block_size}")
        write = [end[r] for r in rows]
        first = [start[r] for r in rows]
        for r in rows:
            end[r] += 1
        return [w - s for w, s in zip(write, first, strict=True)], write, first

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values (B, nh, T, hs); return all of them (B, nh, L, hs)."""
        if self._new is not None:
            self._new[0][layer].copy_(k)
            self._new[1][layer].copy_(v)
            return self._all[0][layer], self._all[1][layer]
        kb, vb, L = self.k[layer], self.v[layer], self._length  # kb: (rows, nh, max_len, hs)
        rows, write = self._row_index, self._write_index  # (B, 1), (B, T)
        # Advanced indices around a slice put their broadcast shape first: (B, T, nh, hs).
        kb[rows, :, write] = k.transpose(1, 2).to(kb.dtype)
        vb[rows, :, write] = v.transpose(1, 2).to(vb.dtype)
        read = self._read_rows  # a slice (views) or an index tensor (gathered copies)
        return kb[read, :, :L], vb[read, :, :L]

    # Row bookkeeping, for engines -----------------------------------------------------------

    def reset(self, row: int) -> None:
        """Forget ``row``'s tokens (the memory is reused, not cleared)."""
        self.start[row] = self.end[row] = 0

    def copy_row(self, src: int, dst: int) -> None:
        """Make ``dst`` a copy of ``src`` (one prompt prefilled once, sampled several times)."""
        n = self.end[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.start[dst], self.end[dst] = self.start[src], n

    def compact(self, row: int) -> None:
        """Move ``row``'s tokens to the front, dropping its left padding; positions are unchanged
        (they count from ``start``), so attention computes exactly what it did before."""
        s, e = self.start[row], self.end[row]
        if s == 0:
            return
        self.k[:, row, :, : e - s] = self.k[:, row, :, s:e].clone()
        self.v[:, row, :, : e - s] = self.v[:, row, :, s:e].clone()
        self.start[row], self.end[row] = 0, e - s

    def reorder(self, src: list[int]) -> None:
        """Row i becomes a copy of row ``src[i]``, for every row (beam search keeps the cache of
        the beams it continues). Only the filled prefix is copied."""
        if len(src) != self.batch:
            raise ValueError(f"reorder needs one source per row ({self.batch}), got {len(src)}")
        n = max(self.end)
        index = torch.tensor(src, device=self.device)
        self.k[:, :, :, :n] = self.k[:, index, :, :n]
        self.v[:, :, :, :n] = self.v[:, index, :, :n]
        # In place: views made by `select` share these lists.
        self.start[:] = [self.start[s] for s in src]
        self.end[:] = [self.end[s] for s in src]
