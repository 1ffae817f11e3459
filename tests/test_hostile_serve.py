"""Hostile requests to the server: each is refused by its sizes alone, before any per-id work,
with a 4xx in OpenAI's error shape, and the server keeps answering."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from gpt2.config import GPTConfig  # noqa: E402
from gpt2.model import GPT  # noqa: E402
from gpt2.serve import completions  # noqa: E402
from gpt2.serve.app import create_app  # noqa: E402
from gpt2.serve.limits import Limits  # noqa: E402
from gpt2.tokenizer import CharTokenizer  # noqa: E402

CONTEXT = 32
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer("abcdefghij ")


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=CONTEXT, vocab_size=11)
    return GPT(config).eval()


@pytest.fixture(scope="module")
def client(model, tok):
    with TestClient(create_app(model, tok, limits=Limits(max_queued_tokens=40))) as c:
        yield c


OVERSIZE = [
    ("200000 ids", {"prompt": [1] * 200_000}, "context_length_exceeded"),
    ("ids one past the context", {"prompt": [1] * (CONTEXT + 1)}, "context_length_exceeded"),
    ("a long text", {"prompt": "a" * 100_000}, "context_length_exceeded"),
    ("one long text of several", {"prompt": ["a", "b" * 50_000]}, "context_length_exceeded"),
    ("one long id list of several", {"prompt": [[1], [2] * 50_000]}, "context_length_exceeded"),
    ("100000 prompts", {"prompt": [[1]] * 100_000}, None),
    ("100000 texts", {"prompt": ["a"] * 100_000}, None),
]


@pytest.mark.parametrize(("body", "code"), [o[1:] for o in OVERSIZE], ids=[o[0] for o in OVERSIZE])
def test_an_oversize_prompt_is_refused_before_any_per_id_work(client, monkeypatch, body, code):
    def no_work(*args, **kwargs):
        raise AssertionError("the prompt was encoded or decoded before it was refused")

    monkeypatch.setattr(completions, "_encode", no_work)
    r = client.post("/v1/completions", content=json.dumps(body), headers=JSON)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "prompt" and error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code
    assert str(CONTEXT) in error["message"] or "prompts" in error["message"]
    assert client.get("/health").status_code == 200


def test_a_prompt_that_fits_still_gets_its_completion(client):
    r = client.post("/v1/completions", json={"prompt": [1] * (CONTEXT - 2), "max_tokens": 2})
    assert r.status_code == 200, r.text
    r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "body", [b"", b"   ", b"[" * 100_000 + b"]" * 100_000, b"null", b'{"prompt": 5}']
)
def test_empty_deep_or_odd_bodies_get_a_sentence(client, body):
    r = client.post("/v1/completions", content=body, headers=JSON)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "None" not in message and message
    if not body:
        assert "empty" in message


def test_too_many_queued_tokens_is_a_429(client):
    # 4 choices x (8 prompt + 8 new) = 64 tokens > the 40 this server queues
    r = client.post("/v1/completions", json={"prompt": "abcdefgh", "max_tokens": 8, "n": 4})
    assert r.status_code == 429, r.text
    assert "tokens waiting" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": "abcdefgh", "max_tokens": 8, "n": 2})
    assert r.status_code == 200, r.text


def test_the_kv_cache_line_shows_a_unit_that_is_not_zero():
    from gpt2.commands.serve import _size

    assert _size(2 * 1 * 32 * 8 * 4) == "2.0 KiB"
    assert _size(2 * 12 * 1024 * 768 * 4) == "72.0 MiB"
    assert _size(100) == "100 bytes"
