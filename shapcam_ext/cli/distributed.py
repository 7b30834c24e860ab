"""Sharding a list of work items across the processes that torchrun starts.

Outside torchrun (no WORLD_SIZE > 1) everything is a no-op: one process takes every item.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, List, Sequence

import torch.distributed as dist


def world() -> tuple:
    """(rank, world size) of this process, from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


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


def my_share(count: int) -> List[int]:
    """Indices of the items this process handles: every size-th, from its rank."""
    rank, size = world()
    return list(range(rank, count, size))


def gather_in_order(local: Sequence, count: int) -> list:
    """Every process's results for its share, reassembled in item order on every rank."""
    rank, size = world()
    if size == 1:
        return list(local)
    shares: list = [None] * size
    dist.all_gather_object(shares, list(local))
    ordered = [None] * count
    for r, share in enumerate(shares):
        for index, item in zip(range(r, count, size), share):
            ordered[index] = item
    return ordered
