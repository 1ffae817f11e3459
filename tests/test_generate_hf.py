"""Generation against the reference: the same weights in transformers' GPT2LMHeadModel and ours
give the same greedy tokens and the same beam-search sequences.

The weights are a random transformers model's, copied into ours here (its Conv1D layers store
weights as (in, out): they are transposed into our nn.Linear (out, in)). Weights are drawn at
std 0.3 so that greedy decoding does not collapse into one repeated token.
"""

from __future__ import annotations

import pytest
import torch

from gpt2.config import GPTConfig
from gpt2.generate import SamplingParams, complete, generate
from gpt2.model import GPT

transformers = pytest.importorskip("transformers")

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@torch.no_grad()
def twin_models(
    seed: int, vocab_size: int, n_positions: int = 192, eos: int | None = None, **shape: int
) -> tuple[transformers.GPT2LMHeadModel, GPT]:
    dims = {"n_layer": 2, "n_head": 2, "n_embd": 32, **shape}
    hf_cfg = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, bos_token_id=eos, eos_token_id=eos, **dims
    )
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    for p in hf.parameters():
        p.normal_(0.0, 0.3) if p.dim() == 2 else p.add_(0.1 * torch.randn_like(p))
    ours = GPT(GPTConfig(vocab_size=vocab_size, block_size=n_positions, **dims)).eval()
    state = {k: v.t() if k.endswith(CONV1D) else v for k, v in hf.state_dict().items()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return hf, ours


def hf_generate(
    hf: transformers.GPT2LMHeadModel, prompt: torch.Tensor, **kw: object
) -> torch.Tensor:
    with torch.no_grad():
        return hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), pad_token_id=0, do_sample=False, **kw
        )


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_128_tokens_equal_transformers_generate(seed: int) -> None:
    hf, ours = twin_models(seed, vocab_size=211, n_layer=3, n_head=4, n_embd=64)
    prompt = torch.randint(0, 211, (1, 9), generator=torch.Generator().manual_seed(seed))
    expected = hf_generate(hf, prompt, max_new_tokens=128, min_new_tokens=128)
    assert generate(ours, prompt, 128, temperature=0.0).tolist() == expected.tolist()


def test_left_padded_batch_equals_transformers_generate() -> None:
    hf, ours = twin_models(2, vocab_size=97)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        expected = hf.generate(
            ids, attention_mask=mask, pad_token_id=0, do_sample=False, max_new_tokens=40
        )
    got = complete(ours, prompts, SamplingParams(temperature=0.0, max_new_tokens=40))
    assert [c.tokens for c in got] == expected[:, T:].tolist()


@pytest.mark.parametrize(
    ("seed", "eos", "early_stopping", "length_penalty"),
    [
        (0, 5, False, 1.0),
        (1, 7, False, 1.0),
        (2, 1, True, 1.0),
        (3, 1, False, 0.3),
        (4, 10, False, 2.0),
    ],
)
def test_beam_search_4_beams_equals_transformers(
    seed: int, eos: int, early_stopping: bool, length_penalty: float
) -> None:
    """A small vocabulary and an end-of-text id chosen so that some of the best beams end with it
    and others run to the length limit: the pool, the length penalty and the stopping rules all
    matter."""
    hf, ours = twin_models(seed, vocab_size=12)
    prompt = torch.tensor([[1, 5, 2]])
    n_new = 24
    kw = dict(num_beams=4, num_return_sequences=4, max_new_tokens=n_new)
    kw.update(early_stopping=early_stopping, length_penalty=length_penalty)
    with torch.no_grad():
        expected = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), pad_token_id=eos, eos_token_id=eos,
            do_sample=False, output_scores=True, return_dict_in_generate=True, **kw,
        )  # fmt: skip
    params = SamplingParams(
        num_beams=4, num_return_sequences=4, max_new_tokens=n_new,
        early_stopping=early_stopping, length_penalty=length_penalty,
    )  # fmt: skip
    got = complete(ours, [prompt[0].tolist()], params, eot_token=eos)

    def trim(row: list[int]) -> list[int]:  # transformers pads finished beams with eos
        return row[: row.index(eos) + 1] if eos in row else row

    assert [c.tokens for c in got] == [trim(r[3:]) for r in expected.sequences.tolist()]
    assert any(c.finish_reason == "eot" for c in got)
    torch.testing.assert_close(
        torch.tensor([c.score for c in got]), expected.sequences_scores, atol=1e-4, rtol=1e-4
    )
