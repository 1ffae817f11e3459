"""Weights arranged for fast decoding on the CPU: fp32 read in its fastest layout, or int8.

Decoding one sequence multiplies a single row of activations by every weight matrix once per
token: the time is the time to read the weights from memory (about 0.5 GB per token for GPT-2
124M in fp32). Two ways to read them faster, both applied in place to a model used only for
inference (`prepare_for_decoding`):

- ``decode_layout``: every ``nn.Linear`` weight keeps its shape, name and values but is *stored*
  with its longer side contiguous: the wide layers, the tied 50257 x 768 output head included,
  as (in, out) in memory. MKL streams such a weight for one row of input at 20-25 GB/s here,
  against 14-16 GB/s in the (out, in) layout (bench/NOTES.md). The embedding lookup reads the
  head's storage with a stride, one row per token: negligible.
- ``SplitKLinear``: with two or more torch threads, each ``nn.Linear`` multiplies its few rows
  of input by the weight in ``p`` slices of the input side at once (one ``torch.bmm`` of ``p``
  products, then a sum of ``p`` partial rows). MKL runs a one-row product on a single core, and
  one core reads memory at 15-19 GB/s here against 26-28 GB/s for two; the slices let every
  thread stream its own part of the weight.
- ``int8``: each ``nn.Linear`` becomes `Int8Linear`: weights in int8 with one scale per output
  channel (4x fewer bytes than fp32), activations quantized per tensor on the fly (dynamic
  quantization, PyTorch's fbgemm/x86 kernels). The output head gets an int8 copy of the token
  embedding; the embedding itself stays fp32 for the lookup. Quality cost: bench/NOTES.md reports
  perplexity before and after.

A model prepared this way still runs the ordinary forward pass, with or without a KV cache; it is
not meant to be trained further or saved (its dropout modules are gone, see `without_dropout`, and
int8 modules have no ``weight`` parameter).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2.errors import UserError
from gpt2.model import GPT

QUANTIZE_MODES = ("none", "int8")


class SplitKLinear(nn.Module):
    """``y = x W^T + b`` for a few rows of input, the weight read by every thread at once.

    The same ``weight`` and ``bias`` parameters as the ``nn.Linear`` it replaces (so the output
    head stays tied to the embedding, and names are unchanged). For more than ``max_rows`` rows,
    or one thread, it is plain ``F.linear``: a wide product already keeps every core busy; so is
    a pass that records gradients.
    """

    max_rows = 16

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight  # (out, in), stored either way round
        self.register_parameter("bias", linear.bias)  # registered even when None (`forward`)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._key: tuple | None = None  # what `_slice` last sliced for
        self._p, self._ws, self._bias = 1, None, None  # set by `_slice`

    @staticmethod
    def parts(in_features: int, threads: int) -> int:
        """Slices of the input side: the most that torch's threads allow and that divide it."""
        p = min(threads, 16)
        while in_features % p:
            p -= 1
        return p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Called ~50 times a token, so every step here was measured (bench/NOTES.md). The
        # parameters come from `_parameters` itself: `self.weight` goes through
        # Module.__getattr__, a few microseconds a call on a slow CPU.
        params = self._parameters
        weight, bias = params["weight"], params["bias"]
        rows = x.numel() // self.in_features
        threads = torch.get_num_threads()
        # The slices are detached views, so a pass that records gradients takes the plain path.
        if threads == 1 or rows > self.max_rows or torch.is_grad_enabled():
            return F.linear(x, weight, bias)
        key = (threads, weight.data_ptr(), weight._version, None if bias is None else bias._version)
        if key != self._key:
            self._slice(threads, weight, bias, key)
        p = self._p
        if p == 1:
            return F.linear(x, weight, bias)
        # Slice s multiplies x[:, s*k:(s+1)*k] by W^T[s*k:(s+1)*k, :], k = in / p; the bias
        # rides in slice 0's accumulator (baddbmm), so the partial rows only need adding.
        k = self.in_features // p
        # (p, rows, k); one row (decoding one sequence) needs no transpose, one op fewer
        xs = x.reshape(p, 1, k) if rows == 1 else x.reshape(rows, p, k).transpose(0, 1)
        ws = self._ws
        partial = torch.bmm(xs, ws) if bias is None else torch.baddbmm(self._bias, xs, ws)
        y = partial[0] + partial[1]  # (rows, out); adds of rows beat a threaded sum(0)
        for s in range(2, p):
            y += partial[s]
        return y.view(*x.shape[:-1], self.out_features)

    def _slice(
        self, threads: int, weight: torch.Tensor, bias: torch.Tensor | None, key: tuple
    ) -> None:
        """The weight as p views (p, in/p, out), whatever its storage ((out, in) or (in, out)
        memory, see `decode_layout`), and the bias as (p, 1, out) with zeros after slice 0;
        made again only when the thread count or the parameters change."""
        n_in, n_out = self.in_features, self.out_features
        p = self._p = self.parts(n_in, threads)
        self._ws = weight.detach().view(n_out, p, n_in // p).permute(1, 2, 0)
        self._bias = None
        if bias is not None:
            self._bias = torch.zeros(p, 1, n_out, dtype=bias.dtype, device=bias.device)
            self._bias[0, 0] = bias.detach()
        self._key = key

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, split-K"


def replace_modules(
    model: GPT, kind: type[nn.Module], make: Callable[[nn.Module], nn.Module]
) -> GPT:
    """Replace every submodule of type ``kind`` by ``make(it)``, in place (names unchanged)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, kind):
                setattr(module, name, make(child))
    return model


def split_k(model: GPT) -> GPT:
    """Replace every ``nn.Linear`` by `SplitKLinear` over the same parameters, in place."""
    return replace_modules(model, nn.Linear, SplitKLinear)


def decode_layout(model: GPT) -> GPT:
    """Store each linear weight in the layout read fastest for one row of input, in place.

    Values, shapes and names are unchanged; only the strides differ. Measured here
    (bench/NOTES.md): with one thread (plain ``F.linear``), MKL streams a weight fastest when
    its contiguous rows are long: (in, out) storage for the wide layers (c_attn, c_fc, and the
    50257-wide output head, which is tied to the embedding and so changes with it), the usual
    (out, in) for the tall mlp.c_proj. With two or more threads (`SplitKLinear`), every weight
    is stored (in, out), so that each thread's slice of the input side is one contiguous block.
    """
    threads = torch.get_num_threads()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                w = module.weight  # (out, in)
                want_transposed = threads > 1 or w.size(0) > w.size(1)
                is_transposed = w.stride() == (1, w.size(0))
                if want_transposed and not is_transposed:
                    w.data = w.data.t().contiguous().t()  # (out, in) view of (in, out) memory
                elif not want_transposed and is_transposed:
                    w.data = w.data.contiguous()
    return model


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with W in int8 (per output channel) and x quantized on the fly."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        w = weight.detach().float().contiguous()  # (out, in)
        self.in_features, self.out_features = w.size(1), w.size(0)
        # Symmetric per-channel: each output row maps its largest magnitude to 127.
        scale = (w.abs().amax(dim=1) / 127.0).clamp_(min=1e-12)  # (out,)
        zero = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():
            # Quantized tensors are deprecated in favour of torchao, which has no CPU kernel as
            # fast as fbgemm's for this; they still work in the torch this project pins.
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)
        b = None if bias is None else bias.detach().float().contiguous()
        self._packed = torch.ops.quantized.linear_prepack(qweight, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: 7-bit activations, as x86 kernels need to avoid int16 overflow.
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed, True)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: GPT) -> GPT:
    """Replace every ``nn.Linear`` (the output head included) by `Int8Linear`, in place."""
    if next(model.parameters()).device.type != "cpu":
        raise UserError("int8 decoding runs on the CPU only (use --device cpu)")
    return replace_modules(model, nn.Linear, lambda lin: Int8Linear(lin.weight, lin.bias))


def without_dropout(model: GPT) -> GPT:
    """Replace every ``nn.Dropout`` by ``nn.Identity``, in place.

    In eval mode dropout returns its input, but the call still goes through ``F.dropout``'s
    checks, 37 times a GPT-2 decode step: about 0.3 ms of it on a slow CPU (bench/NOTES.md).
    """
    return replace_modules(model, nn.Dropout, lambda _: nn.Identity())


def prepare_for_decoding(model: GPT, quantize: str = "none") -> GPT:
    """The model, in place, in the fastest weight format for decoding on its device."""
    if quantize not in QUANTIZE_MODES:
        raise UserError(
            f"unknown quantization {quantize!r}; choose from {', '.join(QUANTIZE_MODES)}"
        )
    model.eval()
    without_dropout(model)
    if quantize == "int8":
        return quantize_int8(model)
    if next(model.parameters()).device.type == "cpu":
        decode_layout(model)
        split_k(model)
    return model
