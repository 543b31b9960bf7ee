"""Data-parallel training with torch.distributed, as launched by torchrun (gloo on CPU, NCCL on GPU).

`torchrun --nproc_per_node=N -m distillab train <config>` sets RANK / WORLD_SIZE / LOCAL_RANK; a plain
launch is a world of one, and nothing here does anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distillab.errors import DistillabError


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_from_env() -> World:
    """The process's place in a torchrun launch (a world of one without torchrun)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def init_world(device: torch.device) -> World:
    """Join the process group torchrun described (once per process); pins the local GPU under NCCL."""
    world = world_from_env()
    if not world.distributed or dist.is_initialized():
        return world
    if "MASTER_ADDR" not in os.environ:
        raise DistillabError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend)
    return world


def current_world() -> World:
    """The world this process has joined: a world of one unless `init_world` joined a torchrun launch. Refuses a
    torchrun launch whose process group nobody joined (the CLI joins it; a Python user calls `init_world`)."""
    world = world_from_env()
    if world.distributed and not dist.is_initialized():
        raise DistillabError(f"WORLD_SIZE={world.world_size} but this process has not joined the process group: "
                             "call distillab.engine.distributed.init_world(device) first (the CLI does)")
    return world


def local_device(device: torch.device, world: World) -> torch.device:
    """Each rank drives its own GPU (cuda:LOCAL_RANK); CPU ranks share the CPU."""
    if device.type == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank)
    return device


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum over ranks, in place (a no-op in a world of one)."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_flag(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank if it is true on any (e.g. a stop request seen by one rank)."""
    if not world.distributed:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """For a method's own collectives (a gradient it steps itself, calibration sums): sum `tensor` in place over
    the data-parallel ranks, or average it with `mean`; nothing on one process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
        if mean:
            tensor /= dist.get_world_size()
    return tensor
