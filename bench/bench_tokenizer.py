"""Benchmark the readable BPE encoder and BPE training against their references, in one process.

- Encoding TinyShakespeare with `gpt2.bpe.BPETokenizer` (GPT-2's vocabulary): MB/s with a cold
  word cache (a fresh tokenizer) and a warm one (the same text again), against tiktoken's
  ``encode_ordinary`` (one thread) on the same text.
- Training a byte-level BPE of 4096 ids on TinyShakespeare with `gpt2.bpe_train` against Hugging
  Face ``tokenizers``' ``BpeTrainer`` (ByteLevel pre-tokenizer, same size, same special token).

Usage: python bench/bench_tokenizer.py [--repeats 3]
Prints the figures, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from gpt2.assets import fetch
from gpt2.bpe import BPETokenizer
from gpt2.bpe_train import count_words, train_bpe
from gpt2.tokenizer import EOT_TEXT, GPT2Tokenizer


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def train_ours(text: str) -> BPETokenizer:
    counts = count_words([text], special_tokens=[EOT_TEXT])
    return train_bpe(counts, 4096, [EOT_TEXT], show_progress=False)


def train_hf(text: str) -> object:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=[EOT_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    assert tok.get_vocab_size() == 4096
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    text = fetch("tinyshakespeare/input.txt").read_text(encoding="utf-8")
    mb = len(text.encode("utf-8")) / 1e6

    # Encoding. A cold run needs a fresh tokenizer each time (loading it is not timed).
    cold_times = []
    for _ in range(args.repeats):
        tok = BPETokenizer.gpt2()
        start = time.perf_counter()
        ids = tok.encode_ordinary(text)
        cold_times.append(time.perf_counter() - start)
    cold = min(cold_times)
    warm = best_of(args.repeats, lambda: tok.encode_ordinary(text))
    enc = GPT2Tokenizer().enc
    assert enc.encode_ordinary(text) == ids
    ref = best_of(args.repeats, lambda: enc.encode_ordinary(text))
    print(f"TinyShakespeare: {mb:.2f} MB, {len(ids):,} tokens")
    print(f"readable BPE, cold cache: {mb / cold:6.2f} MB/s  ({ref / cold:.3f}x tiktoken)")
    print(f"readable BPE, warm cache: {mb / warm:6.2f} MB/s  ({ref / warm:.3f}x tiktoken)")
    print(f"tiktoken encode_ordinary: {mb / ref:6.2f} MB/s  (one thread)")

    # Training.
    ours = best_of(args.repeats, lambda: train_ours(text))
    hf = best_of(args.repeats, lambda: train_hf(text))
    print(f"BPE training to 4096 ids: ours {ours:.2f} s, tokenizers' BpeTrainer {hf:.2f} s "
          f"(ours takes {ours / hf:.2f}x as long)")  # fmt: skip
    print(json.dumps({
        "bench": "tokenizer", "mb": round(mb, 3), "tokens": len(ids),
        "encode_cold_mb_per_s": round(mb / cold, 3), "encode_warm_mb_per_s": round(mb / warm, 3),
        "tiktoken_mb_per_s": round(mb / ref, 3), "cold_vs_tiktoken": round(ref / cold, 4),
        "warm_vs_tiktoken": round(ref / warm, 4), "train_4096_s": round(ours, 3),
        "hf_train_4096_s": round(hf, 3), "train_time_ratio_vs_hf": round(ours / hf, 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
