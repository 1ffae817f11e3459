"""One checkpoint, prompt, settings and seed give the same text from ``gpt2 sample`` (the command
line), `gpt2.generate.complete` (the library) and ``POST /v1/completions`` (the server), and
``n`` choices are the samples of ``--num-samples``: the three share one decode loop and one
sampler seeded per sequence.

The model is random, its weights drawn at std 0.3 so that its distributions are broad: a draw
that differed anywhere (another generator, another order of cuts) would change the text.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from gpt2.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from gpt2.cli import main  # noqa: E402
from gpt2.config import GPTConfig, TrainConfig  # noqa: E402
from gpt2.decode_layout import prepare_for_decoding  # noqa: E402
from gpt2.generate import SamplingParams, complete  # noqa: E402
from gpt2.model import GPT  # noqa: E402
from gpt2.serve.app import create_app  # noqa: E402
from gpt2.tokenizer import CharTokenizer  # noqa: E402

PROMPT = "ROMEO:"
SETTINGS = [  # (command-line flags, the same as request fields)
    ({"--temperature": "0.9", "--top-p": "0.95"}, {"temperature": 0.9, "top_p": 0.95}),
    (
        {"--temperature": "1.2", "--top-k": "12", "--min-p": "0.02", "--repetition-penalty": "1.3"},
        {"temperature": 1.2, "top_k": 12, "min_p": 0.02, "repetition_penalty": 1.3},
    ),
    (
        {"--temperature": "0.7", "--top-k": "0", "--presence-penalty": "0.5"},
        {"temperature": 0.7, "presence_penalty": 0.5, "frequency_penalty": 0.0},
    ),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ :,.!?'\n")
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=tok.vocab_size)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return save_checkpoint(tmp_path_factory.mktemp("same_seed") / "ckpt", model, tok, TrainConfig())


@pytest.fixture(scope="module")
def loaded(ckpt: Path):
    """The checkpoint as ``gpt2 sample`` and ``gpt2 serve`` load it: laid out for decoding."""
    c = load_checkpoint(ckpt, torch.device("cpu"))
    return prepare_for_decoding(c.model), c.tokenizer


def cli_texts(capsys, ckpt: Path, flags: dict[str, str], n: int, seed: int) -> list[str]:
    args = ["sample", "--checkpoint", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "40"]
    args += [x for kv in flags.items() for x in kv] + ["--seed", str(seed)]
    assert main([*args, "--num-samples", str(n)]) == 0
    out = capsys.readouterr().out
    # One sample is printed bare; several each under a "--- sample i ---" line.
    samples = [out] if n == 1 else [s.split("\n", 1)[1] for s in out.split("--- sample ")[1:]]
    assert all(s.startswith(PROMPT) and s.endswith("\n") for s in samples)
    return [s[len(PROMPT) : -1] for s in samples]


@pytest.mark.parametrize(("flags", "fields"), SETTINGS)
def test_cli_library_and_http_give_the_same_text(ckpt, loaded, capsys, flags, fields) -> None:
    model, tok = loaded
    n, seed = 3, 5
    cli = cli_texts(capsys, ckpt, flags, n, seed)
    params = SamplingParams(max_new_tokens=40, seed=seed, num_return_sequences=n, **fields)
    if "top_k" not in fields:  # the command line's default is 200 (0: all): above this vocabulary
        params = SamplingParams(**{**params.__dict__, "top_k": 200})
    library = [c.text for c in complete(model, [PROMPT], params, tok)]
    with TestClient(create_app(model, tok)) as client:
        body = {"prompt": PROMPT, "max_tokens": 40, "n": n, "seed": seed, **fields}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        http = [c["text"] for c in r.json()["choices"]]
        one = client.post("/v1/completions", json={**body, "n": 1}).json()["choices"][0]["text"]
    assert cli == library == http
    assert len(set(cli)) == n  # n different samples...
    assert one == cli[0] == cli_texts(capsys, ckpt, flags, 1, seed)[0]  # ...the first is n=1's
    assert cli_texts(capsys, ckpt, flags, 1, seed + 1)[0] == cli[1]  # sample j: seed + j
