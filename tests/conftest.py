"""Shared test set-up: an asset cache copied from ../shared/data, so that no test downloads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GPT2_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def asset_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of the shared assets, used as $GPT2_CACHE_DIR for the whole session."""
    if not SHARED_DATA.is_dir():
        pytest.exit(f"test assets not found at {SHARED_DATA}; set GPT2_SHARED_DATA", returncode=2)
    cache = tmp_path_factory.mktemp("gpt2-cache")
    shutil.copytree(SHARED_DATA, cache, dirs_exist_ok=True)
    for p in cache.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    os.environ["GPT2_CACHE_DIR"] = str(cache)
    return cache


# Tests use tiny models, where a second thread only adds synchronisation; on a loaded machine
# OpenMP's spin-waiting made a 2-thread run 20x slower than one thread. Benchmarks use all cores.
torch.set_num_threads(int(os.environ.get("GPT2_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seeded():
    """Each test starts from the same default generator state, whatever ran before."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shakespeare(asset_cache: Path) -> Path:
    return asset_cache / "tinyshakespeare" / "input.txt"


# Tests whose float comparisons depend on the CPU's kernels (sums taken in another order, fused
# multiply-adds, bf16 units): `make test-numerics` runs them again under the older kernel set, so
# that CI on any one machine covers both kinds.
NUMERICS = {
    "test_ddp.py": "two processes against one accumulating",
    "test_resume.py": "bit-identical resume",
    "test_hf.py": "logits against transformers",
    "test_generate.py": "cached against cache-free decoding",
    "test_generate_hf.py": "greedy tokens against transformers",
    "test_precision.py": "bf16 autocast against float32",
    "test_train.py": "accumulation and the chunked loss against the plain loss",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks the kernel-sensitive tests ``numerics``. Tests marked ``cuda`` need a GPU: without
    one they are skipped (``GPT2_CUDA_TESTS_ON=cpu`` runs them on the CPU instead, to check the
    tests themselves)."""
    for item in items:
        if item.path.name in NUMERICS:
            item.add_marker(pytest.mark.numerics)
    if torch.cuda.is_available() or os.environ.get("GPT2_CUDA_TESTS_ON") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bench/gpu_check.py runs these)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
