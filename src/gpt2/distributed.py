"""Data-parallel training through ``torchrun``: DDP by default, FSDP2 (``fully_shard``) as an option.

``torchrun --nproc_per_node=N -m gpt2 train ...`` starts N copies of the program and tells each
its place through environment variables (RANK, LOCAL_RANK, WORLD_SIZE). Each copy holds the whole
model (DDP) or a 1/N shard of it (FSDP), reads its own slice of every batch (`gpt2.loader`), and
the gradients are averaged across copies before each optimizer step. The backend is NCCL between
GPUs and gloo between CPU processes. Run without torchrun, everything here is a no-op.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gpt2.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """This process's place among the training processes."""

    rank: int = 0
    local_rank: int = 0  # rank on this machine: the GPU it uses
    world_size: int = 1
    launched: bool = False  # started by torchrun (a process group, even of one process)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether to join a process group and wrap the model: under torchrun, even with
        ``--nproc_per_node=1`` (so that one GPU runs the DDP/FSDP code it will run on eight)."""
        return self.launched or self.world_size > 1


def env_from_torchrun() -> DistEnv:
    """Read the variables torchrun sets; a single process when they are absent."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv()
    try:
        return DistEnv(
            rank=int(os.environ["RANK"]),
            local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
            world_size=int(os.environ["WORLD_SIZE"]),
            launched=True,
        )
    except ValueError:
        raise UserError("RANK, LOCAL_RANK and WORLD_SIZE must be integers") from None


def setup(env: DistEnv, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo otherwise) and return this rank's device."""
    if not env.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size)
    return device


def teardown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, env: DistEnv, device: torch.device, fsdp: bool) -> nn.Module:
    """DDP around ``model``, or FSDP2 sharding applied to it in place (each block a unit, then
    the root: a block's weights are gathered just before it runs and freed after)."""
    if not env.enabled:
        if fsdp:
            raise UserError("--fsdp needs several processes: start training with torchrun")
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (env.world_size,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        _log_wrapping("FSDP2", env)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    wrapped = DistributedDataParallel(model, device_ids=device_ids)
    _log_wrapping("DDP", env)
    return wrapped


def _log_wrapping(kind: str, env: DistEnv) -> None:
    if env.is_main:
        log.info("%s over %d process(es)", kind, env.world_size)


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, sync: bool) -> Iterator[None]:
    """Within this context, backward averages gradients across ranks only if ``sync``: the
    micro-steps before the last one of an accumulated step just add up local gradients."""
    no_sync = getattr(wrapped, "no_sync", None)  # DDP
    set_sync = getattr(wrapped, "set_requires_gradient_sync", None)  # FSDP2
    if sync or (no_sync is None and set_sync is None):
        if set_sync is not None:
            set_sync(True)
        yield
    elif no_sync is not None:
        with no_sync():
            yield
    else:
        set_sync(False)
        yield


def all_reduce(tensor: torch.Tensor, env: DistEnv, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` across ranks in place ("sum" or "max"); unchanged in one process."""
    if env.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def all_gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Model and optimizer state as whole CPU tensors, the optimizer's keyed by parameter name.

    Under FSDP every rank must call this (the shards are gathered) and only rank 0 receives the
    tensors. Elsewhere it is local; the same format either way, so a checkpoint written by a
    sharded run resumes unsharded and the other way round.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (
        get_model_state_dict(model, options=options),
        get_optimizer_state_dict(model, optimizer, options=options),
    )


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Whole optimizer state from `full_state` (present on every rank) into ``optimizer``,
    sharded as the model's parameters are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )
