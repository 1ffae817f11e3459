"""Generation: the KV cache is exact, every decoding rule does what it says, batches and the
sliding window equal their one-at-a-time, cache-free definitions, and bad input is refused.

Models are tiny, with weights drawn at std 0.3 instead of GPT-2's 0.02: at 0.02 a random model's
greedy output collapses to one repeated token within a few steps, which would make "the same
tokens" a weak check.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from cache_free import cache_free_greedy

from gpt2 import native
from gpt2.beam_search import beam_search
from gpt2.config import GPTConfig
from gpt2.decode_layout import DecodeLayerNorm, SplitLinear, pin_submodules, prepare_for_decoding
from gpt2.detokenize import IncrementalText
from gpt2.errors import UserError
from gpt2.generate import KVCacheEngine, SamplingParams, complete, generate, stream
from gpt2.kv_cache import KVCache
from gpt2.model import GPT
from gpt2.sampling import Sampled, Sampler, kept_probs, prompt_logprobs, sample
from gpt2.tokenizer import CharTokenizer, GPT2Tokenizer


def tiny_model(seed: int = 0, std: float = 0.3, **shape: int | bool) -> GPT:
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=300, vocab_size=64)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**cfg, **shape})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
    return model


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=40)

# Exactness -------------------------------------------------------------------------------------

SHAPES = [
    dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64),
    dict(n_layer=3, n_head=4, n_embd=48, vocab_size=97, bias=False),
    dict(n_layer=1, n_head=1, n_embd=16, vocab_size=50),
]


@pytest.mark.parametrize(("shape", "seed"), [(s, seed) for s in SHAPES for seed in (0, 1)])
def test_cached_greedy_equals_cache_free_for_256_tokens(shape: dict, seed: int) -> None:
    model = tiny_model(seed, block_size=300, **shape)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, shape["vocab_size"], (1, 1 + 7 * seed), generator=g)
    out = generate(model, prompt, 256, temperature=0.0)
    expected = cache_free_greedy(model, prompt[0].tolist(), 256)
    assert out[0, prompt.size(1) :].tolist() == expected


def test_cache_logits_match_the_full_forward_pass() -> None:
    model = tiny_model(3)
    tokens = torch.randint(0, 64, (1, 40))
    full, _ = model(tokens)  # (1, 40, V)
    engine = KVCacheEngine(model, slots=1)
    got = [engine.prefill(0, tokens[0, :25].tolist(), all_positions=True)]
    got += [engine.decode([0], [t]) for t in tokens[0, 25:].tolist()]
    torch.testing.assert_close(torch.cat(got)[:-1], full[0, :-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[-1][0], full[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [[0, 1], [1, 0]])  # views of the cache; indexed writes
def test_a_cache_continued_several_tokens_at_a_time_matches_the_full_pass(rows) -> None:
    model = tiny_model(3)
    tokens = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(3))
    full, _ = model(tokens)
    cache = KVCache.for_model(model, batch=2).select(rows)
    with torch.no_grad():  # a fresh prompt, one token, then 17 more on top of the 13 cached
        parts = [model(tokens[rows, a:b], cache=cache)[0] for a, b in ((0, 12), (12, 13), (13, 30))]
    got = torch.cat(parts, dim=1)[rows]  # back in row order (the permutation is its own inverse)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


def test_training_forward_is_unchanged_by_a_cache_argument_of_none() -> None:
    model = tiny_model(4)
    idx = torch.randint(0, 64, (2, 20))
    a, loss_a = model(idx, targets=idx)
    b, loss_b = model(idx, targets=idx, cache=None)
    assert torch.equal(a, b) and torch.equal(loss_a, loss_b)


# Batches and slots ------------------------------------------------------------------------------


def test_batched_prompts_of_different_lengths_equal_each_alone() -> None:
    model = tiny_model(5)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (3, 17, 9, 1)]
    batch = complete(model, prompts, GREEDY)
    for i, prompt in enumerate(prompts):
        alone = complete(model, [prompt], GREEDY)[0]
        assert batch[i].prompt_index == i
        assert batch[i].tokens == alone.tokens == cache_free_greedy(model, prompt, 40)


def test_batched_sampling_equals_each_prompt_sampled_alone() -> None:
    model = tiny_model(6)
    params = SamplingParams(max_new_tokens=30, temperature=1.0, top_k=20, seed=11)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    batch = complete(model, prompts, params)
    for i, prompt in enumerate(prompts):
        assert batch[i].tokens == complete(model, [prompt], params)[0].tokens


def test_slots_started_at_different_times_decode_together_exactly() -> None:
    """A server's pattern: a request joins while another is half done; one batched step each."""
    model = tiny_model(7)
    engine = KVCacheEngine(model, slots=3)
    a, b = [1, 2, 3, 4, 5, 6, 7, 8], [9, 10]
    next_a = int(engine.prefill(2, a)[-1].argmax())
    seq_a = [next_a]
    for _ in range(5):  # slot 2 runs alone for a while
        seq_a.append(int(engine.decode([2], [seq_a[-1]])[0].argmax()))
    seq_b = [int(engine.prefill(0, b)[-1].argmax())]
    for _ in range(20):
        logits = engine.decode([0, 2], [seq_b[-1], seq_a[-1]])
        seq_b.append(int(logits[0].argmax()))
        seq_a.append(int(logits[1].argmax()))
    assert seq_a == cache_free_greedy(model, a, len(seq_a))
    assert seq_b == cache_free_greedy(model, b, len(seq_b))


