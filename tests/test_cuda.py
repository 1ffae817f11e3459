"""The CUDA path, run for real: parity with transformers, cached decoding, bf16 and fp16 training,
exact resume after SIGKILL, ``--compile`` with evaluation and sampling, torchrun (DDP, FSDP2) and
serving.

Every test is marked ``cuda`` and is skipped without a GPU (tests/conftest.py);
``bench/gpu_check.py`` runs them with ``pytest -m cuda tests/test_cuda.py``. Training and serving
go through the command line (``python -m gpt2 ...``), as a user would run them.

``GPT2_CUDA_TESTS_ON=cpu`` runs them on the CPU instead, to check the tests' own logic where
there is no GPU (slow: ``--compile`` builds C++ there); float16 becomes bfloat16 on the CPU,
which has no float16 autocast, so the gradient scaler is then off.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gpt2.checkpoint import load_checkpoint
from gpt2.config import GPTConfig
from gpt2.generate import generate
from gpt2.model import GPT

ON_CPU = os.environ.get("GPT2_CUDA_TESTS_ON") == "cpu"
DEVICE = "cpu" if ON_CPU else "cuda"
HALF = "bfloat16" if ON_CPU else "float16"

pytestmark = pytest.mark.cuda

# Head size 32: a shape the flash kernel takes, as GPT-2's 64 is.
MODEL_FLAGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "64"]
COMMON_FLAGS = [
    *MODEL_FLAGS,
    *("--dropout", "0.0", "--batch-size", "8", "--eval-iters", "2", "--log-interval", "1"),
    *("--learning-rate", "3e-3", "--min-lr", "3e-4", "--warmup-iters", "5"),
    *("--sample-tokens", "0", "--no-plot", "--device", DEVICE),
]
QUIET_ENV = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
EVAL_LINE = re.compile(r"step (\d+): train loss")


def gpt2(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m gpt2 ARGS``; its exit code must be 0."""
    done = subprocess.run(
        [sys.executable, "-m", "gpt2", *args],
        capture_output=True,
        text=True,
        env=QUIET_ENV,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def train(data: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return gpt2("train", "--data", str(data), "--out-dir", str(out), *COMMON_FLAGS, *flags)


def step_losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def char_data(shakespeare: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("text") / "input.txt"
    source.write_text(shakespeare.read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    out = tmp_path_factory.mktemp("char-data")
    gpt2("-q", "prepare", "--input", str(source), "--tokenizer", "char", "--out", str(out))
    return out


@contextmanager
def full_fp32():
    """float32 matrix products in float32, not TF32 (10 mantissa bits would miss 1e-4)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --- the model ---------------------------------------------------------------------------------

# (n_layer, n_head, n_embd, n_positions, vocab_size): a small shape and GPT-2 124M itself.
HF_SHAPES = {"small": (3, 4, 128, 128, 1009), "gpt2-124M": (12, 12, 768, 1024, 50257)}


@pytest.mark.parametrize("shape", list(HF_SHAPES))
def test_logits_equal_transformers_in_fp32(shape: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from test_hf import hf_config  # the CPU parity test's config, for the same comparison on CUDA

    _, _, _, n_positions, vocab_size = HF_SHAPES[shape]
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_config(HF_SHAPES[shape]))
    with torch.no_grad():  # no bias left at 0 nor gain at 1: a misplaced one would show
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path), DEVICE).eval()
    hf = hf.to(DEVICE).eval()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab_size, (2, min(n_positions, 256)), generator=g).to(DEVICE)
    with torch.no_grad(), full_fp32():
        expected = hf(input_ids=idx).logits
        got, _ = ours(idx)
    # Both float32, the same products in other kernels and orders: rounding differences near
    # 1e-6 of logits of size about 1; 1e-4 leaves a hundredfold margin and catches any mistake.
    error = (got - expected).abs().max().item()
    assert error < 1e-4, error


@torch.no_grad()
def test_cached_greedy_equals_cache_free() -> None:
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=97, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(config).to(DEVICE).eval()
    for p in model.parameters():  # large weights: clear winners, no near-ties for rounding to flip
        if p.dim() == 2:
            p.normal_(0.0, 0.3)
    prompts = torch.randint(0, 97, (3, 8), device=DEVICE)
    with full_fp32():
        cached = generate(model, prompts, 100, temperature=0.0)[:, 8:].tolist()
        for row, prompt in enumerate(prompts.tolist()):
            seq = list(prompt)
            for _ in range(100):  # the definition: argmax of a full pass over the context
                logits, _ = model(torch.tensor([seq], device=DEVICE))
                seq.append(int(logits[0, -1].argmax()))
            assert cached[row] == seq[8:], row


# --- training ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_run(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bf16")
    train(char_data, out, "--dtype", "bfloat16", "--max-iters", "60", "--eval-interval", "60")
    return out


def test_bf16_autocast_training_lowers_the_loss(bf16_run: Path) -> None:
    losses = step_losses(bf16_run)
    assert list(losses) == list(range(1, 61))
    first, last = losses[1], sum(losses[s] for s in range(51, 61)) / 10
    assert math.isfinite(last) and last < first - 0.5, (first, last)  # about 4.2 -> 2.5
    val = [r["val_loss"] for r in records(bf16_run) if "val_loss" in r]
    assert len(val) == 1 and val[0] < first - 0.5
    assert load_checkpoint(bf16_run).train_config.dtype == "bfloat16"


def kill_after_eval(data: Path, out: Path, flags: list[str], eval_step: int) -> int:
    """Start a training and SIGKILL it once it logs the loss estimate of ``eval_step`` (the save
    that follows may be cut in half); the step it was killed at, or later, is unknown."""
    command = [sys.executable, "-m", "gpt2", "train", "--data", str(data), "--out-dir", str(out)]
    proc = subprocess.Popen(
        [*command, *COMMON_FLAGS, *flags], stderr=subprocess.PIPE, text=True, env=QUIET_ENV
    )
    seen = []
    for line in proc.stderr:  # blocks until the child writes: no sleeping, no polling
        seen.append(line)
        match = EVAL_LINE.search(line)
        if match and int(match.group(1)) >= eval_step:
            proc.kill()
            break
    proc.stderr.close()
    code = proc.wait(timeout=60)
    assert code == -signal.SIGKILL, "".join(seen)
    return code


def test_fp16_scaler_sigkill_then_resume_continues_the_same_losses(
    char_data: Path, tmp_path: Path, record_property
) -> None:
    flags = ["--dtype", HALF, "--max-iters", "16", "--lr-decay-iters", "16"]
    flags += ["--eval-interval", "4", "--save-interval", "2", "--keep-last", "2"]
    train(char_data, tmp_path / "reference", *flags)
    kill_after_eval(char_data, tmp_path / "killed", flags, eval_step=8)
    train(char_data, tmp_path / "killed", *flags, "--resume", "auto")
    reference, resumed = step_losses(tmp_path / "reference"), step_losses(tmp_path / "killed")
    assert list(resumed) == list(range(1, 17))  # every step once, none lost, none twice
    scaler = load_checkpoint(tmp_path / "killed").trainer_state()["scaler"]
    assert (scaler is not None) == (HALF == "float16")  # the scaler's state was saved
    if resumed == reference:
        record_property("resume", "bit-identical")
        return
    # Not bit-identical. Either resume lost something, or the kernels themselves do not repeat
    # (atomic additions in a backward pass): a second uninterrupted run tells them apart.
    train(char_data, tmp_path / "again", *flags)
    again = step_losses(tmp_path / "again")
    assert again != reference, "uninterrupted runs repeat exactly, the resumed one does not"
    worst = max(abs(resumed[s] - reference[s]) / abs(reference[s]) for s in reference)
    rerun = max(abs(again[s] - reference[s]) / abs(reference[s]) for s in reference)
    record_property(
        "resume", f"within rel {worst:.2e}; two uninterrupted runs differ by {rerun:.2e}"
    )
    # The kernels' own non-determinism, grown over 16 steps, stays far below 1%.
    assert worst < 1e-2, (worst, rerun)


@pytest.fixture(scope="module")
def compiled_run(char_data: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("compiled")
    done = train(
        char_data,
        out,
        *("--compile", "--max-iters", "20", "--eval-interval", "10"),
        *("--sample-interval", "10", "--sample-tokens", "32"),
    )
    return out, done


def test_compile_trains_evaluates_and_samples_in_one_run(compiled_run) -> None:
    out, done = compiled_run
    val = [r["step"] for r in records(out) if "val_loss" in r]
    assert val == [10, 20]
    assert "step 10 sample:" in done.stderr and "step 20 sample:" in done.stderr
    assert "--- sample ---" in done.stdout
    losses = step_losses(out)
    assert losses[20] < losses[1]


def test_a_compiled_runs_checkpoint_has_plain_names_and_loads(compiled_run) -> None:
    out, _ = compiled_run
    with safe_open(str(out / "ckpt" / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    assert names and not [n for n in names if "_orig_mod" in n], names[:5]
    optimizer = torch.load(out / "ckpt" / "optimizer.pt", weights_only=True)
    assert "_orig_mod" not in json.dumps(optimizer["param_groups"])
    assert not [k for k in optimizer["state"] if "_orig_mod" in str(k)]
    ckpt = load_checkpoint(out)  # strict: an unexpected name would be refused
    assert ckpt.state["step"] == 20
    gpt2("sample", "--checkpoint", str(out), "--max-new-tokens", "8", "--device", DEVICE)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_with_one_process_wraps_and_steps(char_data: Path, tmp_path: Path, mode) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=1", "-m", "gpt2", "train", "--data", str(char_data)]
    command += ["--out-dir", str(tmp_path), *COMMON_FLAGS, "--max-iters", "4"]
    command += ["--eval-interval", "4", *(["--fsdp"] if mode == "fsdp" else [])]
    done = subprocess.run(command, capture_output=True, text=True, env=QUIET_ENV, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ("FSDP2" if mode == "fsdp" else "DDP") + " over 1 process" in done.stderr
    assert list(step_losses(tmp_path)) == [1, 2, 3, 4]
    state = load_checkpoint(tmp_path).trainer_state()
    assert state["step"] == 4 and state["world_size"] == 1


# --- serving -----------------------------------------------------------------------------------


def test_serve_answers_a_completion(bf16_run: Path) -> None:
    command = [sys.executable, "-m", "gpt2", "serve", "--checkpoint", str(bf16_run)]
    command += ["--device", DEVICE, "--port", "0", "--model-name", "tiny"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=QUIET_ENV)
    try:
        seen, port = [], None
        for line in proc.stderr:  # the server says where it listens once the model is loaded
            seen.append(line)
            match = re.search(r"serving \S+ on http://[\d.]+:(\d+)", line)
            if match:
                port = int(match.group(1))
                break
        assert port, "".join(seen)
        # Keep reading its log, so that a full pipe never blocks the server.
        threading.Thread(target=lambda: seen.extend(proc.stderr), daemon=True).start()
        body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 16, "temperature": 0}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        text = answer["choices"][0]["text"]
        assert isinstance(text, str) and text
        assert answer["usage"]["completion_tokens"] == 16
    finally:
        proc.terminate()
        proc.wait(timeout=30)
