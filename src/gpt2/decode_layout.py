"""The model laid out for fast decoding: its precision (float32, bfloat16, int8) and, on the
CPU, the kernels that read its weights.

Decoding one sequence multiplies a single row of activations by every weight matrix once per
token: the time is the time to read the weights from memory (about 0.5 GB per token for GPT-2
124M in float32, half in bfloat16, a quarter in int8). `prepare_for_decoding` applies, in place,
to a model used only for inference:

- the precision: ``dtype`` casts every parameter (bfloat16's logits stay float32:
  `Float32Head`); ``quantize="int8"`` makes each ``nn.Linear`` an `gpt2.int8.Int8Linear`, the
  output head an int8 copy of the token embedding (the embedding stays float32 for the lookup).
- with the native kernels (`gpt2.native`, compiled on first use where a C++ compiler exists):
  each ``nn.Linear`` becomes a `NativeLinear`, and each decode step runs in one native call
  (`gpt2.native_step`); prefills and evaluations still run ``forward``.
- without them, float32 on the CPU: ``decode_layout`` stores the wide weights (the tied
  50257 x 768 head included) (in, out) in memory, which MKL streams faster for one row of input,
  and `SplitLinear` cuts each product into one contiguous block per thread, since MKL runs a
  one-row product on a single core (figures for both: bench/NOTES.md).

A model prepared this way still runs the ordinary forward pass, with or without a KV cache; it is
not meant to be trained further or saved (its dropout modules are gone, see `without_dropout`, and
int8 modules have no ``weight`` parameter).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2 import native
from gpt2.device import cpu_has_native_bf16
from gpt2.errors import UserError
from gpt2.int8 import Int8Linear
from gpt2.model import GPT
from gpt2.native_step import NativeDecodeStep

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("none", "int8")
DECODE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def decode_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The torch dtype for a name of `DECODE_DTYPES` (or a dtype), refused in one line if it is
    not one of them."""
    if isinstance(dtype, str):
        if dtype not in DECODE_DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DECODE_DTYPES)}")
        return DECODE_DTYPES[dtype]
    if dtype not in DECODE_DTYPES.values():
        raise UserError(f"decoding runs in {' or '.join(DECODE_DTYPES)}, not {dtype}")
    return dtype


