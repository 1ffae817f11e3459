"""Where a process stands among training processes: torchrun's variables, even for one process."""

from __future__ import annotations

import pytest

from gpt2.distributed import env_from_torchrun


def test_without_torchrun_nothing_is_distributed(monkeypatch) -> None:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    env = env_from_torchrun()
    assert (env.rank, env.world_size, env.enabled, env.is_main) == (0, 1, False, True)


@pytest.mark.parametrize("world", [1, 4])
def test_under_torchrun_a_process_group_is_used_even_for_one_process(monkeypatch, world) -> None:
    # torchrun --nproc_per_node=1 must run the DDP/FSDP code that eight GPUs will run.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    env = env_from_torchrun()
    assert (env.world_size, env.enabled, env.is_main) == (world, True, True)
