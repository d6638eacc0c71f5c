"""torch.distributed helpers: who am I, sums across processes, joining and leaving the group.

Under torchrun (WORLD_SIZE > 1) every process joins one group: NCCL on GPUs, gloo on CPUs.
Without it every helper is the single-process identity, so nothing else needs to ask.
"""

from __future__ import annotations

import os

import torch

__all__ = ["rank_and_world", "all_sum", "init_from_env", "finish"]


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size) under torch.distributed, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over the processes (the values themselves with one process)."""
    _, world = rank_and_world()
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def init_from_env(use_cuda: bool) -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return
    use_cuda = use_cuda and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")


def finish() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