class SplitLinear(nn.Module):
    """``y = x W^T + b`` for a few rows of input, the weight read by every thread at once.

    The weight is cut into ``p`` blocks that are each one contiguous stretch of memory, one per
    thread, and the ``p`` products run as one ``torch.bmm``. Which side is cut follows how the
    weight is stored (`decode_layout`):

    - stored (in, out): the input side ("split-K"). Slice s multiplies x[:, s*k:(s+1)*k] by
      rows s*k..(s+1)*k of W^T; the ``p`` partial outputs are added.
    - stored (out, in): the output side ("split-N"). Slice s computes outputs s*n..(s+1)*n from
      the whole of x; the ``p`` pieces lie side by side in memory, already the output.

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
        self._p, self._split_out, self._ws, self._bias = 1, False, None, None  # set by `_slice`

    @staticmethod
    def parts(features: int, threads: int) -> int:
        """Slices of the side that is cut: the most that torch's threads allow and that divide it."""
        p = min(threads, 16)
        while features % p:
            p -= 1
        return p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Called ~50 times a token, so every step here was measured (bench/NOTES.md). The
        # parameters come from `_parameters` itself: `self.weight` goes through
        # Module.__getattr__, a Python function (its cost: bench/NOTES.md).
        params = self._parameters
        weight, bias = params["weight"], params["bias"]
        rows = x.numel() // self.in_features
        threads = torch.get_num_threads()
        # The slices are detached views, so a pass that records gradients takes the plain path.
        if threads == 1 or rows > self.max_rows or torch.is_grad_enabled():
            return F.linear(x, weight, bias)
        try:
            bias_version = None if bias is None else bias._version
            key = (threads, weight.data_ptr(), weight._version, bias_version)
        except RuntimeError:  # parameters made under inference_mode have no version counter
            key = (threads, weight.data_ptr(), -1, -1)
        if key != self._key:
            self._slice(threads, weight, bias, key)
        p, ws, b = self._p, self._ws, self._bias
        if p == 1:
            return F.linear(x, weight, bias)
        if self._split_out:
            n_in = self.in_features
            # (p, rows, in): every slice reads the whole input (expand: no copy)
            xs = x.expand(p, 1, n_in) if rows == 1 else x.reshape(1, rows, n_in).expand(p, -1, -1)
            y = torch.bmm(xs, ws) if b is None else torch.baddbmm(b, xs, ws)  # (p, rows, n)
            if rows > 1:  # one row: (p, 1, n) is already the (1, out) row in memory
                y = y.transpose(0, 1)
            return y.reshape(*x.shape[:-1], self.out_features)
        # The bias rides in slice 0's accumulator (baddbmm), so the partial rows only need adding.
        k = self.in_features // p
        # (p, rows, k); one row (decoding one sequence) needs no transpose, one op fewer
        xs = x.reshape(p, 1, k) if rows == 1 else x.reshape(rows, p, k).transpose(0, 1)
        partial = torch.bmm(xs, ws) if b is None else torch.baddbmm(b, xs, ws)
        y = partial[0] + partial[1]  # (rows, out); adds of rows beat a threaded sum(0)
        for s in range(2, p):
            y += partial[s]
        return y.view(*x.shape[:-1], self.out_features)

    def _slice(
        self, threads: int, weight: torch.Tensor, bias: torch.Tensor | None, key: tuple
    ) -> None:
        """The weight as p views (p, in/p, out) or (p, in, out/p), each one contiguous block of
        its storage, and the bias shaped to match (split-K: (p, 1, out), zeros after slice 0;
        split-N: (p, 1, out/p)); made again only when the thread count or the parameters change.
        A weight stored neither way (a strided view) gets p = 1: plain ``F.linear``."""
        n_in, n_out = self.in_features, self.out_features
        w = weight.detach()
        b = None if bias is None else bias.detach()
        side = self.cut_side(w)
        self._split_out = side == "output"
        if side == "output":  # (out, in) memory
            p = self.parts(n_out, threads)
            self._ws = w.view(p, n_out // p, n_in).transpose(1, 2)
            self._bias = None if b is None else b.view(p, 1, n_out // p)
        elif side == "input":  # (in, out) memory
            p = self.parts(n_in, threads)
            self._ws = w.t().view(p, n_in // p, n_out)
            self._bias = None
            if b is not None:
                self._bias = torch.zeros(p, 1, n_out, dtype=b.dtype, device=b.device)
                self._bias[0, 0] = b
        else:
            p = 1
        self._p = p
        self._key = key

    @staticmethod
    def cut_side(weight: torch.Tensor) -> str | None:
        """The side of an (out, in) weight whose blocks are contiguous in its memory."""
        if weight.is_contiguous():
            return "output"
        return "input" if weight.t().is_contiguous() else None

    def extra_repr(self) -> str:
        side = self.cut_side(self._parameters["weight"])
        how = f"split {side}" if side else "F.linear"
        return f"in_features={self.in_features}, out_features={self.out_features}, {how}"


class Float32Head(nn.Module):
    """The output head of a bfloat16 model, giving float32 logits.

    A bfloat16 product rounds each logit to 8 bits of mantissa (steps of 1/32 at a logit of 5),
    which makes exact ties among the best of 50257 logits common, and greedy decoding then
    depends on the order of a sum. Here each block of ``chunk`` vocabulary rows is cast to
    float32 and multiplied: every logit is a float32 sum of exact products of the bfloat16
    values, never rounded to bfloat16. The block keeps the cast copy small (12 MB at GPT-2's
    width), so the head still reads its bfloat16 weight once. Same (tied) ``weight`` parameter.
    """

    chunk = 4096

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight  # (vocab, n_embd): tied to the embedding
        self.register_parameter("bias", linear.bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = self._parameters
        return float32_logits(x, params["weight"], params["bias"], self.chunk)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float32 logits"


def float32_logits(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk: int = 4096
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` in float32 for a reduced-precision weight, a block of
    ``chunk`` weight rows cast at a time (see `Float32Head`)."""
    x32 = x.float()
    out = x32.new_empty((*x.shape[:-1], weight.size(0)))
    for start in range(0, weight.size(0), chunk):
        rows = slice(start, start + chunk)
        b = None if bias is None else bias[rows].float()
        out[..., rows] = F.linear(x32, weight[rows].float(), b)
    return out


def replace_modules(
    model: GPT, kind: type[nn.Module], make: Callable[[nn.Module], nn.Module]
) -> GPT:
    """Replace every submodule of type ``kind`` by ``make(it)``, in place (names unchanged)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, kind):
                setattr(module, name, make(child))
    return model


def split_across_threads(model: GPT) -> GPT:
    """Replace every ``nn.Linear`` by `SplitLinear` over the same parameters, in place."""
    return replace_modules(model, nn.Linear, SplitLinear)


def decode_layout(model: GPT) -> GPT:
    """Store each linear weight in the layout read fastest for one row of input, in place.

    Values, shapes and names are unchanged; only the strides differ. MKL streams a weight
    fastest when its contiguous rows are long (measured: bench/NOTES.md), so the
    wide layers (c_attn, c_fc, and the 50257-wide output head, which is tied to the embedding
    and so changes with it) are stored (in, out), the square attn.c_proj and the tall
    mlp.c_proj keep the usual (out, in). With two or more threads (`SplitLinear`), either way
    each thread's block of the weight is one contiguous stretch of memory: the wide weights are
    cut along the input side, the others along the output side, which reads the tall mlp.c_proj
    faster than cutting its 3072 inputs.
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


def quantize_int8(model: GPT) -> GPT:
    """Replace every ``nn.Linear`` (the output head included) by `Int8Linear`, in place."""
    if next(model.parameters()).device.type != "cpu":
        raise UserError("int8 decoding runs on the CPU only (use --device cpu)")
    return replace_modules(model, nn.Linear, lambda lin: Int8Linear(lin.weight, lin.bias))


class NativeLinear(nn.Module):
    """``nn.Linear`` for decoding: up to ``max_rows`` rows of input through the native kernel
    (`gpt2.native`), which reads the weight once for all of them at the memory's speed; more
    rows (a prefill, an evaluation) through ``F.linear``, which is faster there.

    ``float_output``: the result is float32 whatever the weight's dtype (the head of a bfloat16
    model; see `Float32Head`). The same ``weight`` and ``bias`` parameters as the ``nn.Linear``
    it replaces, kept (out, in) and contiguous as the kernel reads them.
    """

    max_rows = 16

    def __init__(self, linear: nn.Module, float_output: bool = False) -> None:
        super().__init__()
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.float_output = float_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = self._parameters
        weight, bias = params["weight"], params["bias"]
        rows = x.numel() // self.in_features
        if rows > self.max_rows or torch.is_grad_enabled():
            if self.float_output:
                return float32_logits(x, weight, bias)
            return F.linear(x, weight, bias)
        flat = x.reshape(rows, self.in_features)
        y = torch.ops.gpt2.linear(flat.contiguous(), weight, bias, self.float_output)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        out = ", float32 output" if self.float_output else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, native{out}"


def native_linears(model: GPT, float_head: bool) -> GPT:
    """Replace every ``nn.Linear`` by `NativeLinear`, in place; weights made contiguous."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and not module.weight.is_contiguous():
                module.weight.data = module.weight.data.contiguous()
    head = model.lm_head
    replace_modules(model, nn.Linear, NativeLinear)
    model.lm_head = NativeLinear(head, float_output=float_head)
    return model


def without_dropout(model: GPT) -> GPT:
    """Replace every ``nn.Dropout`` by ``nn.Identity``, in place.

    In eval mode dropout returns its input, but the call still goes through ``F.dropout``'s
    checks, 37 times a GPT-2 decode step (its cost: bench/NOTES.md).
    """
    return replace_modules(model, nn.Dropout, lambda _: nn.Identity())


class DecodeLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` with the same parameters and result, for small decoding inputs.

    Its ``forward`` reads the parameters from ``_parameters`` and calls ``torch.layer_norm``
    directly: for one row of 768 the plain module spends about as long in Python (three
    ``Module.__getattr__`` lookups, ``F.layer_norm``'s checks) as in the kernel, 25 times a
    GPT-2 decode step.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self._parameters
        return torch.layer_norm(x, self.normalized_shape, p["weight"], p["bias"], self.eps)


def lean_layer_norms(model: GPT) -> GPT:
    """Make every ``nn.LayerNorm`` a `DecodeLayerNorm`, in place (same parameters, same names)."""
    for module in model.modules():
        if type(module) is nn.LayerNorm:
            module.__class__ = DecodeLayerNorm
    return model


def pin_submodules(model: GPT) -> GPT:
    """Put each submodule in its parent's instance ``__dict__``, in place.

    ``self.ln_1`` on an ``nn.Module`` fails the ordinary lookup and falls back to
    ``Module.__getattr__``, a Python function searching three dicts, a dozen times per block per
    token (its cost: bench/NOTES.md). With the reference in ``__dict__`` it is a plain attribute
    read. ``Module.__setattr__`` drops the copy when a submodule is replaced, so the two never
    disagree; parameters are left alone (``Module._apply`` may swap them in ``_parameters``).
    """
    for module in model.modules():
        for name, child in module._modules.items():
            if child is not None:
                module.__dict__[name] = child
    return model


def prepare_for_decoding(
    model: GPT, quantize: str = "none", dtype: torch.dtype | str = torch.float32
) -> GPT:
    """The model, in place, in the fastest weight format for decoding on its device.

    ``dtype`` (a torch dtype or its name) casts every parameter, the tied embedding and head
    included, so that activations and the KV cache follow; the engine hands the sampler float32
    logits whatever it is (`gpt2.decode.KVCacheEngine`). int8 keeps float32 activations.
    """
    if quantize not in QUANTIZE_MODES:
        raise UserError(
            f"unknown quantization {quantize!r}; choose from {', '.join(QUANTIZE_MODES)}"
        )
    dtype = decode_dtype(dtype)
    if quantize == "int8" and dtype != torch.float32:
        raise UserError("int8 decoding keeps float32 activations: use it with --dtype float32")
    model.eval()
    device = next(model.parameters()).device
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning("bfloat16 on a CPU without AVX512-BF16 or AMX is emulated: slower than float32")
    if dtype != next(model.parameters()).dtype:
        model.to(dtype)  # in place: the tied head stays the embedding
    without_dropout(model)
    lean_layer_norms(model)
    if quantize == "int8":
        quantize_int8(model)
        for block in model.transformer.h:  # a bf16 KV cache, as llama.cpp's is f16
            block.attn.kv_dtype = torch.bfloat16
    elif device.type == "cpu" and native.available():
        native_linears(model, float_head=dtype != torch.float32)
    if device.type == "cpu" and native.available():
        model.native_step = NativeDecodeStep(model)
    elif dtype != torch.float32:
        model.lm_head = Float32Head(model.lm_head)
    elif device.type == "cpu":
        decode_layout(model)
        split_across_threads(model)
    return pin_submodules(model)  # last: the steps above replace submodules