def test_engine_logits_are_ordinary_tensors_a_caller_may_change() -> None:
    """The engine runs the model in inference mode; what it returns must still take in-place
    changes outside it (the server's logit bias and penalties do that)."""
    model = tiny_model(3)
    engine = KVCacheEngine(model, slots=2)
    first = engine.prefill(0, [1, 2, 3])
    engine.copy_slot(0, 1)
    step = engine.decode([0, 1], [4, 4])
    for logits in (first, step):
        assert not logits.is_inference()
        logits[..., 0] -= 1.0  # raises for an inference tensor
    assert torch.equal(step[0], step[1])  # the copied slot continues exactly as its source
    engine.release(1)
    assert not any(p.is_inference() for p in model.parameters())


def test_num_return_sequences_are_the_seeds_in_turn() -> None:
    model = tiny_model(8)
    params = SamplingParams(max_new_tokens=25, seed=100, num_return_sequences=3)
    out = complete(model, [[5, 6]], params)
    assert [c.prompt_index for c in out] == [0, 0, 0]
    assert len({tuple(c.tokens) for c in out}) == 3  # three different samples
    for i, c in enumerate(out):
        alone = SamplingParams(max_new_tokens=25, seed=100 + i)
        assert c.tokens == complete(model, [[5, 6]], alone)[0].tokens


# The context window -----------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [None, 5, 31])
def test_past_the_context_the_window_slides_and_the_cache_is_rebuilt(keep: int | None) -> None:
    model = tiny_model(9, block_size=32)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    params = SamplingParams(temperature=0.0, max_new_tokens=100)
    out = complete(model, [prompt], params, window_keep=keep)[0]
    assert out.tokens == cache_free_greedy(model, prompt, 100, keep)


def test_batched_rows_slide_like_each_alone() -> None:
    model = tiny_model(10, block_size=24)
    prompts = [[1] * 20, [2, 3]]
    params = SamplingParams(temperature=0.0, max_new_tokens=60)
    batch = complete(model, prompts, params)
    for i, p in enumerate(prompts):
        assert batch[i].tokens == cache_free_greedy(model, p, 60)


# Decoding rules ---------------------------------------------------------------------------------


def test_seed_makes_sampling_repeat_and_different_seeds_differ() -> None:
    model = tiny_model(11)
    a = complete(model, [[1]], SamplingParams(max_new_tokens=30, seed=1))[0].tokens
    b = complete(model, [[1]], SamplingParams(max_new_tokens=30, seed=1))[0].tokens
    c = complete(model, [[1]], SamplingParams(max_new_tokens=30, seed=2))[0].tokens
    assert a == b != c


