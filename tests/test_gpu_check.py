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


def load_script():
    """bench/gpu_check.py as a module, for its helpers (it is a script, not a package module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_batch_search_steps_down_after_out_of_memory_and_re_raises_other_errors(tmp_path):
    from types import SimpleNamespace

    gpu_check = load_script()
    args = SimpleNamespace(device="cpu", quick=True, deadline=0)
    ctx = gpu_check.Context(args, tmp_path)
    built = []

    def build(batch: int):
        built.append(batch)
        if batch > 2:  # what torch.cuda.OutOfMemoryError says
            raise RuntimeError(f"CUDA out of memory. Tried to allocate {batch} GiB")
        return batch

    obj, batch, tried = gpu_check.fit_batch(ctx, build, lambda b: lambda: b, (8, 4, 2, 1))
    assert (obj, batch, built) == (2, 2, [8, 4, 2])
    assert [t["fits"] for t in tried] == [False, False, True]

    def broken(batch: int):
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError, match="a bug"):
        gpu_check.fit_batch(ctx, broken, lambda b: lambda: b, (8, 4))


def test_test_outcomes_count_a_test_that_never_finished_as_false(tmp_path):
    gpu_check = load_script()
    lines = [
        {"test": "test_a", "when": "setup", "outcome": "passed", "properties": {}},
        {"test": "test_a", "when": "call", "outcome": "passed", "properties": {"k": "v"}},
        {"test": "test_a", "when": "teardown", "outcome": "passed", "properties": {"k": "v"}},
        {"test": "test_b", "when": "setup", "outcome": "skipped", "properties": {}},
        {"test": "test_b", "when": "teardown", "outcome": "passed", "properties": {}},
        {"test": "test_c", "when": "setup", "outcome": "passed", "properties": {}},
        {"test": "test_c", "when": "call", "outcome": "failed", "properties": {}, "error": "E"},
        {"test": "test_d", "when": "setup", "outcome": "passed", "properties": {}},  # killed
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    outcomes = gpu_check.test_outcomes(path)
    assert {k: v[0] for k, v in outcomes.items()} == {
        "test_a": True,
        "test_b": "skipped",
        "test_c": False,
        "test_d": False,
    }
    assert outcomes["test_a"][1] == {"k": "v"} and outcomes["test_c"][2] == "E"
