"""A decode step of a prepared model in one native call (`gpt2.native`'s ``decode_step``).

`gpt2.decode.KVCacheEngine` uses it for every decode step (one new token per sequence) of a
model that `gpt2.decode_layout.prepare_for_decoding` laid out on the CPU with the native
kernels; prefills still run the model's ``forward``. It computes what ``forward`` computes with
a cache, in the same order and the same roundings (csrc/decode_step.cpp says how), without the
~150 Python-level operations of a step (what they cost: bench/NOTES.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gpt2.kv_cache import KVCache
from gpt2.model import GPT

PER_LAYER = 16  # entries of `flat_weights` per block


def _linear(module: nn.Module) -> list[torch.Tensor | None]:
    """(weight, scale, bias) of a `NativeLinear` (scale None) or an `Int8Linear`."""
    if "qweight" in module._buffers:
        b = module._buffers
        return [b["qweight"], b["scale"], b["bias"]]
    p = module._parameters
    return [p["weight"].detach(), None, None if p["bias"] is None else p["bias"].detach()]


def _norm(module: nn.Module) -> list[torch.Tensor | None]:
    p = module._parameters
    return [None if p[k] is None else p[k].detach() for k in ("weight", "bias")]


def flat_weights(model: GPT) -> list[torch.Tensor | None]:
    """Every tensor the step reads, in csrc/decode_step.cpp's order: per block ln_1, c_attn,
    attn.c_proj, ln_2, c_fc, mlp.c_proj (a LayerNorm as weight, bias; a product as weight,
    scale, bias), then wte, wpe, ln_f, the head."""
    out: list[torch.Tensor | None] = []
    for block in model.transformer.h:
        out += _norm(block.ln_1) + _linear(block.attn.c_attn) + _linear(block.attn.c_proj)
        out += _norm(block.ln_2) + _linear(block.mlp.c_fc) + _linear(block.mlp.c_proj)
    t = model.transformer
    out += [t.wte.weight.detach(), t.wpe.weight.detach()]
    return out + _norm(t.ln_f) + _linear(model.lm_head)


class NativeDecodeStep:
    """``step(cache, rows, ids)``: the next-token logits (B, V), float32, of cache ``rows``
    each continued by one token of ``ids``; the cache is written and advanced."""

    def __init__(self, model: GPT) -> None:
        c = model.config
        eps = model.transformer.ln_f.eps
        self.model = torch.classes.gpt2.DecodeModel(flat_weights(model), c.n_layer, c.n_head, eps)

    @staticmethod
    def supports(cache: KVCache) -> bool:
        return cache.k.dtype in (torch.float32, torch.bfloat16) and cache.k.device.type == "cpu"

    def __call__(self, cache: KVCache, rows: list[int], ids: list[int]) -> torch.Tensor:
        pos, write, start = cache.advance(rows)

        def longs(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long)

        with torch.inference_mode():  # the cache is an inference tensor
            logits = self.model.step(
                longs(ids), longs(pos), longs(rows), longs(write), longs(start), cache.k, cache.v
            )
        return logits.clone()  # an ordinary tensor, which the sampler may change in place