def test_narrowest_settings_reduce_sampling_to_greedy() -> None:
    model = tiny_model(12)
    greedy = complete(model, [[7, 8]], GREEDY)[0].tokens
    for narrow in (dict(top_k=1), dict(top_p=1e-9), dict(min_p=1.0)):
        params = SamplingParams(max_new_tokens=40, temperature=1.5, seed=3, **narrow)
        assert complete(model, [[7, 8]], params)[0].tokens == greedy, narrow


def test_top_k_top_p_min_p_keep_exactly_the_tokens_they_should() -> None:
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))

    def kept(**kw: float) -> list[int]:
        return (kept_probs(logits, [SamplingParams(**kw)])[0] > 0).nonzero().flatten().tolist()

    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.5) == [0, 1]  # 0.4 < 0.5 <= 0.4 + 0.3
    assert kept(top_p=0.7) == [0, 1]
    assert kept(top_p=0.71) == [0, 1, 2]
    assert kept(min_p=0.45) == [0, 1, 2]  # probability >= 0.45 * 0.4 = 0.18
    assert kept(min_p=0.55) == [0, 1]
    assert kept(top_k=3, top_p=0.99, min_p=0.6) == [0, 1]
    # rows of one batch, each cut by its own settings
    both = kept_probs(logits.expand(2, 4), [SamplingParams(top_k=1), SamplingParams(top_p=0.71)])
    assert (both > 0).tolist() == [[True, False, False, False], [True, True, True, False]]
    draws = {t for _, t in draw(logits[0], 200, top_p=0.5)}
    assert draws == {0, 1}


def draw(logits: torch.Tensor, n: int, **kw: float) -> list[tuple[int, int]]:
    """(seed, token) for ``n`` seeded rows sampling from the same ``logits`` (V,) in one batch."""
    rows = [Sampler(SamplingParams(**kw), [], seed) for seed in range(n)]
    picks = sample(logits.expand(n, -1).clone(), rows)
    return [(seed, p.token) for seed, p in enumerate(picks)]


def test_temperature_sharpens_and_flattens() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0])
    cold = [t for _, t in draw(logits, 300, temperature=0.05)]
    hot = [t for _, t in draw(logits, 300, temperature=100.0)]
    assert cold.count(0) == 300
    assert all(hot.count(t) > 60 for t in range(3))


def test_sampling_follows_the_distribution_and_each_row_repeats_alone() -> None:
    probs = torch.tensor([0.5, 0.3, 0.2])
    picks = draw(probs.log(), 4000)
    counts = torch.bincount(torch.tensor([t for _, t in picks]), minlength=3)
    assert torch.allclose(counts / 4000, probs, atol=0.03)
    for seed, token in picks[:20]:  # a row's draw depends on its seed only, not on the batch
        row = Sampler(SamplingParams(), [], seed)
        assert sample(probs.log()[None].clone(), [row])[0].token == token


def test_repetition_penalty_follows_the_ctrl_rule() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0])
    row = Sampler(SamplingParams(repetition_penalty=2.0), [0, 1], 0)
    row.adjust_(logits)
    assert logits.tolist() == [1.0, -4.0, 1.0, -1.0]  # seen: positive / 2, negative * 2


def test_presence_and_frequency_penalties_count_generated_tokens_only() -> None:
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    row = Sampler(params, [3], 0)  # the prompt's token is not penalised
    row.add(0)
    row.adjust_(torch.zeros(4))  # the counts are built here, then kept up to date by `add`
    for t in (0, 1):
        row.add(t)
    logits = torch.zeros(4)
    row.adjust_(logits)
    assert logits.tolist() == [-1.0, -0.75, 0.0, 0.0]


