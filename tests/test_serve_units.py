"""The server's worker on its own: sequences submitted together decode in one batch."""

from __future__ import annotations

import asyncio

import pytest
import torch
from cache_free import cache_free_greedy

pytest.importorskip("fastapi")

from gpt2.config import GPTConfig  # noqa: E402
from gpt2.decode import KVCacheEngine  # noqa: E402
from gpt2.detokenize import IncrementalText  # noqa: E402
from gpt2.model import GPT  # noqa: E402
from gpt2.sampling import Sampler, SamplingParams  # noqa: E402
from gpt2.serve.scheduler import Scheduler, Sequence  # noqa: E402
from gpt2.tokenizer import CharTokenizer  # noqa: E402

CHARS = CharTokenizer([chr(ord("0") + i) for i in range(40)])


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=40)).eval()


def test_sequences_submitted_together_are_decoded_in_one_batch(model):
    scheduler = Scheduler(KVCacheEngine(model, slots=8), eot=None, max_queue=8)
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    prompts = [[1, 2], [3], [4, 5, 6], [7]]

    async def run() -> list[list[int]]:
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        scheduler.submit(
            [
                Sequence(i, Sampler(params, p, 0), IncrementalText(CHARS), False, events, loop)
                for i, p in enumerate(prompts)
            ]
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
    for prompt, got in zip(prompts, tokens, strict=True):
        assert got == cache_free_greedy(model, prompt, 10)


class RecordingEngine(KVCacheEngine):
    """A KV-cache engine that records its passes and, during its first prefill, runs
    ``during_first_prefill`` (a request arriving while the worker is busy prefilling)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, int]] = []
        self.during_first_prefill = lambda: None

    def prefill_batch(self, slots, prompts):
        self.calls.append(("prefill", len(prompts)))
        if len(self.calls) == 1:
            self.during_first_prefill()
        return super().prefill_batch(slots, prompts)

    def decode(self, slots, ids):
        self.calls.append(("decode", len(slots)))
        return super().decode(slots, ids)


def test_sequences_arriving_during_a_prefill_join_before_the_next_step(model):
    engine = RecordingEngine(model, slots=8)
    scheduler = Scheduler(engine, eot=None, max_queue=8)
    params = SamplingParams(max_new_tokens=4, temperature=0.0)

    async def run() -> list[list[int]]:
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def seq(i: int, prompt: list[int]) -> Sequence:
            return Sequence(
                i, Sampler(params, prompt, 0), IncrementalText(CHARS), False, events, loop
            )

        engine.during_first_prefill = lambda: scheduler.submit([seq(1, [3, 4]), seq(2, [5])])
        scheduler.submit([seq(0, [1, 2])])
        tokens: list[list[int]] = [[], [], []]
        ended = 0
        while ended < 3:
            event = await asyncio.wait_for(events.get(), timeout=30)
            tokens[event.index].append(event.token.token)
            ended += event.finish is not None
        return tokens

    try:
        tokens = asyncio.run(run())
    finally:
        scheduler.stop()
    # the two late sequences are prefilled before any step, and every step carries all three
    assert engine.calls == [("prefill", 1), ("prefill", 2)] + [("decode", 3)] * 3
    for prompt, got in zip([[1, 2], [3, 4], [5]], tokens, strict=True):
        assert got == cache_free_greedy(model, prompt, 4)
