"""Sharing a list of work items among the processes that torchrun starts.

Items are dealt round-robin: in round r, the process of rank k takes item r * size + k. After
each round every process learns the round's results, so rank 0 can report them in item order
while the run goes on. Outside torchrun (no WORLD_SIZE > 1) one process takes every item and
nothing is exchanged.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch.distributed as dist

__all__ = ["gather", "local_rank", "process_group", "rounds", "world"]


def world() -> tuple[int, int]:
    """(rank, world size) of this process, from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """This process's rank on its own machine (torchrun's LOCAL_RANK; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", 0))


@contextmanager
def process_group() -> Iterator[None]:
    """A gloo process group for the duration of the block when started by torchrun."""
    rank, size = world()
    if size == 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def rounds(count: int) -> Iterator[Optional[int]]:
    """This process's item index in each round, or None in a last round with fewer items than processes.

    Every process sees the same number of rounds, so each can call :func:`gather` once per round.
    """
    rank, size = world()
    for start in range(0, count, size):
        yield start + rank if start + rank < count else None


def gather(item: Any) -> list:
    """Every process's ``item`` of this round, in rank order (that is, item order); [item] outside torchrun."""
    size = world()[1]
    if size == 1:
        return [item]
    items: list = [None] * size
    dist.all_gather_object(items, item)
    return items