def test_mixed_batch_each_row_uses_its_own_settings() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0]]).expand(3, 3).clone()
    batch = [
        Sampler(SamplingParams(temperature=0.0), [], 0),
        Sampler(SamplingParams(temperature=0.0, logit_bias=((1, -100.0),)), [], 0),
        Sampler(SamplingParams(temperature=0.0, frequency_penalty=2.0), [], 0),
    ]
    batch[2].generated = [1, 1, 1]  # 5 - 3 * 2 = -1: token 1 falls below token 2
    assert [s.token for s in sample(logits, batch)] == [1, 2, 2]
    assert [r.generated[-1] for r in batch] == [1, 2, 2]  # each row records its token


def test_presence_penalty_counts_each_seen_token_once() -> None:
    row = Sampler(SamplingParams(temperature=0.0, presence_penalty=1.0), [], 0)
    row.generated = [1, 1, 1, 1]  # 3 - 1 = 2 < 2.5
    assert sample(torch.tensor([[0.0, 3.0, 2.5]]), [row])[0].token == 2


def test_reported_logprobs_are_the_models_own() -> None:
    logits = torch.randn(2, 30)
    ref = torch.log_softmax(logits, dim=-1)
    batch = [Sampler(SamplingParams(temperature=0.7, top_p=0.5, logprobs=3), [], i) for i in (0, 1)]
    for b, pick in enumerate(sample(logits.clone(), batch)):
        assert pick.logprob == pytest.approx(ref[b, pick.token].item(), abs=1e-5)
        values, ids = ref[b].topk(3)
        assert [i for i, _ in pick.top] == ids.tolist()
        assert [v for _, v in pick.top] == pytest.approx(values.tolist(), abs=1e-5)
    unscored = sample(logits[:1].clone(), [Sampler(SamplingParams(), [], 0)])[0]
    assert unscored.logprob != unscored.logprob and unscored.top is None  # NaN: not asked


def test_prompt_logprobs_score_each_token_from_the_ones_before() -> None:
    logits = torch.randn(4, 10)
    ids = [3, 1, 4, 1]
    scores = prompt_logprobs(logits, ids, k=2)
    ref = torch.log_softmax(logits, dim=-1)
    assert scores[0] is None
    for t in range(1, 4):
        assert isinstance(scores[t], Sampled)
        assert scores[t].logprob == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-5)
        assert len(scores[t].top) == 2


def test_a_large_frequency_penalty_forbids_any_repeat() -> None:
    model = tiny_model(13)
    params = SamplingParams(temperature=0.0, max_new_tokens=50, frequency_penalty=1e6)
    tokens = complete(model, [[1, 2]], params)[0].tokens
    assert len(set(tokens)) == 50
    assert len(set(complete(model, [[1, 2]], GREEDY)[0].tokens)) < 40  # it would repeat


def test_max_new_tokens_zero_gives_nothing() -> None:
    out = complete(tiny_model(), [[1, 2]], SamplingParams(max_new_tokens=0))[0]
    assert out.tokens == [] and out.finish_reason == "length"


# Stopping ---------------------------------------------------------------------------------------

CHARS = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,;:!?'ABCDEFGHIJKLMNOPQRSTUVWXYZ\n0123")


def char_model(seed: int = 14) -> GPT:
    return tiny_model(seed, vocab_size=CHARS.vocab_size)


def test_end_of_text_ends_a_sequence_and_is_not_in_its_text() -> None:
    model = char_model()
    free = complete(model, ["hello"], SamplingParams(temperature=0.0, max_new_tokens=60), CHARS)[0]
    eot = free.tokens[12]
    first = free.tokens.index(eot)
    out = complete(
        model, ["hello"], SamplingParams(temperature=0.0, max_new_tokens=60), CHARS, eot_token=eot
    )[0]
    assert out.finish_reason == "eot"
    assert out.tokens == free.tokens[: first + 1]
    assert out.text == CHARS.decode(free.tokens[:first])
    ignored = SamplingParams(temperature=0.0, max_new_tokens=60, ignore_eot=True)
    assert complete(model, ["hello"], ignored, CHARS, eot_token=eot)[0].tokens == free.tokens


