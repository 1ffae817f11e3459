"""Serving against llama-server: `gpt2 serve` and llama.cpp's ``llama-server`` on the same weights.

Setting (issue 18, item 5): a GPT-2 124M checkpoint (by default random weights of that shape,
seed 0, with GPT-2's tokenizer), written to GGUF by our own ``gpt2 export --format gguf`` at each
precision; both servers on the same machine with every core (``--threads``, default all):

- ours: ``python -m gpt2 serve --max-batch N`` (fp32; bf16 with ``--dtype bfloat16`` and int8 with
  ``--quantize int8`` where ``gpt2 serve --help`` offers them, else a "skipped" line);
- llama.cpp: ``llama-server -np N -c N*context -t T -tb T`` (N slots, each with the model's whole
  context, as ours) on the f32, bf16 or q8_0 file, from the cached build of
  scripts/build_llama_cpp.sh (``make llama-cpp``; ``--build`` builds it). Without it, one
  "skipped: ..." line says so and only our figures are printed.

Both get the same streaming ``/v1/completions`` requests (bench_serve.py's client): one prompt,
``--tokens`` tokens each with end-of-text banned (``logit_bias``), plain sampling over the whole
vocabulary (temperature 1, no top-k, top-p or min-p cut; llama-server's defaults would cut to the
top 40 tokens) and a seed per request. Measured: tokens/s to one client (``--single`` requests in
a row), aggregate tokens/s to ``--clients`` concurrent clients, and time to first token (the first
chunk with text) p50 of each. With ``--distinct-prompts`` every request's prompt starts with
a new number: llama-server otherwise reuses a slot's cached prompt and evaluates one token of it. Both servers stay up; each round measures them in turn (the order
flips every round) so that a machine shared with other work slows both alike; figures are the
medians over ``--rounds``, with the load average beside each round.

Ratios are ours / llama-server for tokens/s (>= 1: we are as fast) and llama-server / ours for
time to first token (>= 1: ours comes no later).

Usage: python bench/bench_serve_llama_cpp.py [--rounds 3] [--clients 32] [--precisions fp32 ...]
Prints the figures, the ratios and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llama_cpp import loadavg  # noqa: E402
from bench_serve import PROMPT, Fields, concurrent, sequential_single  # noqa: E402

from gpt2.checkpoint import save_checkpoint  # noqa: E402
from gpt2.config import GPTConfig, TrainConfig  # noqa: E402
from gpt2.device import cpu_name  # noqa: E402
from gpt2.model import GPT  # noqa: E402
from gpt2.serve.live import bind  # noqa: E402
from gpt2.tokenizer import GPT2Tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Our serve flags and the GGUF type of the same precision.
PRECISIONS = {
    "fp32": ([], "f32"),
    "bf16": (["--dtype", "bfloat16"], "bf16"),
    "int8": (["--quantize", "int8"], "q8_0"),
}
# The same sampling on both sides: the whole distribution at temperature 1.
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
SERVERS = ("gpt2", "llama")
PROMPT_NUMBERS = itertools.count()  # --distinct-prompts: never the same number twice in a run


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="our checkpoint (default: random GPT-2 124M)")
    p.add_argument("--precisions", nargs="+", choices=tuple(PRECISIONS), default=list(PRECISIONS))
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (and slots)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per request")
    p.add_argument("--single", type=int, default=4, help="requests in a row for 1 client")
    p.add_argument("--rounds", type=int, default=3, help="rounds of both servers (medians)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of each server")
    p.add_argument("--build", action="store_true", help="build llama-server if it is missing")
    p.add_argument(
        "--distinct-prompts",
        action="store_true",
        help="a number before each request's prompt, so that no server reuses a cached prompt",
    )
    p.add_argument("--log-dir", type=Path, help="keep the servers' logs here (default: dropped)")
    return p.parse_args()


def find_llama_server(build: bool) -> tuple[Path | None, str]:
    """The llama-server program, or None and why not."""
    script = REPO / "scripts" / "build_llama_cpp.sh"
    argv = ["bash", str(script)] + ([] if build else ["--find"])
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        if not build:
            return None, "llama-server is not built here (make llama-cpp, or pass --build)"
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"llama-server could not be built: {last}"
    server = Path(done.stdout.strip().splitlines()[-1]) / "bin" / "llama-server"
    if not server.is_file():
        return None, f"{server} is missing"
    return server, ""


def our_flags() -> set[str]:
    """The precision options this tree's ``gpt2 serve`` offers."""
    out = subprocess.run(
        [sys.executable, "-m", "gpt2", "serve", "--help"], capture_output=True, text=True
    ).stdout
    return {flag for flag in ("--dtype", "--quantize") if flag in out}


