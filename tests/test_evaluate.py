"""Evaluation: perplexity against transformers, HellaSwag and LAMBADA scoring on hand-made files
with a model trained to prefer known endings, and ``gpt2 eval`` end to end."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2 import evaluate
from gpt2.checkpoint import load_checkpoint, save_checkpoint
from gpt2.cli import main
from gpt2.config import GPTConfig, TrainConfig
from gpt2.errors import UserError
from gpt2.evaluate import (
    RowScores,
    evaluate_task,
    hellaswag_preprocess,
    load_task,
    sliding_windows,
)
from gpt2.model import GPT
from gpt2.shards import shard_header
from gpt2.tokenizer import CharTokenizer, GPT2Tokenizer

DATA = Path(__file__).parent / "data"
HELLASWAG = DATA / "hellaswag_tiny.jsonl"
LAMBADA = DATA / "lambada_tiny.jsonl"
TEXT = DATA / "eval_tiny.txt"
BLOCK = 64


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def training_text() -> str:
    """What the overfit model memorises: each HellaSwag context with the ending its ``trained``
    field names, each LAMBADA context with its ``trained`` word, and the perplexity text.

    The files were written so that two of three items' answers are the trained ones: item 3 of
    the HellaSwag file is labelled with an ending the model was not taught, and item 3 of the
    LAMBADA file ends in a word the model was not taught.
    """
    lines = [f"{item['ctx']} {item['endings'][item['trained']]}" for item in jsonl(HELLASWAG)]
    lines += [f"{item['text'].rsplit(' ', 1)[0]} {item['trained']}" for item in jsonl(LAMBADA)]
    lines += TEXT.read_text(encoding="utf-8").splitlines()
    return "\n".join(lines) + "\n"


def vocabulary() -> str:
    return (
        training_text()
        + HELLASWAG.read_text(encoding="utf-8")
        + LAMBADA.read_text(encoding="utf-8")
    )


def _training_batch(tok: CharTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Every line of `training_text` as a row starting at position 0 (cut to the block from the
    left, as evaluation cuts it), padded with targets of -1 (not scored)."""
    lines = [tok.encode(line)[-(BLOCK + 1) :] for line in training_text().splitlines()]
    x = torch.zeros((len(lines), BLOCK), dtype=torch.long)
    y = torch.full((len(lines), BLOCK), -1, dtype=torch.long)
    for i, ids in enumerate(lines):
        x[i, : len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, : len(ids) - 1] = torch.tensor(ids[1:])
    return x, y


@pytest.fixture(scope="module")
def overfit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of a tiny character model trained until it recites `training_text`.

    Each step sees every line aligned as evaluation presents it, plus random windows of the
    running text so that the model also learns to use context as a language model does.
    """
    torch.manual_seed(0)
    tok = CharTokenizer.from_text(vocabulary())
    lines_x, lines_y = _training_batch(tok)
    stream = torch.tensor(tok.encode(training_text() * 2))
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=BLOCK, vocab_size=tok.vocab_size)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(200):
        starts = torch.randint(len(stream) - BLOCK - 1, (8,)).tolist()
        x = torch.cat([lines_x, torch.stack([stream[s : s + BLOCK] for s in starts])])
        y = torch.cat([lines_y, torch.stack([stream[s + 1 : s + BLOCK + 1] for s in starts])])
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert loss.item() < 0.3, f"the model did not memorise its text (loss {loss.item():.3f})"
    folder = tmp_path_factory.mktemp("overfit") / "ckpt"
    save_checkpoint(folder, model, tok, TrainConfig(), state={"step": 200})
    return folder


# ----------------------------------------------------------------------------------------------
# Sliding windows


@pytest.mark.parametrize(
    ("n", "block", "stride"), [(2, 4, 4), (10, 4, 4), (37, 8, 3), (37, 8, 1), (9, 8, 8)]
)
def test_windows_score_every_token_once_with_enough_context(
    n: int, block: int, stride: int
) -> None:
    scored = []
    windows = list(sliding_windows(n, block, stride))
    for k, (start, stop, n_new) in enumerate(windows):
        assert stop - start <= block + 1 and n_new >= 1
        first = stop - n_new  # position of the first token this window scores
        if k > 0:
            assert first - start >= min(block - stride + 1, first)
        scored += range(first, stop)
    assert scored == list(range(1, n))


def test_windows_refuse_a_stride_beyond_the_block() -> None:
    with pytest.raises(UserError, match="stride must be between 1 and the block size 8"):
        list(sliding_windows(100, 8, 9))


# ----------------------------------------------------------------------------------------------
# Perplexity: parity with transformers, and more context never hurts


def _hf_to_ours(hf: torch.nn.Module, config: GPTConfig) -> GPT:
    """Copy a transformers GPT2LMHeadModel's weights into our GPT (Conv1D stores (in, out))."""
    ours = GPT(config)
    theirs = hf.state_dict()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state = {
        name: theirs[name].t() if name.endswith(conv1d) else theirs[name]
        for name in ours.state_dict()
    }
    ours.load_state_dict(state)
    return ours.eval()


