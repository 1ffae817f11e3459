"""Benchmark ``gpt2 prepare`` on a corpus: throughput against tiktoken, and flat memory.

Throughput: the same documents (TinyShakespeare's paragraphs, repeated) are encoded in one process
by tiktoken's ``encode_ordinary_batch`` (documents already in memory, threads) and by
`gpt2.shards.prepare_shards` end to end (reading JSONL, encoding in worker processes, writing
shards), with the same number of workers. The ratio is prepare's tokens/s over tiktoken's.

Memory: prepare runs in a fresh child process on corpora of 1x and 4x a fixed size, with shards
much smaller than the corpus; the child samples its resident memory and its workers' (Linux /proc)
and reports the peaks. Flat memory means the 4x run peaks no higher than the 1x run (within noise).

Usage: python bench/bench_prepare.py [--tokens 10000000] [--workers 2] [--repeats 3]
Prints the figures, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpt2.assets import fetch
from gpt2.corpus import find_sources
from gpt2.prepare import prepare_shards
from gpt2.tokenizer import GPT2Tokenizer


def make_corpus(folder: Path, approx_tokens: int) -> tuple[Path, list[str]]:
    """A JSONL corpus of TinyShakespeare's paragraphs, numbered copies until ``approx_tokens``."""
    text = fetch("tinyshakespeare/input.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p]
    copies = max(1, round(approx_tokens / 345_000))  # ~345k tokens (with EOTs) per copy
    docs = [f"{c}: {p}" for c in range(copies) for p in paragraphs]
    path = folder / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return path, docs


def time_tiktoken(docs: list[str], workers: int) -> tuple[float, int]:
    enc = GPT2Tokenizer().enc
    start = time.perf_counter()
    ids = enc.encode_ordinary_batch(docs, num_threads=workers)
    seconds = time.perf_counter() - start
    return seconds, sum(len(x) for x in ids) + len(ids)  # + one EOT a document, as prepare writes


def time_tiktoken_loop(docs: list[str]) -> float:
    """One thread, a plain loop: tiktoken's speed without the thread pool's cost per document."""
    enc = GPT2Tokenizer().enc
    start = time.perf_counter()
    for d in docs:
        enc.encode_ordinary(d)
    return time.perf_counter() - start


def time_prepare(corpus: Path, out: Path, workers: int, shard_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    meta = prepare_shards(find_sources([corpus]), out, GPT2Tokenizer(), shard_tokens=shard_tokens,
                          workers=workers, show_progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    return seconds, meta["train_tokens"] + meta["val_tokens"]


RSS_PROBE = """
import json, os, sys, threading, time
from pathlib import Path
from gpt2.corpus import find_sources
from gpt2.prepare import prepare_shards
from gpt2.tokenizer import GPT2Tokenizer

def rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0

def children(pid):
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found

peak = {"main_mib": 0.0, "workers_sum_mib": 0.0}
done = threading.Event()

def sample():
    me = os.getpid()
    while not done.is_set():
        try:
            peak["main_mib"] = max(peak["main_mib"], rss_mib(me))
            peak["workers_sum_mib"] = max(peak["workers_sum_mib"], sum(rss_mib(c) for c in children(me)))
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.05)

tokenizer = GPT2Tokenizer()
before = rss_mib(os.getpid())
thread = threading.Thread(target=sample, daemon=True)
thread.start()
prepare_shards(find_sources([sys.argv[1]]), sys.argv[2], tokenizer, shard_tokens=int(sys.argv[3]),
               workers=int(sys.argv[4]), show_progress=False)
done.set()
thread.join()
print(json.dumps({"main_before_mib": before, **peak}))
"""


def child_peak_rss(corpus: Path, out: Path, workers: int, shard_tokens: int) -> dict[str, float]:
    """Run prepare in a fresh process that samples its own resident memory (and its workers')
    every 50 ms (Linux /proc): RSS before prepare starts, and the peaks while it runs, in MiB."""
    args = [sys.executable, "-c", RSS_PROBE, str(corpus), str(out), str(shard_tokens), str(workers)]
    result = subprocess.run(args, capture_output=True, text=True, check=True)
    return {k: round(v, 1) for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tokens", type=int, default=10_000_000, help="corpus size for the throughput run"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs of each; the best is kept"
    )
    parser.add_argument(
        "--rss-tokens", type=int, default=4_000_000, help="the 1x corpus of the memory runs"
    )
    parser.add_argument("--rss-shard-tokens", type=int, default=500_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        corpus, docs = make_corpus(tmp, args.tokens)
        mb = corpus.stat().st_size / 1e6
        best = {"batch": float("inf"), "loop": float("inf"), "prepare": float("inf")}
        for r in range(args.repeats):  # interleaved, so that load from other users hits all alike
            seconds, n_tk = time_tiktoken(docs, args.workers)
            best["batch"] = min(best["batch"], seconds)
            best["loop"] = min(best["loop"], time_tiktoken_loop(docs))
            seconds, n_pr = time_prepare(corpus, tmp / f"out{r}", args.workers, 10_000_000)
            best["prepare"] = min(best["prepare"], seconds)
        assert n_tk == n_pr, (n_tk, n_pr)
        del docs
        speed = {k: n_pr / v for k, v in best.items()}  # tokens/s
        ratio = speed["prepare"] / speed["batch"]
        print(f"corpus: {n_pr:,} tokens, {mb:.1f} MB of JSONL; workers: {args.workers}")
        print(
            f"tiktoken encode_ordinary_batch: {speed['batch']:,.0f} tokens/s (documents in memory)"
        )
        print(
            f"tiktoken encode_ordinary loop:  {speed['loop']:,.0f} tokens/s (one thread, for scale)"
        )
        print(f"gpt2 prepare end to end:        {speed['prepare']:,.0f} tokens/s, {mb / best['prepare']:.1f} MB/s")  # fmt: skip
        print(f"ratio prepare / encode_ordinary_batch: {ratio:.2f} (goal >= 0.8)")

        rss = {}
        for scale in (1, 4):
            folder = tmp / f"rss{scale}"
            folder.mkdir()
            path, _ = make_corpus(folder, scale * args.rss_tokens)
            rss[f"{scale}x"] = child_peak_rss(
                path, folder / "out", args.workers, args.rss_shard_tokens
            )
            r = rss[f"{scale}x"]
            print(f"RSS, {scale * args.rss_tokens / 1e6:.0f}M tokens in shards of {args.rss_shard_tokens:,}: "
                  f"main {r['main_before_mib']:.0f} MiB before, {r['main_mib']:.0f} MiB peak; "
                  f"workers together {r['workers_sum_mib']:.0f} MiB peak")  # fmt: skip
    print(json.dumps({
        "bench": "prepare", "workers": args.workers, "tokens": n_pr, "jsonl_mb": round(mb, 1),
        "tiktoken_batch_tokens_per_s": round(speed["batch"]),
        "tiktoken_one_thread_loop_tokens_per_s": round(speed["loop"]),
        "prepare_tokens_per_s": round(speed["prepare"]), "prepare_mb_per_s": round(mb / best["prepare"], 2),
        "ratio_vs_encode_ordinary_batch": round(ratio, 3),
        "rss_corpus_tokens_1x": args.rss_tokens, "rss_shard_tokens": args.rss_shard_tokens, "rss_mib": rss,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
