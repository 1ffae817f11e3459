"""The GPT-2 language model, written out in full.

Read top to bottom: attention, the MLP, a block that joins them, then the model.

References:
1) Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2): pre-LayerNorm
   blocks, a final LayerNorm, residual projections initialised with std 0.02 / sqrt(2 * n_layer).
2) OpenAI's TensorFlow release (gpt-2/src/model.py): the tanh approximation of GELU, 4x MLP,
   one fused query/key/value projection, and an output head tied to the token embedding.
3) Vaswani et al. 2017, "Attention Is All You Need": scaled dot-product attention.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2.config import GPTConfig

if TYPE_CHECKING:
    from gpt2.kv_cache import KVCache


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t sees positions 0..t only."""

    # Keys and values rounded to this dtype before attention (None: kept as computed). Set for
    # int8 decoding (`gpt2.decode_layout`): its KV cache holds bf16, as llama.cpp's holds f16,
    # and the whole-sequence pass rounds the same way, so that both compute the same thing.
    kv_dtype: torch.dtype | None = None

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        # One matrix computes queries, keys and values for every head at once, as in GPT-2.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        B, T, C = x.shape  # batch, time (tokens), channels (n_embd)
        hs = C // self.n_head  # head size
        # c_attn's 3C outputs are all queries, then all keys, then all values, each nh heads of
        # hs side by side: one view and one permute give the three as (B, nh, T, hs), no copies.
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, hs).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, nh, T, hs) each
        dtype = q.dtype
        if self.kv_dtype is not None:
            k, v = k.to(self.kv_dtype), v.to(self.kv_dtype)
        if cache is not None:
            # Decoding: the T new positions attend to every earlier key of their row, kept in
            # the cache; the mask also hides a row's left padding.
            k, v = cache.update(layer, k, v)  # (B, nh, L, hs), L >= T
        # On the CPU, attention in bf16 is computed in float32: the kernel's backward is several
        # times slower in bf16, and its forward rounds differently for one query than for many,
        # which the cached decoding path must match.
        work = torch.float32 if dtype == torch.bfloat16 and q.device.type == "cpu" else dtype
        q, k, v = q.to(work), k.to(work), v.to(work)
        if torch.is_autocast_enabled(q.device.type):
            # Autocast would cast q, k and v back down to its own dtype: attention runs in `work`.
            with torch.autocast(q.device.type, enabled=False):
                y = self._attend(q, k, v, cache)
        else:
            y = self._attend(q, k, v, cache)
        y = y.to(dtype)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None
    ) -> torch.Tensor:
        if cache is None:
            # softmax(q k^T / sqrt(hs) + causal mask) v, by PyTorch's fused kernel (flash or
            # memory-efficient where available): the (T, T) score matrix is never stored for backward.
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )  # (B, nh, T, hs)
        # Decoding: the mask hides each row's left padding (and the future, for many queries).
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=cache.attn_mask, is_causal=cache.is_causal
        )  # (B, nh, T, hs)


