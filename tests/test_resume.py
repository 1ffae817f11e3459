"""Exact resume: a run stopped at any step (even by SIGKILL, even in the middle of a save)
continues from its last checkpoint with bit-identical losses. And SIGINT/SIGTERM save and exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2.checkpoint import load_checkpoint, step_checkpoints
from gpt2.config import TrainConfig
from gpt2.errors import UserError
from gpt2.prepare import prepare_text
from gpt2.train import Trainer

# Dropout on: resuming must also restore the random generators, not only weights and data.
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.1}
STEPS = 12

# Run a training in a child process that SIGKILLs itself: after step KILL_AT, or during the
# N-th torch.save of a checkpoint (half a file written), whichever is asked.
DOOMED_CHILD = r"""
import json, os, signal, sys
import torch
from gpt2.config import TrainConfig
from gpt2.train import Trainer

cfg, overrides, kill_after_step, kill_in_save = json.loads(sys.argv[1])
real_save, saves = torch.save, [0]

def dying_save(obj, f, *args, **kwargs):  # f: a path or an open file, as torch.save takes
    saves[0] += 1
    if saves[0] == kill_in_save:
        with open(f, "wb") if isinstance(f, (str, os.PathLike)) else f as out:
            out.write(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = dying_save

class Doomed(Trainer):
    def train_step(self):
        stats = super().train_step()
        if self.step == kill_after_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return stats

Doomed(TrainConfig(**cfg), overrides, show_progress=False).run()
"""


@pytest.fixture(scope="module")
def char_data(shakespeare: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("text") / "input.txt"
    source.write_text(shakespeare.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    out = tmp_path_factory.mktemp("char-data")
    prepare_text(source, out, tokenizer="char", show_progress=False)
    return out


def settings(data: Path, out: Path, **kw) -> dict:
    return dict(
        data=str(data),
        out_dir=str(out),
        max_iters=STEPS,
        lr_decay_iters=STEPS,
        warmup_iters=3,
        batch_size=4,
        total_batch_tokens=2 * 4 * 32,
        eval_interval=5,
        eval_iters=2,
        log_interval=1,
        save_interval=3,
        sample_tokens=0,
        plot=False,
        device="cpu",
        learning_rate=3e-3,
        min_lr=3e-4,
        # Child processes use this process's thread count: a sum split over a different
        # number of threads rounds differently, and "bit-identical" means bit-identical.
        num_threads=torch.get_num_threads(),
        **kw,
    )


def step_losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.fixture(scope="module")
def reference(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The losses of the uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    Trainer(TrainConfig(**settings(char_data, out)), TINY, show_progress=False).run()
    return step_losses(out)


def run_doomed(data: Path, out: Path, kill_after_step: int = -1, kill_in_save: int = -1) -> None:
    args = json.dumps([settings(data, out), TINY, kill_after_step, kill_in_save])
    done = subprocess.run(
        [sys.executable, "-c", DOOMED_CHILD, args], capture_output=True, text=True
    )
    assert done.returncode == -signal.SIGKILL, done.stderr


def resume(data: Path, out: Path) -> None:
    Trainer(TrainConfig(**settings(data, out, resume="auto")), TINY, show_progress=False).run()


def test_resume_after_a_clean_stop_is_bit_identical(char_data, tmp_path, reference):
    Trainer(
        TrainConfig(**{**settings(char_data, tmp_path), "max_iters": 7}), TINY, show_progress=False
    ).run()
    resume(char_data, tmp_path)
    assert step_losses(tmp_path) == reference  # exact equality, every step


def test_sigkill_then_resume_auto_is_bit_identical(char_data, tmp_path, reference, caplog):
    run_doomed(char_data, tmp_path, kill_after_step=8)  # saved at 3, 5 (eval), 6; 7, 8 lost
    assert [p.name for p in step_checkpoints(tmp_path / "checkpoints")] == [
        "step-00000006",
        "step-00000005",  # the newest two (keep_last)
    ]
    caplog.set_level("INFO", logger="gpt2")
    resume(char_data, tmp_path)
    assert any(
        "resuming from" in r.message and "step-00000006" in r.message for r in caplog.records
    )
    losses = step_losses(tmp_path)
    assert list(losses) == list(range(1, STEPS + 1))  # steps 7 and 8 logged once, not twice
    assert losses == reference


def test_kill_during_a_save_leaves_the_previous_checkpoint(char_data, tmp_path, reference):
    # torch.save runs twice per checkpoint (optimizer, trainer state): the 3rd call is in the
    # middle of the second checkpoint, at step 5 (an evaluation step).
    run_doomed(char_data, tmp_path, kill_in_save=3)
    history = tmp_path / "checkpoints"
    assert [p.name for p in step_checkpoints(history)] == ["step-00000003"]
    assert list(history.glob(".step-00000005.tmp-*"))  # the half-written one, out of sight
    assert load_checkpoint(tmp_path).state["step"] == 3  # ckpt/: the previous, loadable
    assert load_checkpoint(history / "step-00000003").trainer_state()["step"] == 3
    resume(char_data, tmp_path)
    assert step_losses(tmp_path) == reference
    assert not list(history.glob(".*.tmp-*"))  # cleaned up by the next save


def test_resume_auto_skips_a_corrupt_newest_checkpoint(char_data, tmp_path, reference, caplog):
    Trainer(
        TrainConfig(**{**settings(char_data, tmp_path), "max_iters": 6}), TINY, show_progress=False
    ).run()
    newest = tmp_path / "checkpoints" / "step-00000006"
    (newest / "model.safetensors").write_bytes(b"garbage")
    resume(char_data, tmp_path)
    assert any("skipping" in r.message and "step-00000006" in r.message for r in caplog.records)
    assert step_losses(tmp_path) == reference


def test_resume_auto_without_a_checkpoint_starts_afresh(char_data, tmp_path, caplog):
    caplog.set_level("INFO", logger="gpt2")
    cfg = TrainConfig(**{**settings(char_data, tmp_path, resume="auto"), "max_iters": 2})
    assert Trainer(cfg, TINY, show_progress=False).run().step == 2
    assert any("starting from scratch" in r.message for r in caplog.records)


def test_resume_from_a_folder_that_is_not_a_checkpoint(char_data, tmp_path):
    cfg = TrainConfig(**settings(char_data, tmp_path / "out", resume=str(tmp_path)))
    with pytest.raises(UserError, match="not a checkpoint"):
        Trainer(cfg, TINY, show_progress=False)


def test_sigterm_saves_a_checkpoint_and_the_command_exits_143(char_data, tmp_path):
    sig = signal.SIGTERM
    command = [
        sys.executable,
        "-m",
        "gpt2",
        "train",
        "--data",
        str(char_data),
        "--out-dir",
        str(tmp_path),
        "--max-iters",
        "1000000",
        "--eval-interval",
        "5",
        "--eval-iters",
        "1",
        "--batch-size",
        "4",
        "--n-layer",
        "2",
        "--n-head",
        "2",
        "--n-embd",
        "32",
        "--block-size",
        "32",
        "--device",
        "cpu",
        "--sample-tokens",
        "0",
        "--no-plot",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in proc.stderr:  # blocks until the child writes: no sleeping, no polling
        seen.append(line)
        if "step 5: train loss" in line:
            proc.send_signal(sig)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + sig, "".join(seen) + rest  # 143: the shell's code
    assert f"stopped by {sig.name}" in rest
    newest = step_checkpoints(tmp_path / "checkpoints")[0]
    ckpt = load_checkpoint(newest)
    step = ckpt.trainer_state()["step"]
    assert step >= 5 and newest.name == f"step-{step:08d}" and ckpt.state["step"] == step
    assert "--resume auto" in rest


def test_ctrl_c_saves_a_checkpoint_and_returns(char_data, tmp_path, caplog):
    class Interrupted(Trainer):
        def train_step(self):
            stats = super().train_step()
            if self.step == 4:
                os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would: handled between steps
            return stats

    cfg = TrainConfig(**settings(char_data, tmp_path))
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background
    result = Interrupted(cfg, TINY, show_progress=False).run()
    assert (result.step, result.stopped_by) == (4, "SIGINT")
    assert load_checkpoint(tmp_path).trainer_state()["step"] == 4
    assert signal.getsignal(signal.SIGINT) == before  # the caller's handler is restored