def test_the_earliest_of_several_stop_strings_ends_the_text_before_it() -> None:
    model = char_model()
    params = SamplingParams(temperature=1.0, max_new_tokens=80, seed=5)
    free = complete(model, ["the "], params, CHARS)[0].text
    late, early = free[50:53], free[20:22]
    stops = SamplingParams(temperature=1.0, max_new_tokens=80, seed=5, stop=(late, early, "\x00"))
    out = complete(model, ["the "], stops, CHARS)[0]
    cut = min(free.find(late), free.find(early))
    assert out.finish_reason == "stop"
    assert out.text == free[:cut]
    assert len(out.tokens) == cut + len(early if free.find(early) == cut else late)


def test_streamed_pieces_join_to_the_completion_and_hide_the_stop_string() -> None:
    model = char_model()
    params = SamplingParams(temperature=1.0, max_new_tokens=80, seed=8)
    free = complete(model, ["to be"], params, CHARS)[0].text
    stop = free[40:43]
    with_stop = SamplingParams(temperature=1.0, max_new_tokens=80, seed=8, stop=(stop,))
    pieces = list(stream(model, CHARS, "to be", with_stop))
    assert "".join(pieces) == complete(model, ["to be"], with_stop, CHARS)[0].text
    assert "".join(pieces) == free[: free.find(stop)]
    assert "".join(stream(model, CHARS, "to be", params)) == free


def test_a_possible_stop_string_is_held_back_until_decided() -> None:
    text = IncrementalText(CHARS, stop=("o w", "xyz"))
    released = [text.add(t).text for t in CHARS.encode("hello wor")]
    assert released[:5] == ["h", "e", "l", "l", ""]  # "o" might start "o w"
    assert "".join(released) == "hell" and text.stopped
    text = IncrementalText(CHARS, stop=("o w",))
    released = [text.add(t).text for t in CHARS.encode("hello!")] + [text.finish().text]
    assert released[4:6] == ["", "o!"] and "".join(released) == "hello!"


def test_each_released_token_carries_its_own_text_and_offset() -> None:
    tok = GPT2Tokenizer()
    text = IncrementalText(tok, ["d, an"])  # a stop string across tokens
    sent_text, sent_tokens = "", []
    for t in tok.encode("Hello world, and hello again"):
        piece = text.add(t, info=t)
        sent_text += piece.text
        sent_tokens += piece.tokens
        if piece.stopped:
            break
    assert sent_text == "Hello worl" == text.text
    # every released token began before the cut; their offsets line up with the text
    assert [t.offset for t in sent_tokens] == [0, 5]
    assert "".join(t.text for t in sent_tokens).startswith(sent_text)
    assert [t.info for t in sent_tokens] == [t.id for t in sent_tokens]


def test_stream_never_splits_a_multibyte_character() -> None:
    tok = GPT2Tokenizer()
    sample = "naïve café — 日本語のテキスト 🙂👍🏽 ok"
    ids = tok.encode(sample)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens are partial characters
    text = IncrementalText(tok)
    pieces = [text.add(i).text for i in ids] + [text.finish().text]
    assert "".join(pieces) == sample
    assert all("\ufffd" not in p for p in pieces)


def test_a_dangling_partial_character_is_replaced_at_the_end() -> None:
    tok = GPT2Tokenizer()
    ids = tok.encode("🙂")
    text = IncrementalText(tok)
    pieces = [text.add(i).text for i in ids[:-1]]
    assert "".join(pieces) == ""
    assert text.finish().text == tok.decode(ids[:-1])  # U+FFFD, as a one-shot decode gives


def test_empty_prompt_starts_from_end_of_text() -> None:
    tok = GPT2Tokenizer()
    model = tiny_model(15, vocab_size=tok.vocab_size, n_embd=16)
    params = SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eot=True)
    assert (
        complete(model, [""], params, tok)[0].tokens
        == complete(model, [[tok.eot_token]], params)[0].tokens
    )


# Beam search ------------------------------------------------------------------------------------


