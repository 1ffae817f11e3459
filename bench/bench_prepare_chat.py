"""Benchmark ``gpt2 prepare --chat``: conversations per second, end to end, by worker count.

The conversations are made up (TinyShakespeare's lines as messages: one to three turns, a system
message in every fourth), written as JSONL, then prepared by `gpt2.prepare.prepare_shards` with
``chat=True`` (reading, checking, rendering each conversation with the default template as many
times as it has replies, encoding, masking, writing). The shards of every worker count are checked
to be identical.

Usage: python bench/bench_prepare_chat.py [--conversations 20000] [--workers 1 2]
Prints the figures, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from gpt2.assets import fetch
from gpt2.corpus import find_sources
from gpt2.prepare import prepare_shards
from gpt2.tokenizer import GPT2Tokenizer


def make_conversations(path: Path, n: int) -> None:
    """``n`` conversations of TinyShakespeare's lines, one JSON object a line."""
    lines = [s for s in fetch("tinyshakespeare/input.txt").read_text(encoding="utf-8").splitlines() if s]  # fmt: skip
    k = 0

    def line() -> str:
        nonlocal k
        k += 1
        return lines[k % len(lines)]

    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            messages = [{"role": "system", "content": line()}] if i % 4 == 0 else []
            for _ in range(1 + i % 3):
                messages.append({"role": "user", "content": line()})
                messages.append(
                    {"role": "assistant", "content": " ".join(line() for _ in range(3))}
                )
            f.write(json.dumps({"messages": messages}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=20_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "chat.jsonl"
        make_conversations(corpus, args.conversations)
        shards = None
        for workers in args.workers:
            out = Path(tmp) / f"out-{workers}"
            start = time.perf_counter()
            meta = prepare_shards(find_sources([corpus], chat=True), out, GPT2Tokenizer(),
                                  text_field="messages", workers=workers, chat=True,
                                  show_progress=False)  # fmt: skip
            seconds = time.perf_counter() - start
            files = {p.name: p.read_bytes() for p in sorted(out.glob("*_*"))}
            assert shards is None or files == shards, "worker counts gave different shards"
            shards = files
            tokens = meta["train_tokens"] + meta["val_tokens"]
            trained = sum(meta["trained_tokens"].values())
            results.append({"workers": workers, "seconds": round(seconds, 2),
                            "conversations_per_s": round(args.conversations / seconds),
                            "tokens_per_s": round(tokens / seconds), "tokens": tokens,
                            "trained_tokens": trained})  # fmt: skip
            print(f"{workers} worker(s): {seconds:.2f} s, {args.conversations / seconds:,.0f} "
                  f"conversations/s, {tokens / seconds:,.0f} tokens/s ({trained / tokens:.0%} trained on)")  # fmt: skip
    print(
        json.dumps({"bench": "prepare_chat", "conversations": args.conversations, "runs": results})
    )


if __name__ == "__main__":
    main()
