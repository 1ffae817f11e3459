"""Load on `gpt2 serve`: many streaming clients at once, then memory over many requests.

Starts the server as a subprocess (``python -m gpt2 serve``, as a user would) on a small model with
random weights and GPT-2's vocabulary, on a free loopback port. Then, from this process:

1. one streaming client, several requests in a row: tokens/s at concurrency 1 (the reference);
2. ``--clients`` streaming clients at once, ``--tokens`` tokens each: all must complete without an
   error; p50/p99 time to first token, total tokens/s, and the ratio to (1) (batching at work);
3. ``--requests`` sequential requests: the server's resident memory before and after.

The end-of-text token is banned (``logit_bias``) so that every request makes exactly ``--tokens``
tokens. Prints a table, then one JSON line.

    python bench/bench_serve.py                      # 32 clients x 64 tokens, 500 requests
    python bench/bench_serve.py --clients 8 --requests 50

bench_serve_llama_cpp.py runs the same clients against `gpt2 serve` and llama.cpp's llama-server
side by side, on GPT-2 124M.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

from gpt2.checkpoint import save_checkpoint
from gpt2.config import GPTConfig, TrainConfig
from gpt2.model import GPT
from gpt2.serve.live import bind
from gpt2.tokenizer import GPT2Tokenizer

EOT = "50256"
PROMPT = "The quick brown fox jumps over the lazy dog because"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    p.add_argument("--tokens", type=int, default=64, help="tokens per request")
    p.add_argument(
        "--single", type=int, default=4, help="requests in a row for the 1-client figure"
    )
    p.add_argument(
        "--requests", type=int, default=500, help="sequential requests for the memory check"
    )
    p.add_argument(
        "--rounds", type=int, default=3, help="1-client and N-client runs, alternated (medians)"
    )
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    return p.parse_args()


def make_checkpoint(args: argparse.Namespace, folder: Path) -> tuple[Path, int]:
    torch.manual_seed(0)
    tok = GPT2Tokenizer()
    config = GPTConfig(
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        block_size=args.block_size,
        vocab_size=tok.vocab_size,
    )
    model = GPT(config)
    save_checkpoint(folder / "bench-small", model, tok, TrainConfig())
    return folder / "bench-small", model.num_parameters()


def start_server(ckpt: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with bind() as sock:  # a port that was free a moment ago; the server binds it itself
        port = sock.getsockname()[1]
    cmd = [
        sys.executable, "-m", "gpt2", "-q", "serve", "--checkpoint", str(ckpt), "--port", str(port),
        "--device", args.device, "--max-batch", str(max(args.clients, 1)),
        "--max-queue", str(max(2 * args.clients, 64)),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not start")
        time.sleep(0.1)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


Fields = dict | Callable[[], dict] | None


async def stream_one(
    http: httpx.AsyncClient, tokens: int, seed: int, fields: Fields = None
) -> tuple[float, float, int]:
    """One streaming request: (time to first token, total time, tokens received). ``fields``:
    more fields for the body, or a function that makes them for each request
    (bench_serve_llama_cpp.py sends both servers the same sampling, and may vary the prompt)."""
    extra = fields() if callable(fields) else fields
    body = {
        "prompt": PROMPT,
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},  # the token count, in a last chunk
        "seed": seed,
        "logit_bias": {EOT: -100},
        **(extra or {}),
    }
    start = time.perf_counter()
    first = None
    received = 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                received = chunk["usage"]["completion_tokens"]
    return first or float("nan"), time.perf_counter() - start, received


async def concurrent(url: str, clients: int, tokens: int, fields: Fields = None) -> dict:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(stream_one(http, tokens, i, fields) for i in range(clients)),
            return_exceptions=True,
        )
        wall = time.perf_counter() - start
    errors = [r for r in results if isinstance(r, BaseException)]
    ok = [r for r in results if not isinstance(r, BaseException)]
    ttft = sorted(r[0] for r in ok)
    total = sum(r[2] for r in ok)
    return {
        "clients": clients,
        "errors": len(errors),
        "first_error": repr(errors[0]) if errors else None,
        "complete": sum(r[2] == tokens for r in ok),
        "tokens": total,
        "wall_s": wall,
        "tokens_per_s": total / wall,
        "ttft_p50_ms": 1000 * percentile(ttft, 50),
        "ttft_p99_ms": 1000 * percentile(ttft, 99),
    }


async def sequential_single(url: str, requests: int, tokens: int, fields: Fields = None) -> dict:
    # A new connection for each request: llama-server (cpp-httplib) may close a kept-alive one
    # just as the next request goes out on it, which httpx reports as a disconnect.
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=fresh) as http:
        await stream_one(http, 4, 0, fields)  # warm-up
        start = time.perf_counter()
        results = [await stream_one(http, tokens, i, fields) for i in range(requests)]
        wall = time.perf_counter() - start
    total = sum(r[2] for r in results)
    return {
        "tokens_per_s": total / wall,
        "ttft_p50_ms": 1000 * statistics.median(r[0] for r in results),
        "complete": sum(r[2] == tokens for r in results),
    }


def memory(url: str, pid: int, requests: int) -> dict:
    with httpx.Client(base_url=url, timeout=600) as http:
        body = {"prompt": PROMPT, "max_tokens": 16, "logit_bias": {EOT: -100}}
        for i in range(20):  # warm-up: first-use allocations are not a leak
            http.post("/v1/completions", json={**body, "seed": i, "stream": i % 2 == 0})
        before = rss_mib(pid)
        statuses = []
        for i in range(requests):
            req = {**body, "seed": i, "stream": i % 2 == 0, "logprobs": i % 3, "n": 1 + i % 2}
            statuses.append(http.post("/v1/completions", json=req).status_code)
        after = rss_mib(pid)
    return {
        "requests": requests,
        "non_200": sum(s != 200 for s in statuses),
        "rss_before_mib": before,
        "rss_after_mib": after,
        "rss_growth_mib": after - before,
    }


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput, with every run's throughput beside it."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ordered[len(ordered) // 2], "all_tokens_per_s": [r["tokens_per_s"] for r in runs]}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, n_params = make_checkpoint(args, Path(tmp))
        proc, url = start_server(ckpt, args)
        try:
            # Alternated, so that a change in the machine's load hits both sides alike.
            singles, manys = [], []
            for _ in range(args.rounds):
                singles.append(asyncio.run(sequential_single(url, args.single, args.tokens)))
                manys.append(asyncio.run(concurrent(url, args.clients, args.tokens)))
            single = median_run(singles)
            many = median_run(manys)
            mem = memory(url, proc.pid, args.requests)
            health = httpx.get(f"{url}/health").json()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    ratio = many["tokens_per_s"] / single["tokens_per_s"]
    errors = sum(r["errors"] for r in manys)
    incomplete = sum(args.clients - r["complete"] for r in manys)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(
        f"model: {n_params / 1e6:.1f}M parameters, GPT-2 vocabulary, random weights; {args.device}"
    )
    print(
        f"1 client:   {single['tokens_per_s']:8.1f} tokens/s   TTFT p50 {single['ttft_p50_ms']:.0f} ms"
    )
    print(
        f"{args.clients} clients: {many['tokens_per_s']:8.1f} tokens/s   TTFT p50 "
        f"{many['ttft_p50_ms']:.0f} ms, p99 {many['ttft_p99_ms']:.0f} ms; "
        f"over {args.rounds} rounds: {incomplete} incomplete, {errors} errors"
    )
    print(f"throughput ratio {args.clients} clients / 1 client: {ratio:.2f}x")
    print(
        f"memory over {mem['requests']} sequential requests: RSS {mem['rss_before_mib']:.1f} -> "
        f"{mem['rss_after_mib']:.1f} MiB ({mem['rss_growth_mib']:+.1f}); {mem['non_200']} non-200"
    )
    print(
        json.dumps(
            {
                "bench": "serve",
                "params_m": round(n_params / 1e6, 2),
                "single": single,
                "concurrent": many,
                "ratio": ratio,
                "errors": errors,
                "incomplete": incomplete,
                "memory": mem,
                "loadavg": os.getloadavg()[0],
                "idle_after": health,
            }
        )
    )


if __name__ == "__main__":
    main()
