"""bench/gpu_check.py's dry run: every step of the GPU check on tiny shapes on the CPU, so that the
run on a GPU (rarely available) works the first time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
# The dry run takes about a minute on 2 idle cores; the limit is generous because a loaded
# machine (CI, other jobs) can make it several times slower, and a part that runs out of time
# would fail a check here for no fault of the code.
TOTAL_S = "600"


def dry_run(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick"]
    command += ["--results-dir", str(out), "--total-s", TOTAL_S, *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    files = list(out.glob("gpu-*-quick-*.json"))
    assert len(files) == 1, done.stdout + done.stderr
    return done, json.loads(files[0].read_text())


def test_the_dry_run_runs_every_part_and_skips_the_cuda_tests(tmp_path: Path) -> None:
    done, result = dry_run(tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert result["torch"] and result["device"] and result["mode"].startswith("dry run")
    checks = result["checks"]
    cuda = {k: v for k, v in checks.items() if k.startswith("cuda/test_")}
    # Every cuda-marked test was collected and reported, as skipped (not true) without a GPU.
    assert len(cuda) >= 10 and set(cuda.values()) == {"skipped"}, cuda
    assert checks["cuda/pytest_finished"] is True
    for name in ("train/ours", "train/transformers", "train/flash_sdpa", "train/fused_adamw"):
        assert checks[name] is True, (name, result["errors"].get(name))
    for name in ("decode/batch_1", "decode/batch_4", "decode/profile"):
        assert checks[name] is True, (name, result["errors"].get(name))
    assert all(p["status"] == "ok" for k, p in result["parts"].items() if k != "decode_compiled")
    train = result["figures"]["train"]
    assert train["ours"]["tokens_per_s"] > 0 and train["transformers"]["tokens_per_s"] > 0
    assert train["ours"]["batch_size"] == 4 and train["ours"]["block_size"] == 64
    assert train["fineweb_edu_hours"]["tokens"] == 19073 * 524288
    decode = result["figures"]["decode"]
    assert decode["batch_1"]["ours"]["tokens_per_s"] > 0 and decode["batch_4"]["speed_ratio"] > 0
    assert set(result["goals"]) == {
        "mfu>=0.50",
        "train_ours/transformers>=1.3",
        "decode_batch1_ours/transformers>=2",
    }
    assert result["goals"]["mfu>=0.50"] is None  # no MFU goal off a GPU
    assert "== gpu check:" in done.stdout  # the summary comes last


@pytest.mark.parametrize("part", ["decode"])
def test_a_part_that_breaks_fails_its_check_and_the_run_goes_on(tmp_path: Path, part) -> None:
    done, result = dry_run(tmp_path, "--parts", f"{part},correctness", "--inject-failure", part)
    assert done.returncode == 1  # a false check
    assert result["parts"][part]["status"].startswith("crashed")
    assert result["checks"][f"{part}/finished"] is False
    assert result["parts"]["correctness"]["status"] == "ok"  # the next part still ran
    assert result["checks"]["cuda/pytest_finished"] is True