def test_perplexity_matches_transformers(shakespeare: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2,
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    ours = _hf_to_ours(hf, GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))
    text = shakespeare.read_text(encoding="utf-8")[:3000]
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    tok = GPT2Tokenizer()
    got = evaluate_task(ours, tok, "perplexity", data=tmp_path / "text.txt", batch_size=5)

    # Reference: transformers' logits on non-overlapping windows of 32 inputs, each scored on
    # the 32 tokens that follow its inputs.
    ids = torch.tensor(tok.encode(text))
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 32):
            chunk = ids[start : start + 33]
            logits = hf(chunk[None, :-1]).logits[0]
            total += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
            count += len(chunk) - 1
    expected = math.exp(total / count)
    assert got["tokens"] == count == len(ids) - 1
    assert got["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(
        total / math.log(2) / len(tok.decode_bytes(ids[1:].tolist()))
    )
    assert got["perplexity"] > 100  # a random model is far from the data: the test is not trivial


def test_perplexity_falls_when_windows_overlap(overfit: Path) -> None:
    """Overlapping windows give every token more context than disjoint ones, and a model that
    uses context scores better for it. (Past that, a tiny model is not monotone: its last
    positions are its weakest, so stride 1, which scores only the last position, can lose.)"""
    ckpt = load_checkpoint(overfit)
    task = load_task("perplexity", ckpt.tokenizer, data=TEXT)
    figures = {}
    for stride in (BLOCK, BLOCK // 2, BLOCK // 4):
        task.stride = stride
        result = task.evaluate(ckpt.model, batch_size=16)
        assert result["tokens"] == len(TEXT.read_text()) - 1 and result["stride"] == stride
        figures[stride] = result["perplexity"]
    assert figures[BLOCK] > 1.05 * max(figures[BLOCK // 2], figures[BLOCK // 4]), figures


def test_token_files_give_the_same_figures_as_their_text(overfit: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(overfit)
    ids = np.asarray(ckpt.tokenizer.encode(TEXT.read_text(encoding="utf-8")), dtype=np.uint16)
    ids.tofile(tmp_path / "val.bin")  # headerless, as an older gpt2 prepare wrote: refused
    with (tmp_path / "val_000000.bin").open("wb") as f:  # llm.c's shard: a header, then ids
        f.write(shard_header(len(ids), ids.dtype))
        f.write(ids.tobytes())
    from_text = evaluate_task(ckpt.model, ckpt.tokenizer, "perplexity", data=TEXT, stride=16)
    shard = tmp_path / "val_000000.bin"
    from_shard = evaluate_task(ckpt.model, ckpt.tokenizer, "perplexity", data=shard, stride=16)
    assert from_shard == pytest.approx(from_text)
    with pytest.raises(UserError, match="not a token shard .* must be prepared again"):
        evaluate_task(ckpt.model, ckpt.tokenizer, "perplexity", data=tmp_path / "val.bin")
    assert from_text["bytes"] == len(TEXT.read_bytes()) - 1  # one byte per character but the first


def test_batching_does_not_change_the_figures(overfit: Path) -> None:
    ckpt = load_checkpoint(overfit)
    one = evaluate_task(ckpt.model, ckpt.tokenizer, "lambada", data=LAMBADA, batch_size=1)
    many = evaluate_task(ckpt.model, ckpt.tokenizer, "lambada", data=LAMBADA, batch_size=3)
    assert many == pytest.approx(one, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# HellaSwag and LAMBADA with a model that knows the answers


@pytest.mark.parametrize("style", ["harness", "nanogpt"])
def test_hellaswag_picks_the_endings_the_model_was_taught(overfit: Path, style: str) -> None:
    ckpt = load_checkpoint(overfit)
    figures = evaluate_task(ckpt.model, ckpt.tokenizer, "hellaswag", data=HELLASWAG, style=style)
    # Items 1 and 2 are labelled with the taught ending, item 3 with another one.
    assert figures == {"acc": pytest.approx(2 / 3), "acc_norm": pytest.approx(2 / 3), "items": 3}
    assert evaluate_task(
        ckpt.model, ckpt.tokenizer, "hellaswag", data=HELLASWAG, limit=2, style=style
    )["acc"] == pytest.approx(1.0)


def test_lambada_counts_only_words_predicted_in_full(overfit: Path) -> None:
    ckpt = load_checkpoint(overfit)
    figures = evaluate_task(ckpt.model, ckpt.tokenizer, "lambada", data=LAMBADA)
    assert figures["acc"] == pytest.approx(2 / 3)  # "piano" was never taught: "flute" was
    assert figures["items"] == 3 and figures["target_tokens"] == len(" night ring piano")
    first_two = evaluate_task(ckpt.model, ckpt.tokenizer, "lambada", data=LAMBADA, limit=2)
    assert first_two["acc"] == 1.0 and first_two["perplexity"] < 2.0
    assert figures["perplexity"] > first_two["perplexity"] * 2


def _fake_scores(logprob: list[float], n_scored: list[int]):
    def score(model, rows, batch_size=8, desc="", show_progress=False) -> RowScores:
        assert len(rows) == len(logprob)
        return RowScores(np.array(logprob), np.array(n_scored), np.zeros(len(rows), dtype=bool))

    return score


def test_acc_norm_divides_by_characters_or_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One item, two endings: the short one wins by sum; per character and per token the long
    one wins, unless its tokens are so few that per token the short one wins again."""
    item = {"activity_label": "A", "ctx_a": "b", "ctx_b": "", "ctx": "A: b", "label": 1,
            "endings": ["ab", "abcdefghij"]}  # fmt: skip
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(item) + "\n")
    tok = CharTokenizer.from_text("A: b" + "abcdefghij ")
    # Sum: -2 > -5 picks ending 0. Per character: -1 vs -0.5 picks 1. Per token (3 vs 11): 1.
    monkeypatch.setattr(evaluate, "score_rows", _fake_scores([-2.0, -5.0], [3, 11]))
    for style in ("harness", "nanogpt"):
        figures = load_task("hellaswag", tok, data=path, style=style).evaluate(None)
        assert (figures["acc"], figures["acc_norm"]) == (0.0, 1.0), style
    # Per token with 1 and 2 scored tokens: -2 vs -2.5 picks 0; per character still picks 1.
    monkeypatch.setattr(evaluate, "score_rows", _fake_scores([-2.0, -5.0], [1, 2]))
    assert load_task("hellaswag", tok, data=path, style="nanogpt").evaluate(None)["acc_norm"] == 0.0
    assert load_task("hellaswag", tok, data=path, style="harness").evaluate(None)["acc_norm"] == 1.0


def test_harness_cleans_wikihow_artefacts() -> None:
    assert hellaswag_preprocess(" How to bake [title] Heat the oven. [step] Wait.  ") == (
        "How to bake. Heat the oven. Wait."
    )


def test_long_rows_are_cut_from_the_left(overfit: Path, tmp_path: Path) -> None:
    """A context longer than the block keeps its last tokens; the answer still comes out."""
    ckpt = load_checkpoint(overfit)
    item = jsonl(LAMBADA)[1]
    padded = {"text": "the storm would come " * 10 + item["text"]}
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(padded) + "\n")
    assert len(padded["text"]) > 3 * BLOCK
    assert evaluate_task(ckpt.model, ckpt.tokenizer, "lambada", data=path)["acc"] == 1.0


@pytest.mark.parametrize(
    ("task", "content", "message"),
    [
        ("lambada", "{not json\n", "lambada.jsonl:1: not valid JSON"),
        ("lambada", '{"text": "oneword"}\n', "item 1: the text needs a context and a last word"),
        ("lambada", "\n\n", "has no items"),
        ("hellaswag", '{"ctx": "a", "endings": ["b", "c"]}\n', "item 1: missing key 'label'"),
        (
            "hellaswag",
            '{"ctx": "a", "endings": ["b", "c"], "label": 5}\n',
            "label 5 is not an index",
        ),
        (
            "hellaswag",
            '{"ctx": "a", "endings": ["b"], "label": 0}\n',
            "two or more non-empty strings",
        ),
    ],
)
def test_bad_files_are_explained(tmp_path: Path, task: str, content: str, message: str) -> None:
    path = tmp_path / f"{task}.jsonl"
    path.write_text(content)
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ")
    with pytest.raises(UserError, match=message):
        load_task(task, tok, data=path, style="nanogpt")


# ----------------------------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize(
    ("task", "data", "extra", "figures"),
    [
        ("perplexity", TEXT, ["--stride", "32"], {"nll", "perplexity", "bits_per_byte", "tokens"}),
        ("hellaswag", HELLASWAG, ["--style", "nanogpt"], {"acc", "acc_norm"}),
        ("lambada", LAMBADA, [], {"acc", "perplexity"}),
    ],
)
def test_cli_runs_each_task(
    overfit: Path, tmp_path: Path, capsys: pytest.CaptureFixture, task: str, data: Path,
    extra: list[str], figures: set[str],
) -> None:  # fmt: skip
    out = tmp_path / "result.json"
    args = ["-q", "eval", "--checkpoint", str(overfit), "--task", task, "--data", str(data),
            "--batch-size", "4", "--out", str(out), *extra]  # fmt: skip
    assert main(args) == 0
    record = json.loads(out.read_text())
    assert record["task"] == task and record["model"] == str(overfit)
    assert record["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert record["items"] == (len(data.read_text()) - 1 if task == "perplexity" else 3)
    assert figures <= set(record["metrics"]) and record["model_config"]["block_size"] == BLOCK
    table = capsys.readouterr().out
    assert task in table and record["data"]["sha256"] in table
    for name in figures:
        assert name in table


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task", "lambada", "--data", "missing.jsonl"], "data file not found: missing.jsonl"),
        (
            ["--task", "perplexity", "--data", str(TEXT), "--stride", "65"],
            "--stride must be between 1",
        ),
        (["--task", "lambada", "--data", str(LAMBADA), "--stride", "4"], "--stride applies to"),
        (
            ["--task", "lambada", "--data", str(LAMBADA), "--limit", "0"],
            "--limit must be at least 1",
        ),
    ],
)
def test_cli_errors_are_one_line(
    overfit: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    assert main(["-q", "eval", "--checkpoint", str(overfit), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_unknown_model_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = [
        "eval",
        "--checkpoint",
        str(tmp_path / "nowhere"),
        "--task",
        "lambada",
        "--data",
        str(LAMBADA),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and len(err.strip().splitlines()) == 1


def test_cli_reads_a_hugging_face_folder_like_our_checkpoint(overfit: Path, tmp_path: Path) -> None:
    hf = pytest.importorskip("gpt2.hf")
    ckpt = load_checkpoint(overfit)
    hf.save_pretrained(ckpt.model, tmp_path / "hf", ckpt.tokenizer)
    for source, out in ((overfit, "ours.json"), (tmp_path / "hf", "hf.json")):
        args = ["-q", "eval", "--checkpoint", str(source), "--task", "lambada",
                "--data", str(LAMBADA), "--out", str(tmp_path / out)]  # fmt: skip
        assert main(args) == 0
    ours, theirs = (json.loads((tmp_path / f).read_text()) for f in ("ours.json", "hf.json"))
    assert theirs["metrics"] == pytest.approx(ours["metrics"], rel=1e-5)


def test_default_data_is_an_asset_and_offline_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpt2 import assets

    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))

    def offline(*args, **kwargs):
        raise assets.urllib.error.URLError("no network")

    monkeypatch.setattr(assets.urllib.request, "urlopen", offline)
    tok = CharTokenizer.from_text("abc ")
    for task, name in evaluate.DEFAULT_DATA.items():
        assert len(assets.ASSETS[name].sha256) == 64
        with pytest.raises(UserError, match="--data") as err:
            load_task(task, tok)
        assert str(tmp_path / name) in str(err.value) and assets.ASSETS[name].url in str(err.value)
