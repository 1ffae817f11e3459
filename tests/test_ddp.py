"""Distributed training through torchrun on the CPU (gloo): two processes, one micro-batch
each, follow the same loss trajectory as one process accumulating two micro-batches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2.checkpoint import load_checkpoint
from gpt2.config import TrainConfig
from gpt2.prepare import prepare_text
from gpt2.train import Trainer

STEPS = 20
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.0}
SETTINGS = dict(
    max_iters=STEPS,
    batch_size=4,
    eval_interval=STEPS,
    eval_iters=2,
    log_interval=1,
    sample_tokens=0,
    plot=False,
    device="cpu",
    warmup_iters=5,
    learning_rate=3e-3,
    min_lr=3e-4,
)


@pytest.fixture(scope="module")
def char_data(shakespeare: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("text") / "input.txt"
    source.write_text(shakespeare.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    out = tmp_path_factory.mktemp("char-data")
    prepare_text(source, out, tokenizer="char", show_progress=False)
    return out


def accumulate(data: Path, out: Path, micro_steps: int) -> Path:
    """One process, ``micro_steps`` micro-batches of 4 sequences per optimiser step."""
    cfg = TrainConfig(
        data=str(data), out_dir=str(out), total_batch_tokens=micro_steps * 4 * 32, **SETTINGS
    )
    trainer = Trainer(cfg, TINY, show_progress=False)
    assert trainer.accum_steps == micro_steps
    trainer.run()
    return out


def flags(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        out += (
            [flag if value else f"--no-{flag[2:]}"]
            if isinstance(value, bool)
            else [flag, str(value)]
        )
    return out


def torchrun_train(data: Path, out: Path, *extra: str) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "gpt2",
        "-q",
        "train",
        "--data",
        str(data),
        "--out-dir",
        str(out),
        *flags(SETTINGS),
        *flags(TINY),
        *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def history(out: Path) -> dict[int, dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.parametrize(
    "mode, per_rank",
    [
        ("ddp", 1),  # 2 ranks x 1 micro-step == 1 process x 2 micro-steps
        ("ddp", 2),  # 2 ranks x 2 (gradients synced on the 2nd only) == 1 process x 4
        pytest.param("fsdp", 1, marks=pytest.mark.slow),
    ],
)
def test_two_processes_equal_one_process_accumulating(char_data, tmp_path, mode, per_rank):
    total = ["--total-batch-tokens", str(2 * per_rank * 4 * 32)]
    torchrun_train(char_data, tmp_path / "ranks", *total, *(["--fsdp"] if mode == "fsdp" else []))
    single_out = accumulate(char_data, tmp_path / "single", micro_steps=2 * per_rank)
    ranks, single = history(tmp_path / "ranks"), history(single_out)
    assert list(ranks) == list(single) == list(range(1, STEPS + 1))
    for step in ranks:
        assert ranks[step]["loss"] == pytest.approx(single[step]["loss"], abs=1e-5), step
        assert ranks[step]["grad_norm"] == pytest.approx(single[step]["grad_norm"], rel=1e-4)
    # Only rank 0 wrote, and its checkpoint holds the same model as the single process's.
    a, b = load_checkpoint(tmp_path / "ranks").model, load_checkpoint(single_out).model
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), name
    state = load_checkpoint(tmp_path / "ranks").trainer_state()
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["loader"]["position"] == STEPS * 2 * per_rank * 4  # windows, both ranks
