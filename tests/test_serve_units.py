"""The server's parts on their own: text assembly, sampling, the batched engine, the scheduler."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

pytest.importorskip("fastapi")

from gpt2.config import GPTConfig  # noqa: E402
from gpt2.model import GPT  # noqa: E402
from gpt2.serve.engine import RecomputeEngine  # noqa: E402
from gpt2.serve.sampling import (  # noqa: E402
    SamplingParams,
    SequenceSampler,
    prompt_logprobs,
    sample,
)
from gpt2.serve.scheduler import Scheduler  # noqa: E402
from gpt2.serve.text import CompletionText  # noqa: E402
from gpt2.tokenizer import CharTokenizer, GPT2Tokenizer  # noqa: E402

CHARS = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,\n")


def feed(text: CompletionText, ids: list[int]) -> tuple[list[str], bool]:
    pieces, stopped = [], False
    for t in ids:
        piece = text.add(t)
        pieces.append(piece.text)
        if piece.stopped:
            return pieces, True
    pieces.append(text.finish().text)
    return pieces, stopped


# --- text ---------------------------------------------------------------------------------


def test_multibyte_characters_are_never_split():
    tok = GPT2Tokenizer()
    s = "naïve café 😀 日本語 ok"
    ids = tok.encode(s)
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # some tokens hold half a character
    pieces, _ = feed(CompletionText(tok, []), ids)
    assert "".join(pieces) == s
    assert not any("\ufffd" in p for p in pieces)


def test_text_that_may_start_a_stop_string_is_held_back_then_released():
    text = CompletionText(CHARS, ["xyz"])
    pieces, stopped = feed(text, CHARS.encode("abc xy"))
    assert pieces == ["a", "b", "c", " ", "", "", "xy"]
    assert not stopped


def test_a_stop_string_cuts_the_text_and_is_not_sent():
    text = CompletionText(CHARS, ["xyz", "q"])
    pieces, stopped = feed(text, CHARS.encode("ab xyz cd"))
    assert stopped
    assert "".join(pieces) == "ab "
    assert text.text == "ab "


def test_the_earliest_stop_string_wins():
    text = CompletionText(CHARS, ["cd", "bcde"])
    pieces, stopped = feed(text, CHARS.encode("abcdef"))
    assert stopped and "".join(pieces) == "ab"


def test_stop_string_split_across_tokens_and_tokens_sent_with_their_text():
    tok = GPT2Tokenizer()
    ids = tok.encode("Hello world, and hello again")
    text = CompletionText(tok, ["d, an"])
    sent_text, sent_tokens = "", []
    for t in ids:
        piece = text.add(t)
        sent_text += piece.text
        sent_tokens += piece.tokens
        if piece.stopped:
            break
    assert sent_text == "Hello worl"
    # every sent token began before the cut; their offsets line up with the text
    assert [t.offset for t in sent_tokens] == [0, 5]
    assert "".join(t.text for t in sent_tokens).startswith(sent_text)


# --- sampling -----------------------------------------------------------------------------


def rows(n: int, **kw) -> list[SequenceSampler]:
    return [SequenceSampler(SamplingParams(**kw)) for _ in range(n)]


def test_temperature_zero_and_top_p_zero_are_greedy():
    logits = torch.randn(4, 50)
    want = logits.argmax(dim=-1).tolist()
    assert [s.token for s in sample(logits, rows(4, temperature=0.0))] == want
    assert [s.token for s in sample(logits, rows(4, temperature=1.5, top_p=0.0))] == want


def test_seeded_rows_repeat_and_differ_by_seed():
    logits = torch.zeros(1, 1000)

    def draw(seed: int) -> list[int]:
        row = SequenceSampler(SamplingParams(seed=seed))
        return [sample(logits, [row])[0].token for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_sampling_follows_the_distribution_and_top_p_cuts_the_tail():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().expand(4000, 3)
    seeded = [SequenceSampler(SamplingParams(seed=i)) for i in range(4000)]
    counts = torch.bincount(torch.tensor([s.token for s in sample(logits, seeded)]), minlength=3)
    assert torch.allclose(counts / 4000, probs, atol=0.03)
    # top_p 0.6: the mass before token 2 is 0.8 >= 0.6, so it goes; 0 and 1 renormalise
    nucleus = [SequenceSampler(SamplingParams(seed=i, top_p=0.6)) for i in range(4000)]
    counts = torch.bincount(torch.tensor([s.token for s in sample(logits, nucleus)]), minlength=3)
    assert counts[2] == 0
    assert abs(counts[0] / 4000 - 0.625) < 0.03


def test_mixed_batch_each_row_uses_its_own_settings():
    logits = torch.tensor([[0.0, 5.0, 1.0]]).expand(3, 3)
    batch = [
        SequenceSampler(SamplingParams(temperature=0.0)),
        SequenceSampler(SamplingParams(temperature=0.0, logit_bias=((1, -100.0),))),
        SequenceSampler(SamplingParams(temperature=0.0, frequency_penalty=2.0)),
    ]
    batch[2].generated = [1, 1, 1]  # 5 - 3 * 2 = -1: token 1 falls below token 2
    assert [s.token for s in sample(logits, batch)] == [1, 2, 2]


def test_presence_penalty_counts_each_seen_token_once():
    logits = torch.tensor([[0.0, 3.0, 2.5]])
    row = SequenceSampler(SamplingParams(temperature=0.0, presence_penalty=1.0))
    row.generated = [1, 1, 1, 1]  # 3 - 1 = 2 < 2.5
    assert sample(logits, [row])[0].token == 2


def test_reported_logprobs_are_the_models_own():
    logits = torch.randn(2, 30)
    batch = rows(2, temperature=0.7, top_p=0.5, logprobs=3)
    picks = sample(logits, batch)
    ref = torch.log_softmax(logits, dim=-1)
    for b, pick in enumerate(picks):
        assert math.isclose(pick.logprob, ref[b, pick.token].item(), abs_tol=1e-5)
        values, ids = ref[b].topk(3)
        assert [i for i, _ in pick.top] == ids.tolist()
        assert [v for _, v in pick.top] == pytest.approx(values.tolist(), abs=1e-5)


def test_prompt_logprobs_score_each_token_from_the_ones_before():
    logits = torch.randn(4, 10)
    ids = [3, 1, 4, 1]
    scores = prompt_logprobs(logits, ids, k=2)
    ref = torch.log_softmax(logits, dim=-1)
    assert scores[0] is None
    for t in range(1, 4):
        assert math.isclose(scores[t].logprob, ref[t - 1, ids[t]].item(), abs_tol=1e-5)
        assert len(scores[t].top) == 2


# --- engine and scheduler ----------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=40)).eval()


def test_right_padded_batch_gives_each_rows_own_logits(model):
    engine = RecomputeEngine(model, slots=3)
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8, 9]]
    for slot, p in enumerate(prompts):
        full = engine.prefill(slot, p, all_positions=True)
        with torch.no_grad():
            ref, _ = model(torch.tensor([p]))
        assert torch.allclose(full, ref[0], atol=1e-5)
    nxt = [10, 11, 12]
    logits = engine.decode([0, 1, 2], nxt)  # (3, V)
    for b, p in enumerate(prompts):
        with torch.no_grad():
            ref, _ = model(torch.tensor([p + [nxt[b]]]))
        assert torch.allclose(logits[b], ref[0, -1], atol=1e-5)


def test_sequences_submitted_together_are_decoded_in_one_batch(model):
    engine = RecomputeEngine(model, slots=8)
    scheduler = Scheduler(engine, max_queue=8)
    params = SamplingParams(max_tokens=10, temperature=0.0)

    async def run() -> list[list[int]]:
        events: asyncio.Queue = asyncio.Queue()
        scheduler.submit(
            [([1, 2], params), ([3], params), ([4, 5, 6], params), ([7], params)], events
        )
        tokens: list[list[int]] = [[], [], [], []]
        ended = 0
        while ended < 4:
            event = await asyncio.wait_for(events.get(), timeout=30)
            tokens[event.index].append(event.token.token)
            ended += event.finish is not None
        return tokens

    try:
        tokens = asyncio.run(run())
    finally:
        scheduler.stop()
    stats = scheduler.stats()
    assert [len(t) for t in tokens] == [10] * 4
    assert stats.largest_batch == 4
    assert stats.decode_steps == 9  # the first token comes from each prefill; 9 shared steps
    # each greedy row equals decoding its prompt alone
    for prompt, got in zip([[1, 2], [3], [4, 5, 6], [7]], tokens, strict=True):
        ids = list(prompt)
        for _ in range(10):
            with torch.no_grad():
                logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
        assert got == ids[len(prompt) :]