def make_checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    model = GPT(GPTConfig())  # GPT-2 124M's shape
    return save_checkpoint(folder / "gpt2-124m", model, GPT2Tokenizer(), TrainConfig())


def export_gguf(ckpt: Path, folder: Path, gguf_type: str) -> Path:
    """The checkpoint as GGUF, written by our own ``gpt2 export --format gguf``."""
    out = folder / f"gpt2-{gguf_type}.gguf"
    argv = [sys.executable, "-m", "gpt2", "-q", "export", "--format", "gguf"]
    argv += ["--gguf-type", gguf_type, "--checkpoint", str(ckpt), "--out", str(out)]
    subprocess.run(argv, check=True)
    return out


def free_port() -> int:
    with bind() as sock:  # free a moment ago; the server binds it itself
        return sock.getsockname()[1]


def thread_env(threads: int) -> dict[str, str]:
    """The environment of a server: ``threads`` OpenMP threads, whatever this process has."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


def start(cmd: list[str], env: dict[str, str], log: Path, stack: ExitStack) -> str:
    """Run a server, wait for /health, and stop it when ``stack`` closes; its URL."""
    port = free_port()
    out = log.open("w")
    proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=out, stderr=out, env=env)
    stack.callback(out.close)
    stack.callback(_stop, proc)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise SystemExit(f"{cmd[0]} exited with {proc.returncode}:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{cmd[0]} did not start in 300 s; see {log}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_ours(ckpt: Path, flags: list[str], args, log: Path, stack: ExitStack) -> str:
    n = args.clients
    cmd = [sys.executable, "-m", "gpt2", "-q", "serve", "--checkpoint", str(ckpt), "--device",
           "cpu", "--max-batch", str(n), "--max-queue", str(max(2 * n, 64)), *flags]  # fmt: skip
    return start(cmd, thread_env(args.threads), log, stack)


def start_llama(server: Path, gguf: Path, args, log: Path, stack: ExitStack) -> str:
    n, t = args.clients, str(args.threads)
    context = GPTConfig().block_size
    cmd = [str(server), "-m", str(gguf), "--host", "127.0.0.1", "-np", str(n),
           "-c", str(n * context), "-t", t, "-tb", t, "--no-webui"]  # fmt: skip
    return start(cmd, thread_env(args.threads), log, stack)


def request_fields(distinct: bool) -> Fields:
    """The body fields beyond bench_serve's: the sampling, and with ``distinct`` a prompt that
    starts with a number no request had before (llama-server reuses the longest cached prefix
    of a prompt, so the same prompt again costs it one token; ours prefills every prompt, and
    only shares a prefill between identical prompts admitted together)."""
    if not distinct:
        return SAMPLING
    return lambda: {**SAMPLING, "prompt": f"{next(PROMPT_NUMBERS)} {PROMPT}"}


def measure(url: str, args) -> dict:
    """One round of one server: 1 client, then ``--clients`` at once."""
    fields = request_fields(args.distinct_prompts)
    single = asyncio.run(sequential_single(url, args.single, args.tokens, fields))
    time.sleep(1)  # let the server's threads go idle (OpenMP and ggml spin a while)
    many = asyncio.run(concurrent(url, args.clients, args.tokens, fields))
    time.sleep(1)
    return {"single": single, "many": many, "loadavg": loadavg()}


def summary(runs: list[dict], args: argparse.Namespace) -> dict:
    """Medians over the rounds, with every round's figures and its completeness."""

    def med(part: str, key: str) -> float:
        return statistics.median(r[part][key] for r in runs)

    return {
        "single_tokens_per_s": med("single", "tokens_per_s"),
        "single_ttft_p50_ms": med("single", "ttft_p50_ms"),
        "many_tokens_per_s": med("many", "tokens_per_s"),
        "many_ttft_p50_ms": med("many", "ttft_p50_ms"),
        "many_ttft_p99_ms": med("many", "ttft_p99_ms"),
        "rounds_single_tokens_per_s": [round(r["single"]["tokens_per_s"], 1) for r in runs],
        "rounds_many_tokens_per_s": [round(r["many"]["tokens_per_s"], 1) for r in runs],
        "loadavg": [r["loadavg"] for r in runs],
        # streams that did not bring exactly --tokens tokens, over every round
        "incomplete": sum(
            args.clients - r["many"]["complete"] + args.single - r["single"]["complete"]
            for r in runs
        ),
        "errors": sum(r["many"]["errors"] for r in runs),
    }


