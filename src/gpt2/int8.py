"""int8 weights for decoding on the CPU: `Int8Linear` replaces each ``nn.Linear``.

The scheme:

- each weight row (one output) is scaled so that its largest magnitude is 127 and rounded:
  int8 values with one float32 scale per row, a quarter of float32's bytes;
- each row of the input is quantized the same way when the product runs (its own scale, so a
  row's result does not depend on the other rows of its batch: decoding one token gives what a
  whole-sequence pass gives for that position);
- the dot products of the two int8 vectors are exact integers, then scaled back to float32.

The native kernel (`gpt2.native`, AVX512-VNNI where the CPU has it) computes it at the memory's
speed; without it, `int8_linear_reference` computes the same numbers with float32 products of
the integer values (exact: each block of at most 1024 products sums below 2**24), slowly. The
two agree to the bit (tests/test_decode_precision.py). The weight is stored as value + 128 in a
uint8, the unsigned operand of the kernel's multiply-add instruction.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gpt2 import native

EXACT_BLOCK = 1024  # 127 * 127 * 1024 < 2**24: a float32 sum of this many products is exact


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x`` (M, K) as integers in -127..127 (float32 values) and its scale (M,):
    x ~ q * scale, q = round-half-even(x * (127 / max|x|)); a zero row gets scale 1."""
    amax = x.abs().amax(dim=1)
    nonzero = amax > 0
    one = torch.ones_like(amax)
    inv = torch.where(nonzero, 127.0 / torch.where(nonzero, amax, one), one)
    q = torch.round(x * inv[:, None])
    scale = torch.where(nonzero, amax / 127.0, one)
    return q, scale


def int8_linear_reference(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """What the native ``linear_int8`` computes, in plain torch: ``x`` (M, K) float32."""
    q, x_scale = quantize_rows(x)
    w = qweight.float() - 128.0  # (N, K), -127..127
    acc = torch.zeros((x.size(0), w.size(0)), dtype=torch.float64)
    for k in range(0, x.size(1), EXACT_BLOCK):
        acc += (q[:, k : k + EXACT_BLOCK] @ w[:, k : k + EXACT_BLOCK].t()).double()
    y = acc.float() * x_scale[:, None] * scale[None, :]
    return y if bias is None else y + bias


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with W in int8 (one scale per output row) and x quantized per row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        w = weight.detach().float()  # (out, in)
        self.out_features, self.in_features = w.shape
        scale = (w.abs().amax(dim=1) / 127.0).clamp_(min=1e-12)  # (out,)
        q = torch.round(w / scale[:, None]).clamp_(-127, 127)
        self.register_buffer("qweight", (q + 128).to(torch.uint8).contiguous())
        self.register_buffer("scale", scale.contiguous())
        b = None if bias is None else bias.detach().float().contiguous()
        self.register_buffer("bias", b)
        self.use_native = native.available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers
        rows = x.reshape(-1, self.in_features).float().contiguous()
        if self.use_native:
            y = torch.ops.gpt2.linear_int8(rows, buffers["qweight"], buffers["scale"], buffers["bias"])  # fmt: skip
        else:
            y = int8_linear_reference(rows, buffers["qweight"], buffers["scale"], buffers["bias"])
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        how = "native" if self.use_native else "reference"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 ({how})"
