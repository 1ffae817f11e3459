"""The HTTP API: OpenAI's shapes, the official client, streaming, batching, limits and bad input.

A tiny model with random weights and GPT-2's tokenizer stands in for a trained one: what is
checked is the server (ids against the model run directly, shapes, statuses), not the text.
Servers bind 127.0.0.1 on a free port and are shut down by each test.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable

import pytest
import torch

pytest.importorskip("fastapi")

import httpx  # noqa: E402
from cache_free import cache_free_greedy  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from gpt2.config import GPTConfig  # noqa: E402
from gpt2.decode import KVCacheEngine  # noqa: E402
from gpt2.model import GPT  # noqa: E402
from gpt2.serve.app import create_app  # noqa: E402
from gpt2.serve.limits import Limits  # noqa: E402
from gpt2.serve.live import running_server  # noqa: E402
from gpt2.tokenizer import GPT2Tokenizer  # noqa: E402

CONTEXT = 64
WAIT_S = 30.0  # the most any poll below waits before the test fails
EOT = 50256


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(
        n_layer=2, n_head=2, n_embd=32, block_size=CONTEXT, vocab_size=tok.vocab_size
    )
    return GPT(config).eval()


@pytest.fixture(scope="module")
def client(model, tok):
    with TestClient(create_app(model, tok, model_name="tiny")) as c:
        yield c


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]


def poll(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        threading.Event().wait(0.01)


def hung_up(scheduler) -> bool:
    """The server has seen a client leave: its sequence is marked, or already dropped (when the
    worker saw the mark before its next step)."""
    stats = scheduler.stats()
    return stats.cancelling == 1 or stats.active == 0


class GatedEngine(KVCacheEngine):
    """Decode steps wait for the test to open the gate: a request stays in flight on demand."""

    def __init__(self, model: GPT, slots: int) -> None:
        super().__init__(model, slots)
        self.gate = threading.Event()

    def decode(self, slots, ids):
        if not self.gate.wait(WAIT_S):
            raise RuntimeError("the test never opened the gate")
        return super().decode(slots, ids)


# --- the completions API ------------------------------------------------------------------


def test_greedy_completion_matches_the_model_and_reports_usage(client, model, tok):
    r = client.post(
        "/v1/completions", json={"prompt": "Hello world", "max_tokens": 12, "temperature": 0}
    )
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    prompt = tok.encode("Hello world")
    ids = cache_free_greedy(model, prompt, 12)
    if EOT in ids:
        ids = ids[: ids.index(EOT)]
    assert choice["text"] == tok.decode(ids)
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 12, "total_tokens": 14}


def test_seed_repeats_and_n_choices_differ(client):
    req = {"prompt": "The", "max_tokens": 8, "n": 3, "seed": 42, "temperature": 1.0}
    a = client.post("/v1/completions", json=req).json()
    b = client.post("/v1/completions", json=req).json()
    texts = [c["text"] for c in a["choices"]]
    assert texts == [c["text"] for c in b["choices"]]
    assert len(set(texts)) == 3
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]


def test_several_prompts_and_token_id_prompts(client, tok):
    ids = tok.encode("Once upon")
    r = client.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2, "max_tokens": 3})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
    r1 = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 5, "temperature": 0})
    r2 = client.post(
        "/v1/completions", json={"prompt": "Once upon", "max_tokens": 5, "temperature": 0}
    )
    assert r1.json()["choices"][0]["text"] == r2.json()["choices"][0]["text"]
    r3 = client.post(
        "/v1/completions", json={"prompt": [ids, ids[:1]], "max_tokens": 2, "echo": True}
    )
    assert [c["text"][: len("Once")] for c in r3.json()["choices"]] == ["Once", "Once"]
    assert r3.json()["usage"]["prompt_tokens"] == len(ids) + 1


def test_echo_with_logprobs_scores_prompt_and_completion(client, model, tok):
    prompt = "The quick brown fox"
    r = client.post(
        "/v1/completions",
        json={"prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": True},
    )
    (choice,) = r.json()["choices"]
    lp = choice["logprobs"]
    ids = tok.encode(prompt)
    gen = cache_free_greedy(model, ids, 4)
    assert choice["text"].startswith(prompt)
    assert lp["tokens"] == [tok.decode([t]) for t in ids + gen]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids + gen]))
    ref = torch.log_softmax(logits[0], dim=-1)
    for t in range(1, len(ids) + 4):
        assert lp["token_logprobs"][t] == pytest.approx(ref[t - 1, (ids + gen)[t]].item(), abs=1e-4)
        top = lp["top_logprobs"][t]
        assert 2 <= len(top) <= 3  # two alternatives, plus the chosen token if not among them
        assert max(top.values()) == pytest.approx(ref[t - 1].max().item(), abs=1e-4)
    offsets = lp["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert all(choice["text"][o:].startswith(t) for o, t in zip(offsets, lp["tokens"], strict=True))


def test_stop_string_ends_the_choice_without_the_stop_text(client, model, tok):
    ids = tok.encode("It was")
    full = tok.decode(cache_free_greedy(model, ids, 20))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    r = client.post(
        "/v1/completions",
        json={"prompt": "It was", "max_tokens": 20, "temperature": 0, "stop": [stop]},
    )
    (choice,) = r.json()["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == full[: full.index(stop)]
    assert r.json()["usage"]["completion_tokens"] < 20


def test_end_of_text_stops_and_max_tokens_zero_returns_the_prompt(client):
    r = client.post(
        "/v1/completions",
        json={"prompt": "Hi", "max_tokens": 10, "logit_bias": {str(EOT): 100}, "temperature": 0},
    )
    (choice,) = r.json()["choices"]
    assert (choice["text"], choice["finish_reason"]) == ("", "stop")
    assert r.json()["usage"]["completion_tokens"] == 1
    r = client.post("/v1/completions", json={"prompt": "Hi there", "max_tokens": 0, "echo": True})
    assert r.json()["choices"][0]["text"] == "Hi there"
    assert r.json()["usage"]["completion_tokens"] == 0


def test_stream_sends_the_same_text_in_chunks_then_done(client):
    req = {"prompt": "Hello", "max_tokens": 10, "temperature": 0, "logprobs": 1}
    whole = client.post("/v1/completions", json=req).json()["choices"][0]
    r = client.post(
        "/v1/completions", json={**req, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    *text_chunks, usage_chunk = chunks
    assert len(text_chunks) > 1
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == whole["text"]
    assert [c["choices"][0]["finish_reason"] for c in text_chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])
    streamed_tokens = [t for c in text_chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    assert streamed_tokens == whole["logprobs"]["tokens"]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 10


def test_models_health_and_playground(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["context_length"] == CONTEXT
    assert client.get("/v1/models/tiny").status_code == 200
    assert client.get("/health").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and 'id="generate"' in page.text
    assert client.get("/static/playground.js").status_code == 200


# --- bad input ----------------------------------------------------------------------------

BAD_REQUESTS = [
    ("invalid JSON", b'{"prompt": "x", ', 400, "invalid_json"),
    ("not an object", b"[1, 2]", 400, None),
    ("prompt a number", b'{"prompt": 5}', 400, None),
    ("max_tokens a string", b'{"prompt": "x", "max_tokens": "5"}', 400, None),
    ("temperature a string", b'{"prompt": "x", "temperature": "hot"}', 400, None),
    ("stream an int", b'{"prompt": "x", "stream": 1}', 400, None),
    ("unknown field", b'{"prompt": "x", "colour": "red"}', 400, None),
    ("missing prompt", b'{"max_tokens": 3}', 400, None),
    ("negative max_tokens", b'{"prompt": "x", "max_tokens": -1}', 400, None),
    ("huge max_tokens", b'{"prompt": "x", "max_tokens": 1000000000}', 400, None),
    (
        "max_tokens past the context",
        b'{"prompt": "x", "max_tokens": 64}',
        400,
        "context_length_exceeded",
    ),
    ("empty prompt", b'{"prompt": ""}', 400, None),
    ("empty prompt list", b'{"prompt": []}', 400, None),
    (
        "oversize prompt",
        json.dumps({"prompt": "word " * 200}).encode(),
        400,
        "context_length_exceeded",
    ),
    ("token id out of range", b'{"prompt": [1, 99999999]}', 400, None),
    ("n above the limit", b'{"prompt": "x", "n": 9}', 400, None),
    ("n zero", b'{"prompt": "x", "n": 0}', 400, None),
    ("temperature above 2", b'{"prompt": "x", "temperature": 2.5}', 400, None),
    ("NaN top_p", b'{"prompt": "x", "top_p": NaN}', 400, None),
    ("too many stops", b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, None),
    ("logprobs above 5", b'{"prompt": "x", "logprobs": 6}', 400, None),
    ("bad logit_bias key", b'{"prompt": "x", "logit_bias": {"abc": 1}}', 400, None),
    ("special token in text", b'{"prompt": "a<|endoftext|>b"}', 400, None),
    ("unknown model", b'{"prompt": "x", "model": "gpt-5"}', 404, "model_not_found"),
    ("suffix", b'{"prompt": "x", "suffix": "end"}', 400, None),
]


@pytest.mark.parametrize(
    ("body", "status", "code"), [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_requests_get_a_4xx_in_openais_error_shape(client, body, status, code):
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code
    assert client.get("/health").status_code == 200


def test_unknown_route_and_wrong_method(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = client.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    assert client.get("/v1/models/other").status_code == 404


def test_api_key_is_required_on_the_api_only(model, tok):
    with TestClient(create_app(model, tok, api_key="s3cret")) as c:
        req = {"prompt": "x", "max_tokens": 1}
        r = c.post("/v1/completions", json=req)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = c.post("/v1/completions", json=req, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["message"] == "incorrect API key"
        assert c.get("/v1/models", headers={"Authorization": "s3cret"}).status_code == 401
        r = c.post("/v1/completions", json=req, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200


def test_body_over_the_limit_is_refused_with_or_without_a_length(model, tok):
    app = create_app(model, tok, limits=Limits(max_body_bytes=1000))
    with TestClient(app) as c:
        big = json.dumps({"prompt": "x" * 2000}).encode()
        r = c.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunked():
            yield big[:600]
            yield big[600:]

        r = c.post(
            "/v1/completions", content=chunked(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


# --- a real server: the openai client, batching, the queue, disconnects --------------------


def test_the_official_openai_client_works_streaming_and_not(model, tok):
    openai = pytest.importorskip("openai")
    with running_server(create_app(model, tok, model_name="tiny", api_key="k")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=WAIT_S)
        assert [m.id for m in client.models.list()] == ["tiny"]
        out = client.completions.create(
            model="tiny", prompt="Hello", max_tokens=6, temperature=0, logprobs=2
        )
        assert out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == 6
        assert len(out.choices[0].logprobs.tokens) == 6
        stream = client.completions.create(
            model="tiny", prompt="Hello", max_tokens=6, temperature=0, stream=True
        )
        pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
        assert "".join(pieces) == out.choices[0].text and len(pieces) > 1
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny", prompt="x", max_tokens=1)
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.completions.create(model="tiny", prompt="x", max_tokens=-1)


def test_concurrent_requests_share_decode_steps(model, tok):
    app = create_app(model, tok, limits=Limits(max_batch=8))
    results: list[str] = []
    with running_server(app) as url:

        def one(i: int) -> None:
            r = httpx.post(
                f"{url}/v1/completions",
                json={"prompt": f"Request {i}", "max_tokens": 30, "temperature": 0},
                timeout=WAIT_S,
            )
            results.append(r.json()["choices"][0]["text"])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        stats = app.state.scheduler.stats()
    assert len(results) == 8
    assert stats.largest_batch > 1
    assert stats.decode_steps < stats.decoded_tokens  # steps were shared


def test_the_event_loop_answers_while_the_model_works_and_a_full_queue_is_429(model, tok):
    engine = GatedEngine(model, slots=1)
    app = create_app(model, tok, limits=Limits(max_batch=1, max_queue=1), engine=engine)
    req = {"prompt": "x", "max_tokens": 20, "stream": True}
    with running_server(app) as url, httpx.Client(base_url=url, timeout=WAIT_S) as http:
        scheduler = app.state.scheduler
        try:
            with http.stream("POST", "/v1/completions", json=req) as first:
                assert first.status_code == 200
                poll(lambda: scheduler.stats().active == 1, "the first request to start")
                # the worker is stuck in a decode step: the loop still answers
                assert http.get("/health").json()["active"] == 1
                with http.stream("POST", "/v1/completions", json=req) as second:
                    assert second.status_code == 200  # queued
                    third = http.post("/v1/completions", json=req)
                    assert third.status_code == 429
                    assert third.json()["error"]["type"] == "rate_limit_error"
                    engine.gate.set()
                    assert sse_events(second.read().decode())[-1] == "[DONE]"
                assert sse_events(first.read().decode())[-1] == "[DONE]"
        finally:
            engine.gate.set()


def test_a_client_that_disconnects_stops_its_generation(model, tok):
    engine = GatedEngine(model, slots=4)
    app = create_app(model, tok, engine=engine)
    scheduler = app.state.scheduler
    with running_server(app) as url:
        try:
            # streaming: read the first chunk, then hang up
            with httpx.Client(base_url=url, timeout=WAIT_S) as http:
                req = {"prompt": "x", "max_tokens": 60, "stream": True}
                with http.stream("POST", "/v1/completions", json=req) as r:
                    next(r.iter_lines())
                    # the first line can leave before the scheduler counts the sequence active
                    poll(lambda: scheduler.stats().active == 1, "the stream to start")
            poll(lambda: hung_up(scheduler), "the server to see the hang-up")
            engine.gate.set()  # the step in progress ends; the sequence is dropped before the next
            poll(lambda: scheduler.stats().active == 0, "the streamed sequence to be dropped")
            assert scheduler.stats().decoded_tokens <= 1

            # not streaming: send the request on a raw socket, then close it
            engine.gate.clear()
            host, port = url.removeprefix("http://").split(":")
            body = json.dumps({"prompt": "x", "max_tokens": 60}).encode()
            with socket.create_connection((host, int(port)), timeout=WAIT_S) as s:
                s.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                poll(lambda: scheduler.stats().active == 1, "the request to start")
            poll(lambda: hung_up(scheduler), "the server to see the hang-up")
            engine.gate.set()
            poll(lambda: scheduler.stats().active == 0, "the abandoned sequence to be dropped")
            assert scheduler.stats().decoded_tokens <= 2  # one step each, not 2 x 60 tokens
        finally:
            engine.gate.set()


# --- the command line -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(model, tok, tmp_path_factory) -> str:
    from gpt2.checkpoint import save_checkpoint
    from gpt2.config import TrainConfig

    return str(
        save_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-ckpt", model, tok, TrainConfig())
    )


def test_gpt2_serve_starts_answers_and_stops(checkpoint):
    import queue
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "gpt2", "serve", "--checkpoint", checkpoint, "--port", "0"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = lines.get(timeout=60)
            if "serving" in line:  # serving tiny-ckpt on http://127.0.0.1:PORT (playground at /)
                url = line.split(" on ")[1].split()[0]
        assert url is not None and url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{url}/health", timeout=WAIT_S).json()["model"] == "tiny-ckpt"
        r = httpx.post(
            f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=WAIT_S
        )
        assert r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.terminate()
        # uvicorn shuts down gracefully, then lets SIGTERM end the process as it would have
        assert proc.wait(timeout=WAIT_S) in (0, -signal.SIGTERM)
    rest = []
    while not lines.empty():
        rest.append(lines.get())
    assert "Traceback" not in "".join(rest)


def test_gpt2_serve_bad_options_are_one_line(checkpoint, tmp_path, capsys):
    from gpt2.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "missing")]) == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "--checkpoint", checkpoint, "--port", port]) == 2
    assert main(["serve", "--checkpoint", checkpoint, "--max-n", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("gpt2 serve: error: ") for line in err)
    assert "cannot listen on 127.0.0.1:" in err[1] and "--max-n must be at least 1" in err[2]