def ratios(ours: dict, llama: dict) -> dict:
    return {
        "single_tokens_per_s": ours["single_tokens_per_s"] / llama["single_tokens_per_s"],
        "many_tokens_per_s": ours["many_tokens_per_s"] / llama["many_tokens_per_s"],
        "single_ttft": llama["single_ttft_p50_ms"] / ours["single_ttft_p50_ms"],
        "many_ttft": llama["many_ttft_p50_ms"] / ours["many_ttft_p50_ms"],
    }


def run_precision(
    name: str, ckpt: Path, ours: bool, server: Path | None, args, folder: Path
) -> dict:
    """Both servers (or the one there is) at one precision, ``--rounds`` rounds in turn."""
    flags, gguf_type = PRECISIONS[name]
    logs = {key: args.log_dir / f"{key}-{name}.log" for key in SERVERS}
    with ExitStack() as stack:
        urls = {}
        if ours:
            urls["gpt2"] = start_ours(ckpt, flags, args, logs["gpt2"], stack)
        if server is not None:
            gguf = export_gguf(ckpt, folder, gguf_type)
            urls["llama"] = start_llama(server, gguf, args, logs["llama"], stack)
        runs: dict[str, list[dict]] = {k: [] for k in urls}
        for r in range(args.rounds):
            order = list(urls) if r % 2 == 0 else list(reversed(urls))
            for key in order:
                try:
                    runs[key].append(measure(urls[key], args))
                except Exception:
                    tail = logs[key].read_text(errors="replace").splitlines()[-20:]
                    print(f"{key} failed; the end of its log:", *tail, sep="\n", file=sys.stderr)
                    raise
                print(f"  {name} round {r + 1} {key}: {_line(runs[key][-1], args)}", flush=True)
    out = {k: summary(v, args) for k, v in runs.items()}
    if len(out) == 2:
        out["ratios"] = ratios(out["gpt2"], out["llama"])
    return out


def _line(run: dict, args) -> str:
    s, m = run["single"], run["many"]
    return (
        f"1 client {s['tokens_per_s']:.1f} tok/s (TTFT {s['ttft_p50_ms']:.0f} ms), "
        f"{args.clients} clients {m['tokens_per_s']:.1f} tok/s (TTFT p50 {m['ttft_p50_ms']:.0f} "
        f"ms, {m['complete']}/{args.clients} complete), load {run['loadavg']}"
    )


def report(results: dict, skipped: list[str], args) -> None:
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; {args.threads} threads each server")
    print(f"torch {torch.__version__}; {args.tokens} tokens a request, end-of-text banned")
    for line in skipped:
        print(f"skipped: {line}")
    n = args.clients
    for name, res in results.items():
        print(f"{name}:")
        for key in ("gpt2", "llama"):
            if key not in res:
                continue
            f = res[key]
            print(
                f"  {key:6s} 1 client {f['single_tokens_per_s']:7.1f} tok/s  TTFT p50 "
                f"{f['single_ttft_p50_ms']:5.0f} ms | {n} clients {f['many_tokens_per_s']:7.1f} "
                f"tok/s  TTFT p50 {f['many_ttft_p50_ms']:5.0f} ms | {f['incomplete']} "
                f"incomplete, {f['errors']} errors"
            )
        if "ratios" in res:
            q = res["ratios"]
            print(
                f"  ours / llama-server: 1 client {q['single_tokens_per_s']:.2f}x, {n} clients "
                f"{q['many_tokens_per_s']:.2f}x; TTFT (llama / ours) {q['single_ttft']:.2f}x "
                f"and {q['many_ttft']:.2f}x"
            )
    print(
        json.dumps(
            {
                "bench": "serve_vs_llama_server",
                "cpu": cpu_name(),
                "cores": os.cpu_count(),
                "threads": args.threads,
                "clients": n,
                "tokens": args.tokens,
                "rounds": args.rounds,
                "sampling": SAMPLING,
                "skipped": skipped,
                "results": results,
            }
        )
    )


def main() -> None:
    args = parse_args()
    server, why = find_llama_server(args.build)
    skipped = [] if server is not None else [why]
    offered = our_flags()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        args.log_dir = args.log_dir or folder
        args.log_dir.mkdir(parents=True, exist_ok=True)
        ckpt = args.checkpoint or make_checkpoint(folder)
        for name in args.precisions:
            missing = [f for f in PRECISIONS[name][0] if f.startswith("--") and f not in offered]
            if missing:
                skipped.append(f"{name}: this gpt2 serve has no {missing[0]} (llama-server alone)")
                if server is None:
                    continue
            print(f"{name}: load {loadavg()}", flush=True)
            results[name] = run_precision(name, ckpt, not missing, server, args, folder)
    report(results, skipped, args)


if __name__ == "__main__":
    main()
