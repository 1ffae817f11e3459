"""Shared test set-up: a writable asset cache for the session, so that no test downloads.

The assets come from the first of: ``$GPT2_SHARED_DATA``, ``../shared/data`` (CI and this
workspace), or the user's own cache (``$GPT2_CACHE_DIR``, else ``~/.cache/gpt2``), which is filled
once through the project's sha256-checked downloader (`gpt2.assets.fetch`) on a machine with a
network. Either way the session works on a copy, so no test can change the source.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_ENV = "GPT2_SHARED_DATA"
# What the suite reads: GPT-2's vocabulary (three files) and TinyShakespeare.
TEST_ASSETS = (
    "gpt2-tokenizer/encoder.json",
    "gpt2-tokenizer/vocab.bpe",
    "gpt2-tokenizer/gpt2.tiktoken",
    "tinyshakespeare/input.txt",
)


def asset_source() -> Path:
    """The folder to copy the session's assets from (see the module docstring)."""
    if os.environ.get(SHARED_ENV):
        shared = Path(os.environ[SHARED_ENV])
        if not shared.is_dir():
            pytest.exit(f"{SHARED_ENV}={shared} is not a folder", returncode=2)
        return shared
    if (REPO.parent / "shared" / "data").is_dir():
        return REPO.parent / "shared" / "data"
    from gpt2 import assets
    from gpt2.errors import UserError

    try:
        for name in TEST_ASSETS:
            assets.fetch(name)  # a file already there is only checked
    except UserError as e:
        pytest.exit(
            f"test assets: not in ${SHARED_ENV}, ../shared/data or {assets.cache_dir()}, and "
            f"cannot be downloaded: {e}",
            returncode=2,
        )
    return assets.cache_dir()


@pytest.fixture(scope="session", autouse=True)
def asset_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of the assets, used as $GPT2_CACHE_DIR for the whole session."""
    source = asset_source()
    cache = tmp_path_factory.mktemp("gpt2-cache")
    for name in TEST_ASSETS:
        if not (source / name).is_file():
            pytest.exit(f"test assets: {source} has no {name}", returncode=2)
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, cache / name)
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
