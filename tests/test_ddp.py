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
from gpt2.shards import load_split
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


def key_bias_free(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters with the keys' third of each ``c_attn.bias`` left out.

    That bias adds ``q . b_k`` to every score of a query's row, and softmax ignores a constant
    added to a row: its gradient is zero in exact arithmetic and rounding noise in floats. AdamW
    divides that noise by its own RMS, so each step moves it by about the learning rate with the
    noise's sign, and two runs that sum in another order walk it apart by design (differences
    of 1e-5 after 20 steps on AVX-512 kernels). Every other parameter has a real gradient and
    must agree.
    """
    out = {}
    for name, p in model.named_parameters():
        if name.endswith("attn.c_attn.bias"):
            c = p.numel() // 3
            p = torch.cat([p[:c], p[2 * c :]])  # queries and values; keys dropped
        out[name] = p.detach()
    return out


def assert_same_function(a: torch.nn.Module, b: torch.nn.Module, data: Path) -> None:
    """``a`` and ``b`` are the same model: equal parameters where the gradient is real (1e-5:
    20 AdamW steps of float32 sums taken in another order), and equal logits, which the key
    biases cannot change."""
    pa, pb = key_bias_free(a), key_bias_free(b)
    for name in pa:
        assert torch.allclose(pa[name], pb[name], atol=1e-5), name
    idx = torch.from_numpy(load_split(data, "val")[0][: 4 * 32].astype("int64")).view(4, 32)
    with torch.no_grad():
        la, lb = a.eval()(idx)[0], b.eval()(idx)[0]
    assert torch.allclose(la, lb, atol=1e-4), (la - lb).abs().max()


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
    assert_same_function(a, b, char_data)
    state = load_checkpoint(tmp_path / "ranks").trainer_state()
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["loader"]["position"] == STEPS * 2 * per_rank * 4  # windows, both ranks
