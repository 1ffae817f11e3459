"""The playground, end to end, in headless Chromium: type a prompt, press Generate, watch it stream.

Debian's ``chromium`` package is driven through Playwright (its own browser download needs a
network). Without chromium the test is skipped, except in CI (``CI`` set), where it must run.
"""

from __future__ import annotations

import os
import shutil
import threading

import pytest
import torch

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from gpt2.config import GPTConfig  # noqa: E402
from gpt2.decode import KVCacheEngine  # noqa: E402
from gpt2.model import GPT  # noqa: E402
from gpt2.serve.app import create_app  # noqa: E402
from gpt2.serve.live import running_server  # noqa: E402
from gpt2.tokenizer import GPT2Tokenizer  # noqa: E402

CHROMIUM = os.environ.get("GPT2_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 30_000


class StepByStep(KVCacheEngine):
    """Each decode step waits for the test's go-ahead, so text can be seen arriving mid-stream."""

    def __init__(self, model: GPT, slots: int) -> None:
        super().__init__(model, slots)
        self.go = threading.Event()

    def decode(self, slots, ids):
        if not self.go.wait(WAIT_MS / 1000):
            raise RuntimeError("the test never let decoding go on")
        return super().decode(slots, ids)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"chromium not found at {CHROMIUM}: .ci/run installs Debian's chromium")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=WAIT_MS)
        yield b
        b.close()


def test_playground_streams_coloured_tokens_with_alternatives(browser):
    tok = GPT2Tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=tok.vocab_size))
    engine = StepByStep(model.eval(), slots=2)
    app = create_app(model, tok, model_name="tiny-browser", engine=engine)
    with running_server(app) as url:
        page = browser.new_page()
        try:
            page.goto(url, timeout=WAIT_MS)
            sync_api.expect(page.locator("#model")).to_contain_text("tiny-browser", timeout=WAIT_MS)
            page.fill("#max_tokens", "12")
            page.fill("#seed", "3")
            page.fill("#prompt", "Once upon a time")
            page.click("#generate")

            # The first token (from the prefill) is on the page while decoding is held: streamed.
            tokens = page.locator("#output .tok")
            sync_api.expect(tokens).to_have_count(1, timeout=WAIT_MS)
            assert page.locator("#generate").is_disabled()
            assert page.locator("#stop").is_enabled()
            assert page.locator("#output .prompt").inner_text() == "Once upon a time"

            engine.go.set()
            sync_api.expect(page.locator("#stats")).to_contain_text("finished", timeout=WAIT_MS)
            assert page.locator("#error").is_hidden()
            count = tokens.count()
            assert 1 < count <= 12
            output = page.locator("#output").inner_text()
            assert output.startswith("Once upon a time") and len(output) > len("Once upon a time")

            # Each token is coloured by its probability and shows its alternatives on hover.
            first = tokens.nth(0)
            assert first.evaluate("el => el.style.background") != ""
            first.hover()
            tooltip = page.locator("#tooltip")
            sync_api.expect(tooltip).to_be_visible(timeout=WAIT_MS)
            assert 5 <= tooltip.locator("tr").count() <= 6  # 5 alternatives (+ the chosen one)
            assert tooltip.locator("tr.chosen").count() == 1
        finally:
            engine.go.set()
            page.close()


def test_playground_shows_the_servers_error_message(browser):
    tok = GPT2Tokenizer()
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=tok.vocab_size))
    with running_server(create_app(model.eval(), tok)) as url:
        page = browser.new_page()
        try:
            page.goto(url, timeout=WAIT_MS)
            page.fill("#max_tokens", "500")
            page.fill("#prompt", "Hello")
            page.click("#generate")
            error = page.locator("#error")
            sync_api.expect(error).to_contain_text("max_tokens must be at most 16", timeout=WAIT_MS)
            assert page.locator("#generate").is_enabled()
        finally:
            page.close()


def test_playground_chat_streams_replies_keeps_the_history_stops_and_resets(browser):
    tok = GPT2Tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=tok.vocab_size))
    engine = StepByStep(model.eval(), slots=2)
    app = create_app(model, tok, model_name="tiny-chat", engine=engine)
    system = {"role": "system", "content": "Be terse."}
    with running_server(app) as url:
        page = browser.new_page()
        try:
            page.goto(url, timeout=WAIT_MS)
            sync_api.expect(page.locator("#model")).to_contain_text("tiny-chat", timeout=WAIT_MS)
            page.click("#tab_chat")
            assert page.locator("#complete_view").is_hidden()
            page.fill("#max_tokens", "6")
            page.fill("#seed", "3")
            page.fill("#system", "Be terse.")

            def say(text: str) -> dict:
                """Type ``text`` and press Enter; the request the page sent."""
                page.fill("#chat_input", text)
                with page.expect_request("**/v1/chat/completions") as request:
                    page.press("#chat_input", "Enter")
                return request.value.post_data_json

            # The reply's first token (from the prefill) is on the page while decoding is held.
            sent = say("Hello")
            assert sent["messages"] == [system, {"role": "user", "content": "Hello"}]
            assert sent["stream"] is True and sent["logprobs"] is True
            reply = page.locator("#chat_log .msg.assistant .text").last
            sync_api.expect(reply.locator(".tok")).to_have_count(1, timeout=WAIT_MS)
            assert page.locator("#send").is_disabled() and page.locator("#chat_stop").is_enabled()
            assert page.locator("#chat_log .msg.user .text").inner_text() == "Hello"
            assert page.locator("#chat_input").input_value() == ""

            engine.go.set()
            stats = page.locator("#chat_stats")
            sync_api.expect(stats).to_contain_text("finished", timeout=WAIT_MS)
            first = reply.text_content()
            assert first and 1 < reply.locator(".tok").count() <= 6
            reply.locator(".tok").nth(0).hover()
            sync_api.expect(page.locator("#tooltip")).to_be_visible(timeout=WAIT_MS)

            # The next request carries the history, the reply as it was shown.
            sent = say("And then?")
            assert sent["messages"] == [
                system,
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": first},
                {"role": "user", "content": "And then?"},
            ]
            sync_api.expect(stats).to_contain_text("finished", timeout=WAIT_MS)

            # Stop: the reply ends where it was, and stays in the history.
            engine.go.clear()
            say("More")
            sync_api.expect(reply.locator(".tok")).to_have_count(1, timeout=WAIT_MS)
            page.click("#chat_stop")
            sync_api.expect(stats).to_contain_text("stopped", timeout=WAIT_MS)
            assert page.locator("#send").is_enabled()
            stopped = reply.text_content()
            engine.go.set()
            sent = say("Go on")
            assert sent["messages"][-2:] == [
                {"role": "assistant", "content": stopped},
                {"role": "user", "content": "Go on"},
            ]
            sync_api.expect(stats).to_contain_text("finished", timeout=WAIT_MS)

            # Reset: an empty log, and the next request has the system prompt and itself only.
            page.click("#reset")
            assert page.locator("#chat_log .msg").count() == 0
            sent = say("Hi again")
            assert sent["messages"] == [system, {"role": "user", "content": "Hi again"}]
            sync_api.expect(stats).to_contain_text("finished", timeout=WAIT_MS)

            # A refused request shows the server's message and gives the text back.
            page.fill("#max_tokens", "500")
            say("Too long a reply")
            error = page.locator("#chat_error")
            sync_api.expect(error).to_contain_text("max_tokens must be at most 64", timeout=WAIT_MS)
            assert page.locator("#chat_input").input_value() == "Too long a reply"
            assert page.locator("#chat_log .msg").count() == 2  # the exchange before
        finally:
            engine.go.set()
            page.close()
