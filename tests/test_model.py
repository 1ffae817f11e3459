"""The model: exact sizes, causality, initial loss, and that it can learn."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2.config import GPTConfig
from gpt2.errors import UserError
from gpt2.model import GPT

TINY = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)


@pytest.mark.parametrize(
    "name, count",
    [
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_gpt2_parameter_counts_on_meta_device(name: str, count: int) -> None:
    with torch.device("meta"):
        model = GPT(GPTConfig.preset(name))
    assert model.num_parameters() == count
    assert model.transformer.wte.weight.is_meta


def test_head_is_tied_to_token_embedding() -> None:
    model = GPT(TINY)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_residual_projections_use_scaled_init() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=8, n_head=4, n_embd=256))
    expected = 0.02 / math.sqrt(2 * 8)
    assert model.transformer.h[0].attn.c_proj.weight.std().item() == pytest.approx(
        expected, rel=0.05
    )
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_causality_future_tokens_do_not_change_past_logits() -> None:
    model = GPT(TINY).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 12))
    changed = idx.clone()
    t = 6
    changed[:, t + 1] = (changed[:, t + 1] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1], b[:, t + 1])


def test_initial_loss_is_near_uniform() -> None:
    config = GPTConfig(block_size=32, vocab_size=65, n_layer=4, n_head=4, n_embd=128)
    model = GPT(config)
    idx = torch.randint(0, 65, (8, 32))
    _, loss = model(idx, torch.randint(0, 65, (8, 32)))
    assert abs(loss.item() - math.log(65)) < 0.1


def test_overfits_one_batch() -> None:
    model = GPT(TINY)
    x = torch.randint(0, TINY.vocab_size, (4, 16))
    y = torch.randint(0, TINY.vocab_size, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_targets_minus_one_are_ignored() -> None:
    model = GPT(TINY).eval()
    x = torch.randint(0, TINY.vocab_size, (1, 8))
    y = torch.randint(0, TINY.vocab_size, (1, 8))
    masked = y.clone()
    masked[0, 4:] = -1
    logits, loss = model(x, masked)
    expected = torch.nn.functional.cross_entropy(logits[0, :4], y[0, :4])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_sequence_longer_than_context_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than block_size"):
        GPT(TINY)(torch.zeros(1, 17, dtype=torch.long))


def test_crop_block_size_keeps_first_positions() -> None:
    model = GPT(TINY)
    before = model.transformer.wpe.weight[:8].clone()
    model.crop_block_size(8)
    assert model.config.block_size == 8
    assert torch.equal(model.transformer.wpe.weight, before)
    model(torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=30, n_head=4), "divisible by n_head"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        GPTConfig(**kwargs)


def test_unknown_preset_names_known_ones() -> None:
    with pytest.raises(UserError, match="unknown model preset 'gpt3'.*gpt2-medium"):
        GPTConfig.preset("gpt3")


def test_preset_overrides_win() -> None:
    config = GPTConfig.preset("gpt2", n_layer=2, block_size=128)
    assert (config.n_layer, config.block_size, config.n_embd) == (2, 128, 768)