@torch.no_grad()
def exhaustive_best(model: GPT, prompt: list[int], n: int) -> list[int]:
    V = model.config.vocab_size
    seqs = torch.tensor([prompt + list(s) for s in itertools.product(range(V), repeat=n)])
    logprobs = torch.log_softmax(model(seqs)[0], dim=-1)  # (V**n, T, V)
    P = len(prompt)
    scores = logprobs[:, P - 1 : -1].gather(2, seqs[:, P:, None]).sum(dim=(1, 2))  # (V**n,)
    return seqs[int(scores.argmax()), P:].tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_with_enough_beams_equals_exhaustive_search(seed: int) -> None:
    model = tiny_model(seed, std=1.0, vocab_size=5, n_embd=16)
    n = 4
    beams = beam_search(model, [1, 2], n, num_beams=5 ** (n - 1))
    assert beams[0].tokens == exhaustive_best(model, [1, 2], n)


def test_beam_search_with_one_beam_is_greedy_and_scores_are_sorted() -> None:
    model = tiny_model(16)
    assert beam_search(model, [3, 4], 30, num_beams=1)[0].tokens == cache_free_greedy(
        model, [3, 4], 30
    )
    beams = beam_search(model, [3, 4], 12, num_beams=4)
    assert len(beams) == 4 and [b.score for b in beams] == sorted(
        (b.score for b in beams), reverse=True
    )


def test_beam_search_finishes_beams_at_end_of_text() -> None:
    model = tiny_model(17, vocab_size=6, n_embd=16)
    eot = cache_free_greedy(model, [1], 3)[2]  # a token the model likes to produce
    params = SamplingParams(
        num_beams=3, max_new_tokens=12, num_return_sequences=3, early_stopping=True
    )
    out = complete(model, [[1]], params, eot_token=eot)
    assert len(out) == 3 and any(c.finish_reason == "eot" for c in out)
    for c in out:
        assert (c.tokens[-1] == eot) == (c.finish_reason == "eot") and eot not in c.tokens[:-1]


# Quantized and re-laid-out weights ---------------------------------------------------------------


@pytest.fixture
def pytorch_kernels(monkeypatch) -> None:
    """The layout `prepare_for_decoding` uses without the native kernels (`gpt2.native`)."""
    monkeypatch.setattr(native, "available", lambda: False)


