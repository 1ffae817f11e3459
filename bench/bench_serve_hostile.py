"""Hostile load on `gpt2 serve`: many oversize requests at once, and how the rest of the server fares.

Starts ``python -m gpt2 serve`` (the code on PYTHONPATH: run it once with the old tree and once
with the new one) on a small model with random weights and GPT-2's vocabulary, on a free loopback
port. Then, from this process, ``--rounds`` times:

1. ``--attackers`` concurrent ``POST /v1/completions`` with ``"prompt": [1] * --ids`` (600 KB of
   JSON for 200000 ids, under the 1 MiB body limit, far past the 256-token context);
2. while those are in flight, ``GET /health`` and one normal 4-token completion, each timed;
3. the time until every oversize request had its answer, their statuses, and the server's CPU
   seconds (user + system, from /proc) over the round.

Loopback only; every loop is bounded by ``--rounds`` and ``--attackers``; every request has a
timeout. Prints one line per round, then one JSON line.

    PYTHONPATH=/work/main/src python bench/bench_serve_hostile.py   # before
    PYTHONPATH=src python bench/bench_serve_hostile.py              # after
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
from pathlib import Path

import httpx
import torch

from gpt2.checkpoint import save_checkpoint
from gpt2.config import GPTConfig, TrainConfig
from gpt2.model import GPT
from gpt2.serve.live import bind
from gpt2.tokenizer import GPT2Tokenizer

TIMEOUT_S = 120.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--attackers", type=int, default=20, help="concurrent oversize requests")
    p.add_argument("--ids", type=int, default=200_000, help="token ids in each oversize prompt")
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args()


def make_checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    tok = GPT2Tokenizer()
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=256, vocab_size=tok.vocab_size)
    save_checkpoint(folder / "hostile", GPT(config), tok, TrainConfig())
    return folder / "hostile"


def start_server(ckpt: Path) -> tuple[subprocess.Popen, str]:
    with bind() as sock:  # a port that was free a moment ago; the server binds it itself
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "gpt2", "-q", "serve", "--checkpoint", str(ckpt)]
    proc = subprocess.Popen([*cmd, "--port", str(port), "--device", "cpu"])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def timed(coro) -> tuple[float, int]:
    start = time.perf_counter()
    r = await coro
    return time.perf_counter() - start, r.status_code


async def one_round(url: str, pid: int, attackers: int, ids: int) -> dict:
    body = json.dumps({"prompt": [1] * ids, "max_tokens": 1}).encode()
    headers = {"content-type": "application/json"}
    limits = httpx.Limits(max_connections=attackers + 4)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S, limits=limits) as http:
        cpu0 = cpu_seconds(pid)
        start = time.perf_counter()
        attacks = [
            asyncio.ensure_future(
                timed(http.post("/v1/completions", content=body, headers=headers))
            )
            for _ in range(attackers)
        ]
        await asyncio.sleep(0.05)  # the oversize bodies are on their way
        health = asyncio.ensure_future(timed(http.get("/health")))
        normal = asyncio.ensure_future(
            timed(http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4}))
        )
        done = await asyncio.gather(*attacks)
        all_refused = time.perf_counter() - start
        (health_s, health_status), (normal_s, normal_status) = await health, await normal
        cpu = cpu_seconds(pid) - cpu0
    return {
        "attack_statuses": sorted({s for _, s in done}),
        "all_refused_s": all_refused,
        "health_s": health_s,
        "health_status": health_status,
        "normal_s": normal_s,
        "normal_status": normal_status,
        "server_cpu_s": cpu,
    }


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(make_checkpoint(Path(tmp)))
        try:
            rounds = []
            for i in range(args.rounds):
                r = asyncio.run(one_round(url, proc.pid, args.attackers, args.ids))
                rounds.append(r)
                print(
                    f"round {i}: {args.attackers} x {args.ids} ids -> {r['attack_statuses']} "
                    f"all answered in {r['all_refused_s']:.2f} s; /health {r['health_s']:.3f} s "
                    f"({r['health_status']}), normal request {r['normal_s']:.3f} s "
                    f"({r['normal_status']}); server CPU {r['server_cpu_s']:.2f} s"
                )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    summary = {
        key: statistics.median(r[key] for r in rounds)
        for key in ("all_refused_s", "health_s", "normal_s", "server_cpu_s")
    }
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(json.dumps({"bench": "serve_hostile", "median": summary, "rounds": rounds}))


if __name__ == "__main__":
    main()
