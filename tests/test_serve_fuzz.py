"""Property-based fuzzing of the API: whatever is sent, the answer is never a 5xx.

Two sources of requests, both against a live server on a free loopback port:

- schemathesis reads the server's own OpenAPI document and generates requests that follow it
  (positive) and that break it (negative), for every operation;
- hypothesis builds bodies around the completions fields with values of every JSON type, and
  raw bytes that are not JSON at all.

The model reads bytes (a byte-level BPE with no merges, and end-of-text, so that chat requests
generate too).

Every answer must be a 2xx, or a 4xx in OpenAI's error shape; the server must still be healthy.
"""

from __future__ import annotations

import json
import string

import pytest
import torch

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

import httpx  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gpt2.bpe import BPETokenizer  # noqa: E402
from gpt2.config import GPTConfig  # noqa: E402
from gpt2.model import GPT  # noqa: E402
from gpt2.serve.app import create_app  # noqa: E402
from gpt2.serve.limits import Limits  # noqa: E402
from gpt2.serve.live import running_server  # noqa: E402
from gpt2.serve.schemas import ChatCompletionRequest, CompletionRequest  # noqa: E402
from gpt2.tokenizer import EOT_TEXT  # noqa: E402

# A small vocabulary and context keep each valid request to a few milliseconds.
BYTES = BPETokenizer({bytes([b]): b for b in range(256)}, [], {EOT_TEXT: 256})
LIMITS = Limits(max_n=4, max_prompts=4, max_batch=8, max_queue=16)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,  # the same cases on every run: a failure is reproducible
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=48, vocab_size=BYTES.vocab_size)
    app = create_app(GPT(config).eval(), BYTES, model_name="fuzz", limits=LIMITS)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield url, http
        assert http.get("/health").json()["status"] == "ok"
        assert app.state.scheduler.stats().active == 0


OBJECTS = {"/v1/completions": "text_completion", "/v1/chat/completions": "chat.completion"}


def check(response: httpx.Response) -> None:
    """A 2xx, or a 4xx with OpenAI's error body; never a 5xx."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert error["type"] in ("invalid_request_error", "rate_limit_error")
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in response.text.split("\n") if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        for e in events[:-1]:
            assert "error" not in json.loads(e.removeprefix("data: "))
    elif response.request.url.path in OBJECTS:
        body = response.json()
        assert body["object"] == OBJECTS[response.request.url.path]
        assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])


def send(http: httpx.Client, case) -> httpx.Response:
    kwargs = case.as_transport_kwargs(base_url=str(http.base_url))
    return http.request(
        kwargs["method"],
        kwargs["url"],
        headers=kwargs.get("headers"),
        params=kwargs.get("params"),
        json=kwargs.get("json"),
        content=kwargs.get("data"),
    )


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_server_error(server, mode):
    url, http = server
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    generation = schemathesis.GenerationMode(mode)
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "GET /v1/models",
    }
    for op in operations:
        if mode == "negative" and not op.body:
            continue  # a GET's only parameter is a free string: nothing can break its schema

        @FUZZ
        @given(case=op.as_strategy(generation_mode=generation))
        def run(case) -> None:
            check(send(http, case))

        run()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
PLAUSIBLE = {
    "prompt": st.text(alphabet=string.printable, min_size=0, max_size=60)
    | st.lists(st.integers(-5, 120), max_size=8)
    | st.lists(st.text(alphabet=string.ascii_letters, max_size=5), max_size=5),
    "max_tokens": st.integers(-3, 60),
    "temperature": st.floats(-1, 3),
    "top_p": st.floats(-0.5, 1.5),
    "n": st.integers(-1, 6),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6),
    "seed": st.integers(-(2**64), 2**65),
    "logprobs": st.integers(-1, 7),
    "echo": st.booleans(),
    "stream": st.booleans(),
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3),
    "logit_bias": st.dictionaries(st.text(max_size=4), st.floats(-200, 200), max_size=3),
    "model": st.sampled_from(["fuzz", "other", ""]),
}
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", "user", "tool"]),
            "content": st.text(alphabet=string.printable, max_size=12)
            | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text()})),
        }
    ),
    min_size=1,
    max_size=3,
)
CHAT_PLAUSIBLE = {
    **PLAUSIBLE,
    "messages": MESSAGES,
    "max_completion_tokens": st.integers(-3, 60),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(-1, 22),
}
ENDPOINTS = {  # path: (its fields, plausible values, the field that makes it generate)
    "/v1/completions": (sorted(CompletionRequest.model_fields), PLAUSIBLE, "prompt"),
    "/v1/chat/completions": (
        sorted(ChatCompletionRequest.model_fields),
        CHAT_PLAUSIBLE,
        "messages",
    ),
}


@st.composite
def bodies(draw, path: str) -> dict:
    """A body of known fields with plausible values, sometimes wrong types or unknown fields."""
    fields, plausible_values, main = ENDPOINTS[path]
    body = {}
    for name in draw(st.lists(st.sampled_from([*fields, "junk"]), max_size=8, unique=True)):
        plausible = plausible_values.get(name)
        body[name] = draw(plausible | JSON_VALUES if plausible is not None else JSON_VALUES)
    if draw(st.integers(0, 3)):  # mostly with a prompt, so that some requests generate
        body.setdefault(main, draw(plausible_values[main]))
    return body


@pytest.mark.parametrize("path", sorted(ENDPOINTS))
def test_hypothesis_bodies_get_no_server_error(server, path):
    _, http = server

    @FUZZ
    @given(body=bodies(path))
    def run(body) -> None:
        check(
            http.post(
                path,
                content=json.dumps(body, allow_nan=True),
                headers={"content-type": "application/json"},
            )
        )

    run()


@FUZZ
@given(raw=st.binary(max_size=200))
def test_raw_bytes_get_no_server_error(server, raw):
    _, http = server
    check(http.post("/v1/completions", content=raw, headers={"content-type": "application/json"}))
