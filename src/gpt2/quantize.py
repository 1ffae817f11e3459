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
- ``int8``: each ``nn.Linear`` becomes `Int8Linear`: weights in int8 with one scale per output
  channel (4x fewer bytes than fp32), activations quantized per tensor on the fly (dynamic
  quantization, PyTorch's fbgemm/x86 kernels). The output head gets an int8 copy of the token
  embedding; the embedding itself stays fp32 for the lookup. Quality cost: bench/NOTES.md reports
  perplexity before and after.

A model prepared this way still runs the ordinary forward pass, with or without a KV cache; it is
not meant to be trained further or saved (int8 modules have no ``weight`` parameter).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from gpt2.errors import UserError
from gpt2.model import GPT

QUANTIZE_MODES = ("none", "int8")


def decode_layout(model: GPT) -> GPT:
    """Store each linear weight so that memory runs along its longer side, in place.

    Values, shapes and names are unchanged; only the strides differ. Measured here for one row
    of input (bench/NOTES.md), MKL streams a weight fastest when its contiguous rows are long:
    (in, out) storage for the wide layers (c_attn, c_fc, and the 50257-wide output head, which
    is tied to the embedding and so changes with it), the usual (out, in) for mlp.c_proj.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                w = module.weight  # (out, in)
                want_transposed = w.size(0) > w.size(1)
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
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child.weight, child.bias))
    return model


def prepare_for_decoding(model: GPT, quantize: str = "none") -> GPT:
    """The model, in place, in the fastest weight format for decoding on its device."""
    if quantize not in QUANTIZE_MODES:
        raise UserError(
            f"unknown quantization {quantize!r}; choose from {', '.join(QUANTIZE_MODES)}"
        )
    model.eval()
    if quantize == "int8":
        return quantize_int8(model)
    if next(model.parameters()).device.type == "cpu":
        decode_layout(model)
    return model
