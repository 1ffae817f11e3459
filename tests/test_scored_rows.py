"""The training loss skips unscored rows before the output head (`gpt2.model.scored_rows`):
the same loss and gradients as cross-entropy over all logits with ``ignore_index=-1``."""

from __future__ import annotations

import torch

from gpt2.config import GPTConfig
from gpt2.model import GPT, scored_rows

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=300)


def grads(model: GPT) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_and_gradients_equal_the_plain_masked_loss():
    torch.manual_seed(0)
    model = GPT(CONFIG)
    x = torch.randint(0, 300, (3, 16))
    y = torch.randint(0, 300, (3, 16))
    y[torch.rand(3, 16) < 0.7] = -1  # a chat batch: most targets are prompts, not replies
    _, plain = model(x, y)  # every logit, F.cross_entropy(ignore_index=-1)
    plain.backward()
    expected = grads(model)
    model.zero_grad()
    _, fast = model(x, y, return_logits=False)
    fast.backward()
    # float32 sums in another order: a few ulps of the loss, 1e-6 of gradients near 1e-2
    assert torch.allclose(fast, plain, rtol=1e-6, atol=0)
    got = grads(model)
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-6), name


def test_text_passes_whole_and_a_batch_without_replies_counts_zero():
    hidden, targets = torch.randn(5, 4), torch.arange(5)
    h, t = scored_rows(hidden, targets)
    assert h is hidden and t is targets  # every target scored: nothing copied
    model = GPT(CONFIG)
    x = torch.randint(0, 300, (2, 8))
    _, loss = model(x, torch.full((2, 8), -1), return_logits=False)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