class MLP(nn.Module):
    """Position-wise feed-forward network: widen 4x, GELU, project back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 was trained with the tanh approximation of GELU; the exact erf form differs by
        # up to 1e-3 per activation, enough to break parity with the released weights.
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """A transformer block, pre-LayerNorm: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """GPT-2: embeddings, a stack of blocks, a final LayerNorm and a tied output head.

    Parameter names follow Hugging Face's ``GPT2LMHeadModel`` (``transformer.h.0.attn.c_attn``...),
    so that checkpoints map one to one; only the Conv1D weights there are stored transposed.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embedding
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017), as GPT-2 does: the output head reuses the token
        # embedding, saving vocab_size * n_embd parameters (38.6M of gpt2's 124M).
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2 paper, section 2.3: "scale the weights of residual layers at initialization by a
        # factor of 1/sqrt(N) where N is the number of residual layers" (two per block).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters counted once each (the tied head is the token embedding).

        With ``non_embedding=True`` the position embedding is left out, the convention of the
        scaling-law papers; the token embedding stays in because the head uses it.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        return_logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits for every position of ``idx`` (B, T), and the mean cross-entropy if
        ``targets`` (B, T) are given; target -1 marks a position that is not scored.

        For decoding (`gpt2.generate`): with a ``cache``, ``idx`` continues each cached row and
        is stored in it (positions count on from the row's length); ``last_only`` computes logits
        for the last position only, (B, 1, V), all that choosing the next token needs.
        """
        B, T = idx.shape
        if cache is None:
            if self.config.block_size < T:
                raise ValueError(
                    f"sequence of {T} tokens is longer than block_size {self.config.block_size}"
                )
            pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        else:
            pos = cache.begin(T)  # (B, T): each row's positions go on from its cached length
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
        x = self.transformer.ln_f(x)
        if targets is not None and not return_logits:
            # Training: the loss (and its gradient) a chunk of rows at a time, never holding
            # the (B, T, vocab_size) logits at once; see `linear_cross_entropy`.
            hidden, scored = scored_rows(x.reshape(-1, x.size(-1)), targets.reshape(-1))
            loss = linear_cross_entropy(hidden, self.lm_head.weight, scored)
            return None, loss
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
            # A batch with no scored target (a window of a chat's prompts only) is 0/0 for
            # the mean: it counts 0 with no gradient, as in `linear_cross_entropy`, not NaN.
            loss = torch.where((targets != -1).any(), loss, loss.new_zeros(()))
        return logits, loss

    def crop_block_size(self, block_size: int) -> None:
        """Shorten the context, keeping the first ``block_size`` position embeddings.

        Used to fine-tune GPT-2 (trained at 1024) with a smaller context on small hardware.
        """
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"block_size must be in 1..{self.config.block_size}, got {block_size}")
        self.config.block_size = block_size
        wpe = self.transformer.wpe
        wpe.weight = nn.Parameter(wpe.weight.data[:block_size].clone())
        wpe.num_embeddings = block_size

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | torch.device = "cpu") -> GPT:
        """GPT-2 weights from a Hugging Face folder or Hub name (``gpt2``, ``gpt2-xl``, ``org/name``),
        or one of our checkpoints; `gpt2.checkpoint.load_model` also returns the tokenizer."""
        from gpt2.hf import from_pretrained  # imported here: gpt2.hf imports this module

        return from_pretrained(name_or_path, device)

    def save_pretrained(
        self, folder: str, tokenizer=None
    ) -> None:  # tokenizer: gpt2.tokenizer.Tokenizer
        """Write this model (and ``tokenizer``, if given) as a Hugging Face GPT-2 folder."""
        from gpt2.hf import save_pretrained

        save_pretrained(self, folder, tokenizer)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, chunk by chunk of rows.

    Each chunk's logits are made, turned into its share of the loss *and of both gradients*
    (softmax minus one-hot, times the weight and the hidden states), and dropped; backward then
    only scales the stored gradients. The same products as the plain path, in the same number,
    but the peak memory holds one chunk of logits instead of the whole (N, vocab) tensor and its
    softmax and gradient: about 600 MB less for GPT-2 124M at 4 x 256 tokens.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):  # (N, C), (V, C), (N,), int
        device = hidden.device.type
        # Under autocast the four products run in its dtype (bfloat16 on a CPU that multiplies
        # it natively); the logits, softmax, loss and both gradients stay in float32.
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        with torch.autocast(device, enabled=False):
            h_all = hidden if compute is None else hidden.to(compute)
            w = weight if compute is None else weight.to(compute)
            return _LinearCrossEntropy._chunks(ctx, hidden, weight, h_all, w, targets, chunk_rows)

    @staticmethod
    def _chunks(ctx, hidden, weight, h_all, w, targets, chunk_rows):
        scored = targets != -1  # (N,)
        n_scored = scored.sum().clamp(min=1).float()
        safe_targets = targets.clamp(min=0).unsqueeze(1)  # (N, 1): -1 gathers row 0, masked below
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        grad_weight = None  # (V, C) in the products' dtype, summed over the chunks
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, t, keep = h_all[rows], safe_targets[rows], scored[rows].float()
            logits = (h @ w.t()).float()  # (n, V)
            lse = torch.logsumexp(logits, dim=1)  # (n,)
            total += ((lse - logits.gather(1, t).squeeze(1)) * keep).sum()
            if want_grad:
                grad = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
                grad.scatter_add_(1, t, -keep.unsqueeze(1))  # minus one-hot where scored
                grad.mul_((keep / n_scored).unsqueeze(1))  # d(mean loss) / d(logits)
                grad = grad.to(w.dtype)
                if w.dtype == hidden.dtype:  # float32: straight into the gradient's memory
                    torch.mm(grad, w, out=grad_hidden[rows])
                else:
                    grad_hidden[rows] = grad @ w
                # Summed by the products themselves (under autocast in its dtype, as autocast's
                # own weight gradient is), then widened once: no passes over a float32 (V, C).
                if grad_weight is None:
                    grad_weight = grad.t() @ h
                else:
                    grad_weight.addmm_(grad.t(), h)
        if want_grad:  # no rows at all (a micro-batch without replies): a zero gradient
            grad_weight = torch.zeros_like(weight) if grad_weight is None else grad_weight
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return (total / n_scored).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None


def scored_rows(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``hidden`` (N, C) and ``targets`` (N,) whose target is scored (not -1).

    On conversations the loss learns the assistant's replies only, a fifth of the tokens or
    less, and the output head is most of a small model's compute (50257 x 128 for a model of
    width 128): giving it the scored rows alone makes a fine-tuning step several times cheaper
    there (bench/NOTES.md), with the same loss and gradients. Text, every target scored, passes as it
    is; so does everything under torch.compile, where a shape that depends on the data would
    split the graph. (Choosing the rows reads the targets: on a GPU, one sync a micro-step.)
    """
    if torch.compiler.is_compiling():
        return hidden, targets
    scored = targets != -1
    if bool(scored.all()):
        return hidden, targets
    return hidden[scored], targets[scored]


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_bytes: int = 1 << 27
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets, ignore_index=-1)`` for ``hidden`` (N, C),
    ``weight`` (V, C) and ``targets`` (N,) or any shape of N elements, holding at most about
    ``chunk_bytes`` of logits at a time (128 MiB: 650 rows of GPT-2's vocabulary)."""
    chunk_rows = max(1, chunk_bytes // (weight.size(0) * hidden.element_size()))
    return _LinearCrossEntropy.apply(hidden, weight, targets.reshape(-1), chunk_rows)
