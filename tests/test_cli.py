"""The command line end to end, and every bad input answered in one line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2.cli import main

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40


@pytest.fixture(scope="module")
def char_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "in.txt").write_text(TEXT, encoding="utf-8")
    args = ["-q", "prepare", "--input", str(root / "in.txt"), "--tokenizer", "char"]
    assert main([*args, "--out", str(root / "data")]) == 0
    return root / "data"


def tiny_train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-q", "train", "--data", str(data), "--out-dir", str(out), "--model", "tiny",
        "--max-iters", "12", "--eval-interval", "6", "--eval-iters", "2", "--batch-size", "4",
        "--log-interval", "1", "--sample-tokens", "16", "--warmup-iters", "2", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(tiny_train_args(char_data, out)) == 0
    return out


def losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def test_train_writes_checkpoint_metrics_and_sample(
    trained: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt = trained / "ckpt"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "optimizer.pt"):
        assert (ckpt / name).is_file(), name
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model"]["n_layer"] == 2 and config["state"]["step"] == 12
    assert len(losses(trained)) == 12


def test_same_seed_same_losses(char_data: Path, trained: Path, tmp_path: Path) -> None:
    assert main(tiny_train_args(char_data, tmp_path)) == 0
    assert losses(tmp_path) == losses(trained)


def test_toml_config_and_flags_win(char_data: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text("max_iters = 3\nbatch_size = 2\n[model]\nn_embd = 16\nn_head = 2\n")
    assert (
        main(
            [
                *tiny_train_args(char_data, tmp_path / "run"),
                "--config",
                str(cfg),
                "--max-iters",
                "4",
            ]
        )
        == 0
    )
    config = json.loads((tmp_path / "run" / "ckpt" / "config.json").read_text())
    assert config["train"]["max_iters"] == 4 and config["train"]["batch_size"] == 4
    assert config["model"]["n_embd"] == 16


def test_sample_is_reproducible_and_keeps_prompt(
    trained: Path, capsys: pytest.CaptureFixture
) -> None:
    args = [
        "sample",
        "--checkpoint",
        str(trained),
        "--prompt",
        "First",
        "--max-new-tokens",
        "20",
        "--seed",
        "7",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("First") and len(first.rstrip("\n")) == len("First") + 20


def test_sample_crops_a_long_prompt_from_the_left(
    trained: Path, capsys: pytest.CaptureFixture
) -> None:
    prompt = "hear me speak. " * 10  # 150 characters, context is 32
    args = ["sample", "--checkpoint", str(trained), "--max-new-tokens", "5", "--temperature", "0"]
    assert main([*args, "--prompt", prompt]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(prompt) and len(out.out.rstrip("\n")) == 155
    assert "keeping the last 32" in out.err
    # The model saw only the last 32 characters: the same continuation as that prompt alone.
    assert main([*args, "--prompt", prompt[-32:]]) == 0
    assert capsys.readouterr().out[32:] == out.out[150:]


def test_sample_from_a_hugging_face_folder(trained: Path, tmp_path: Path, capsys) -> None:
    assert main(["-q", "export", "--checkpoint", str(trained), "--out", str(tmp_path / "hf")]) == 0
    args = ["--prompt", "First", "--max-new-tokens", "8", "--temperature", "0"]
    assert main(["sample", "--checkpoint", str(tmp_path / "hf"), *args]) == 0
    from_hf = capsys.readouterr().out
    assert main(["sample", "--checkpoint", str(trained), *args]) == 0
    assert capsys.readouterr().out == from_hf


def run_cli_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run the CLI expecting a user error: exit code 2 and a single line on stderr."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_bad_inputs(
    tmp_path: Path, char_data: Path, trained: Path, capsys: pytest.CaptureFixture
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text(
        "abcdefghijklmnopqrstuvwxyz"
    )  # 26 characters: 2 val tokens, fewer than a window
    assert "input file not found" in run_cli_error(
        ["prepare", "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")], capsys
    )
    assert "input file is empty" in run_cli_error(
        ["prepare", "--input", str(empty), "--out", str(tmp_path / "o")], capsys
    )
    args = ["-q", "prepare", "--input", str(short), "--tokenizer", "char"]
    assert main([*args, "--out", str(tmp_path / "short")]) == 0
    assert "fewer than one window" in run_cli_error(
        tiny_train_args(tmp_path / "short", tmp_path / "r1"), capsys
    )
    assert "unknown model preset 'gpt5'" in run_cli_error(
        tiny_train_args(char_data, tmp_path / "r2", "--model", "gpt5"), capsys
    )
    assert "divisible by n_head" in run_cli_error(
        tiny_train_args(char_data, tmp_path / "r3", "--n-embd", "30", "--n-head", "4"), capsys
    )
    assert "learning_rate must be positive" in run_cli_error(
        tiny_train_args(char_data, tmp_path / "r4", "--learning-rate", "-1"), capsys
    )
    assert "invalid int value" in run_cli_error(["train", "--max-iters", "many"], capsys)
    assert "data folder not found" in run_cli_error(
        tiny_train_args(tmp_path / "missing", tmp_path / "r5"), capsys
    )
    assert "checkpoint folder not found" in run_cli_error(
        ["sample", "--checkpoint", str(tmp_path / "none")], capsys
    )
    assert "outside this model's vocabulary: 'Z'" in run_cli_error(
        ["sample", "--checkpoint", str(trained), "--prompt", "Zz"], capsys
    )


def test_corrupt_checkpoint(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained / "ckpt", broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 20)
    assert "corrupt weights" in run_cli_error(["sample", "--checkpoint", str(broken)], capsys)
    (broken / "config.json").write_text("{not json")
    assert "corrupt config.json" in run_cli_error(["sample", "--checkpoint", str(broken)], capsys)
    assert "not a checkpoint" in run_cli_error(["sample", "--checkpoint", str(tmp_path)], capsys)


def test_bad_config_file(char_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("max_iters = [")
    assert "not valid TOML" in run_cli_error(
        tiny_train_args(char_data, tmp_path / "r", "--config", str(cfg)), capsys
    )
    cfg.write_text("max_itres = 3")
    assert "unknown field(s) max_itres" in run_cli_error(
        tiny_train_args(char_data, tmp_path / "r", "--config", str(cfg)), capsys
    )


def test_prepare_failure_keeps_earlier_output(
    char_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before = {p.name: p.read_bytes() for p in char_data.iterdir()}
    run_cli_error(
        ["prepare", "--input", str(tmp_path / "missing.txt"), "--out", str(char_data)], capsys
    )
    assert {p.name: p.read_bytes() for p in char_data.iterdir()} == before


def test_real_process_exit_code_and_single_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2", "prepare", "--input", str(tmp_path / "x.txt"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"gpt2 prepare: error: input file not found: {tmp_path / 'x.txt'}"
    ]