def test_decode_layout_changes_storage_not_values_or_names(pytorch_kernels) -> None:
    model = tiny_model(18)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = generate(model, torch.tensor([[1, 2, 3]]), 40, temperature=0.0)
    prepare_for_decoding(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.transformer.h[0].mlp.c_fc.weight.stride() == (1, 128)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(generate(model, torch.tensor([[1, 2, 3]]), 40, temperature=0.0), tokens)


@pytest.fixture
def threads():
    """Set torch's thread count inside a test; the suite's count comes back afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("n_threads", [2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("transposed", [True, False])
def test_split_linear_equals_linear(threads, n_threads: int, bias: bool, transposed: bool) -> None:
    threads(n_threads)
    torch.manual_seed(n_threads)
    linear = torch.nn.Linear(48, 60, bias=bias)  # both sides divide by 2 and 3
    if transposed:  # the (in, out) memory `decode_layout` makes for wide weights
        linear.weight.data = linear.weight.data.t().contiguous().t()
    split = SplitLinear(linear)
    with torch.no_grad():
        for shape in [(1, 48), (1, 1, 48), (3, 2, 48), (20, 48)]:  # 20 rows: plain F.linear
            x = torch.randn(shape)
            torch.testing.assert_close(split(x), linear(x), rtol=1e-5, atol=1e-6)
        # (in, out) memory is cut along the input side, (out, in) along the output side
        assert split._p == n_threads
        assert ("split input" if transposed else "split output") in repr(split)
        linear.weight.mul_(2.0)  # an in-place change is seen (its views are made again)
        x = torch.randn(1, 48)
        torch.testing.assert_close(split(x), linear(x), rtol=1e-5, atol=1e-6)


def test_split_linear_takes_f_linear_for_a_weight_stored_neither_way(threads) -> None:
    threads(2)
    linear = torch.nn.Linear(24, 16)
    linear.weight.data = torch.randn(16, 48)[:, ::2]  # a strided view: no contiguous blocks
    split = SplitLinear(linear)
    x = torch.randn(1, 24)
    with torch.no_grad():
        torch.testing.assert_close(split(x), linear(x))
    assert split._p == 1


def test_split_linear_works_on_parameters_made_in_inference_mode(threads) -> None:
    threads(2)
    with torch.inference_mode():  # e.g. a model loaded inside inference_mode: no version counters
        linear = torch.nn.Linear(48, 60)
        x = torch.randn(1, 48)
        torch.testing.assert_close(SplitLinear(linear)(x), linear(x), rtol=1e-5, atol=1e-6)


def test_split_linear_passes_gradients(threads) -> None:
    threads(2)
    linear = torch.nn.Linear(48, 40)
    x = torch.randn(1, 48)
    SplitLinear(linear)(x).sum().backward()
    expected = x.expand(40, 48)  # d(sum of x W^T + b) / dW: x in every row
    torch.testing.assert_close(linear.weight.grad, expected)
    torch.testing.assert_close(linear.bias.grad, torch.ones(40))


def test_split_linear_falls_back_when_threads_do_not_divide(threads) -> None:
    threads(2)
    assert SplitLinear.parts(33, 2) == 1  # 33 is odd: one slice, F.linear
    cut_input = torch.nn.Linear(33, 8)
    cut_input.weight.data = cut_input.weight.data.t().contiguous().t()  # (in, out) memory
    cut_output = torch.nn.Linear(8, 33)  # (out, in) memory
    for linear in (cut_input, cut_output):
        split = SplitLinear(linear)
        x = torch.randn(1, linear.in_features)
        with torch.no_grad():
            torch.testing.assert_close(split(x), linear(x))
        assert split._p == 1


def test_decode_layer_norm_equals_layer_norm() -> None:
    norm = torch.nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 2, 16)
    expected = norm(x)
    norm.__class__ = DecodeLayerNorm
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=0)


def test_pinned_submodules_follow_a_replacement() -> None:
    model = pin_submodules(tiny_model(3))
    block = model.transformer.h[0]
    assert block.__dict__["attn"] is block._modules["attn"]
    identity = torch.nn.Identity()
    block.ln_1 = identity  # Module.__setattr__ drops the pinned copy
    assert block.ln_1 is identity and block._modules["ln_1"] is identity


def test_prepare_for_decoding_with_two_threads_keeps_tokens_names_and_tying(
    threads, pytorch_kernels
) -> None:
    threads(2)
    model = tiny_model(20)
    prompt = torch.tensor([[1, 2, 3]])
    tokens = generate(model, prompt, 60, temperature=0.0)
    names = set(model.state_dict())
    prepare_for_decoding(model)
    assert isinstance(model.lm_head, SplitLinear)
    assert all(type(m) is not torch.nn.LayerNorm for m in model.modules())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert set(model.state_dict()) == names
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    # Wide weights are stored (in, out) and cut along the input side, the tall mlp.c_proj keeps
    # (out, in) and is cut along the output side: either way each slice is contiguous.
    mlp = model.transformer.h[0].mlp
    assert mlp.c_fc.weight.stride() == (1, 128) and mlp.c_proj.weight.stride() == (128, 1)
    assert "split input" in repr(mlp.c_fc) and "split output" in repr(mlp.c_proj)
    assert torch.equal(generate(model, prompt, 60, temperature=0.0), tokens)


def test_int8_logits_stay_close_to_fp32() -> None:
    model = tiny_model(19, std=0.05, n_embd=64, n_head=4)
    idx = torch.randint(0, 64, (2, 30))
    with torch.no_grad():
        ref, _ = model(idx)
        prepare_for_decoding(model, "int8")
        got, _ = model(idx)
    assert (got - ref).norm() < 0.05 * ref.norm()  # 7-bit activations, 8-bit weights
    out = complete(model, [[1, 2]], SamplingParams(temperature=0.0, max_new_tokens=10))[0]
    assert len(out.tokens) == 10


# Bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (dict(top_p=0.0), "top_p must be in (0, 1]"),
        (dict(top_p=1.5), "top_p must be in (0, 1]"),
        (dict(temperature=-0.5), "temperature must be 0 (greedy) or positive"),
        (dict(num_beams=0), "num_beams must be an integer >= 1"),
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
        (dict(min_p=2.0), "min_p must be in [0, 1]"),
        (dict(top_k=-3), "top_k must be an integer >= 0"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be positive"),
        (dict(num_return_sequences=0), "num_return_sequences must be an integer >= 1"),
        (dict(num_beams=2, num_return_sequences=3), "must not exceed num_beams"),
        (dict(stop=("",)), "stop strings must be non-empty"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(params: dict, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        complete(tiny_model(), [[1]], SamplingParams(**params), CHARS)


def test_bad_prompts_are_refused_with_a_clear_message() -> None:
    model = tiny_model(block_size=16)
    with pytest.raises(UserError, match="prompt 0 has 17 tokens; the model's context holds 16"):
        complete(model, [[1] * 17], GREEDY)
    with pytest.raises(UserError, match="no end-of-text token"):
        complete(model, [""], GREEDY, CharTokenizer("ab"))
    with pytest.raises(UserError, match="outside the vocabulary"):
        complete(model, [[64]], GREEDY)
    with pytest.raises(UserError, match="need a tokenizer"):
        complete(model, [[1]], SamplingParams(stop=("x",)))
    with pytest.raises(UserError, match="streaming gives one sequence"):
        stream(model, CHARS, "ab", SamplingParams(num_beams=2))  # raised at the call, not later
    with pytest.raises(UserError, match="prompt 0 has 17 tokens"):
        stream(model, CharTokenizer("a"), "a" * 17)
    with pytest.raises(UserError, match="prompt 0 has 17 tokens"):
        generate(model, torch.ones((1, 17), dtype=torch.long), 3)


def test_generate_keeps_its_nanogpt_signature() -> None:
    model = tiny_model(20)
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    a = generate(model, idx, 10, 0.8, 5, torch.Generator().manual_seed(1))
    b = generate(model, idx, 10, 0.8, 5, torch.Generator().manual_seed(1))
    assert a.shape == (2, 13) and torch.equal(a, b) and torch.equal(a[:, :3], idx)
    beams = generate(model, idx, 6, temperature=0.0, num_beams=3)
    assert beams.shape == (2, 9)


# A vocabulary padded past the tokenizer's (--pad-vocab) ----------------------------------------


def padded_vocab_model() -> tuple[GPT, CharTokenizer]:
    """64 embeddings for a 40-character tokenizer, the dead ids made the likeliest by far."""
    model = tiny_model(21)
    with torch.no_grad():
        model.transformer.wte.weight[40:] *= 50.0  # tied head: huge logits for ids 40..63
    chars = [chr(ord("0") + i) for i in range(40)]
    return model, CharTokenizer(chars)


def test_ids_past_the_tokenizer_are_never_sampled() -> None:
    model, tok = padded_vocab_model()
    with torch.no_grad():
        assert model(torch.tensor([[1, 2]]))[0][0, -1].argmax() >= 40  # without the mask
    for params in [
        SamplingParams(temperature=0.0, max_new_tokens=30),
        SamplingParams(temperature=1.5, top_k=0, max_new_tokens=30, seed=3),
        SamplingParams(temperature=0.0, num_beams=3, max_new_tokens=8),
    ]:
        for c in complete(model, ["12"], params, tok):
            assert c.tokens and max(c.tokens) < 40 and len(c.text) == len(c.tokens)


def test_the_engine_masks_ids_past_the_tokenizer() -> None:
    model, tok = padded_vocab_model()
    engine = KVCacheEngine(model, 2, vocab_limit=tok.vocab_size)
    logits = engine.prefill(0, [1, 2, 3], all_positions=True)  # (3, 64)
    assert torch.isinf(logits[:, 40:]).all() and torch.isfinite(logits[:, :40]).all()
    assert engine.decode([0], [5])[0].argmax() < 40
