"""Held-out exact match of chat models, asked through OpenAI's own client as any user would.

    python scripts/chat_exact_match.py --heldout data/chat-tasks/heldout.jsonl \
        --checkpoint before=out/chat-pretrain --checkpoint after=out/chat-sft
    python scripts/chat_exact_match.py --heldout data/chat-tasks/heldout.jsonl \
        --url http://127.0.0.1:8000/v1 --model my-model          # a server already running

Each ``--checkpoint NAME=FOLDER`` is served in turn by ``gpt2 serve`` (a subprocess on a free
local port, stopped afterwards), and every held-out conversation's messages, less the last
(the assistant's answer), go to ``client.chat.completions.create(model=..., messages=...,
temperature=0, max_tokens=...)``. A reply counts when its content equals the answer exactly.
The score is printed per task family (scripts/make_chat_tasks.py) and as one JSON line at the
end, ``{"heldout": N, "results": {NAME: {"exact_match": ..., "correct": ..., "tasks": {...}}}}``.

This is the measurement of docs/chat.md's recipe ("A recipe that shows it works"): the same
questions to the model before and after supervised fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "scripts"))

from make_chat_tasks import task_of  # noqa: E402

from gpt2.chat import check_messages  # noqa: E402
from gpt2.errors import UserError  # noqa: E402
from gpt2.files import read_jsonl, write_json  # noqa: E402

START_TIMEOUT_S = 300.0  # loading a checkpoint and warming up, on a busy machine


def load_heldout(path: str) -> list[list[dict[str, str]]]:
    """The held-out conversations: each one's messages, ending with the assistant's answer."""
    if not Path(path).is_file():
        raise UserError(f"held-out file not found: {path}")
    conversations = []
    for i, record in enumerate(read_jsonl(path)):
        where = f"{path}:{i + 1}"
        messages = check_messages(record.get("messages"), f"{where}: messages")
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise UserError(f"{where}: the conversation does not end with the assistant's answer")
        conversations.append(messages)
    if not conversations:
        raise UserError(f"{path} holds no conversations")
    return conversations


def task_name(question: str) -> str:
    """The task family of a generated question, or "other" for a question from elsewhere."""
    try:
        return task_of(question)
    except ValueError:
        return "other"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(checkpoint: str, name: str, log_path: Path) -> Iterator[str]:
    """``gpt2 serve`` on ``checkpoint`` as a subprocess; yields its ``/v1`` base URL once its
    health check answers, and stops it on the way out."""
    import httpx

    if not Path(checkpoint).exists():
        raise UserError(f"checkpoint not found: {checkpoint}")
    port = free_port()
    path = [str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    command = [sys.executable, "-m", "gpt2", "serve", "--checkpoint", checkpoint]
    command += ["--port", str(port), "--model-name", name, "--device", "cpu"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
                raise UserError(f"gpt2 serve --checkpoint {checkpoint} exited: {tail[0]}")
            try:
                if httpx.get(f"{base}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise UserError(f"gpt2 serve did not answer within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        yield f"{base}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ask_all(
    base_url: str,
    model: str,
    conversations: Sequence[list[dict[str, str]]],
    max_tokens: int,
    workers: int,
    api_key: str,
) -> list[str]:
    """Every conversation's reply, greedy, through the official client (a few requests at a
    time: the server batches them, and greedy decoding gives each the same reply as alone)."""
    from openai import APIStatusError, OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120.0)

    def ask(messages: list[dict[str, str]]) -> str:
        try:
            response = client.chat.completions.create(
                model=model, messages=messages[:-1], temperature=0, max_tokens=max_tokens
            )
        except APIStatusError as e:  # the server's one-line reason (a context too small, ...)
            why = f"{model}: the server refused a question ({e.status_code}): {e.message}"
            raise UserError(why) from None
        return response.choices[0].message.content or ""

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(ask, conversations))


def score(conversations: Sequence[list[dict[str, str]]], replies: Sequence[str]) -> dict[str, Any]:
    """Exact match in all and per task family."""
    tasks: dict[str, list[int]] = {}
    for messages, reply in zip(conversations, replies, strict=True):
        counts = tasks.setdefault(task_name(messages[0]["content"]), [0, 0])
        counts[0] += reply == messages[-1]["content"]
        counts[1] += 1
    correct = sum(c for c, _ in tasks.values())
    return {
        "exact_match": round(correct / len(conversations), 4),
        "correct": correct,
        "tasks": {name: round(c / n, 4) for name, (c, n) in sorted(tasks.items())},
    }


def named_checkpoint(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER, got {text!r}")
    return name, folder


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heldout", required=True, help="held-out conversations (JSONL)")
    parser.add_argument(
        "--checkpoint",
        type=named_checkpoint,
        action="append",
        default=[],
        metavar="NAME=FOLDER",
        help="a checkpoint to serve and score under NAME (repeat for several)",
    )
    parser.add_argument("--url", help="score a server already running at this /v1 base URL")
    parser.add_argument("--model", default="gpt2", help="the model name to ask --url for")
    parser.add_argument("--api-key", default="none", help="the --url server's key, if it has one")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=8,
        help="longest reply in tokens (the tasks' answers take at most 5; the prompt and this "
        "must fit the model's context)",
    )
    parser.add_argument("--workers", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--json-out", help="also write the results to this JSON file")
    parser.add_argument("--log-dir", default=".", help="folder for each server's log")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if bool(args.url) == bool(args.checkpoint):
            raise UserError("give --url, or one or more --checkpoint NAME=FOLDER")
        if args.max_tokens < 1 or args.workers < 1:
            raise UserError("--max-tokens and --workers must be at least 1")
        conversations = load_heldout(args.heldout)
        results: dict[str, Any] = {}
        for name, source in args.checkpoint or [(args.model, args.url)]:
            started = time.monotonic()
            log = Path(args.log_dir) / f"serve-{name}.log"
            server = nullcontext(args.url) if args.url else served(source, name, log)
            with server as url:
                replies = ask_all(
                    url, name, conversations, args.max_tokens, args.workers, args.api_key
                )
            results[name] = score(conversations, replies)
            results[name]["seconds"] = round(time.monotonic() - started, 1)
            report(name, source, results[name], replies, conversations)
        summary = {"heldout": len(conversations), "max_tokens": args.max_tokens, "results": results}
        if args.json_out:
            write_json(args.json_out, summary)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


def report(
    name: str,
    source: str,
    result: dict[str, Any],
    replies: Sequence[str],
    conversations: Sequence[list[dict[str, str]]],
) -> None:
    """A few lines a reader can check: the score, per task, and one reply."""
    n = len(conversations)
    print(
        f"{name} ({source}): held-out exact match {result['correct']}/{n} = "
        f"{result['exact_match']:.1%}"
    )
    for task, value in result["tasks"].items():
        print(f"  {task:<16} {value:.1%}")
    question, answer = conversations[0][0]["content"], conversations[0][-1]["content"]
    print(f"  e.g. {question!r} -> {replies[0]!r} (answer {answer!r})")


if __name__ == "__main__":
    sys.exit(main())
