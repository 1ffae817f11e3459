"""scripts/chat_exact_match.py: a checkpoint served by ``gpt2 serve`` and asked every held-out
question through OpenAI's client scores exactly the replies the model gives in-process."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from test_generate_cli import random_checkpoint

from gpt2.chat import prompt_ids, reply_content, reply_lead
from gpt2.checkpoint import load_model
from gpt2.generate import SamplingParams, complete
from gpt2.tokenizer import GPT2Tokenizer

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
MAX_TOKENS = 6


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scorer():
    return load_script("chat_exact_match")


def greedy_reply(model, tok, messages) -> str:
    """What the model says in-process, as the server's content: greedy, less the lead."""
    params = SamplingParams(temperature=0.0, max_new_tokens=MAX_TOKENS)
    (done,) = complete(model, [prompt_ids(tok, messages)], params, tok)
    return reply_content(done.text, reply_lead(tok, messages))


def test_served_checkpoint_scores_its_own_greedy_replies(scorer, tmp_path, capsys):
    tok = GPT2Tokenizer()
    ckpt = random_checkpoint(tmp_path / "ckpt", tok, 64)
    model, _ = load_model(ckpt)
    _, heldout = load_script("make_chat_tasks").make_sets(0, 1, 1)
    heldout = heldout[:4]
    lines = []
    for i, c in enumerate(heldout):
        reply = greedy_reply(model, tok, c["messages"][:1])
        assert reply != c["messages"][1]["content"]  # a random model: wrong
        answer = reply if i < 2 else c["messages"][1]["content"]  # two right, two wrong
        lines.append(
            json.dumps({"messages": [c["messages"][0], {"role": "assistant", "content": answer}]})
        )
    (tmp_path / "heldout.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--heldout", str(tmp_path / "heldout.jsonl"), "--checkpoint", f"rand={ckpt}"]
    args += ["--max-tokens", str(MAX_TOKENS), "--log-dir", str(tmp_path)]
    assert scorer.main(args) == 0, (tmp_path / "serve-rand.log").read_text()
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["heldout"] == 4
    assert summary["results"]["rand"]["correct"] == 2
    assert summary["results"]["rand"]["exact_match"] == 0.5


def test_bad_input_is_one_line(scorer, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert scorer.main(["--heldout", str(bad), "--url", "http://127.0.0.1:9/v1"]) == 1
    assert "does not end with the assistant's answer" in capsys.readouterr().err
    args = ["--heldout", str(bad), "--checkpoint", f"x={tmp_path / 'none'}"]
    assert scorer.main(args) == 1
    assert "error:" in capsys.readouterr().err
    assert scorer.main(["--heldout", str(tmp_path / "missing.jsonl"), "--url", "u"]) == 1
    assert "file not found" in capsys.readouterr().err
