"""``gpt2 train --eval-task``: a benchmark on a subset every few steps, logged with the losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpt2.cli import main
from gpt2.config import TrainConfig
from gpt2.errors import UserError

DATA = Path(__file__).parent / "data"
LAMBADA = DATA / "lambada_tiny.jsonl"
HELLASWAG = DATA / "hellaswag_tiny.jsonl"


@pytest.fixture(scope="module")
def char_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Characters prepared from the hand-made files, so their text is in the vocabulary."""
    root = tmp_path_factory.mktemp("eval-train")
    text = (LAMBADA.read_text() + HELLASWAG.read_text() + (DATA / "eval_tiny.txt").read_text()) * 4
    (root / "in.txt").write_text(text, encoding="utf-8")
    args = ["-q", "prepare", "--input", str(root / "in.txt"), "--tokenizer", "char"]
    assert main([*args, "--out", str(root / "data")]) == 0
    return root / "data"


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-q", "train", "--data", str(data), "--out-dir", str(out), "--model", "tiny",
        "--max-iters", "6", "--eval-interval", "4", "--eval-iters", "1", "--batch-size", "2",
        "--log-interval", "1", "--sample-tokens", "0", "--warmup-iters", "1", "--no-plot", *extra,
    ]  # fmt: skip


def records(out: Path, key: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


def test_eval_task_runs_every_n_steps_on_a_subset(char_data: Path, tmp_path: Path) -> None:
    extra = ("--eval-task", "lambada", "--eval-data", str(LAMBADA), "--eval-every", "3",
             "--eval-limit", "2")  # fmt: skip
    assert main(train_args(char_data, tmp_path, *extra)) == 0
    logged = records(tmp_path, "eval/lambada/acc")
    assert [r["step"] for r in logged] == [3, 6]
    for r in logged:
        assert r["eval/lambada/items"] == 2 and 0.0 <= r["eval/lambada/acc"] <= 1.0
        assert r["eval/lambada/perplexity"] > 1.0
    assert [r["step"] for r in records(tmp_path, "val_loss")] == [4, 6]  # losses as before


def test_eval_every_zero_follows_the_loss_estimates(char_data: Path, tmp_path: Path) -> None:
    extra = ("--eval-task", "hellaswag", "--eval-data", str(HELLASWAG))
    assert main(train_args(char_data, tmp_path, *extra)) == 0
    logged = records(tmp_path, "eval/hellaswag/acc_norm")
    assert [r["step"] for r in logged] == [4, 6] and logged[0]["eval/hellaswag/items"] == 3


def test_a_bad_eval_file_stops_the_run_before_it_starts(
    char_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "oneword"}\n')
    out = tmp_path / "run"
    args = train_args(char_data, out, "--eval-task", "lambada", "--eval-data", str(bad))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the text needs a context and a last word" in err and len(err.strip().splitlines()) == 1
    assert not (out / "metrics.jsonl").exists()


def test_unknown_eval_task_is_refused() -> None:
    with pytest.raises(UserError, match="unknown eval_task 'mmlu'"):
        TrainConfig(eval_task="mmlu")
    with pytest.raises(UserError, match="eval_limit must not be negative"):
        TrainConfig(eval_limit=-1)
