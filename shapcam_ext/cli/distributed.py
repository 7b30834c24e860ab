"""The processes that torchrun starts: who this process is, its process group, and exchanging results.

Samples are dealt to the processes by a DistributedSampler (see :mod:`shapcam_ext.cli.loader`).
After each batch every process learns every process's results (:func:`gather`), so rank 0 can
report them in sample order while the run goes on, and all processes agree on the exit status.
Outside torchrun (no WORLD_SIZE > 1) one process does everything and nothing is exchanged.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

__all__ = ["broadcast", "gather", "gather_to_main", "local_rank", "process_group", "world"]


def world() -> tuple[int, int]:
    """(rank, world size) of this process, from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """This process's rank on its own machine (torchrun's LOCAL_RANK; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", 0))


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """A process group for the duration of the block when started by torchrun.

    NCCL when the processes run on CUDA devices (each on its LOCAL_RANK's GPU unless ``device``
    names one), gloo on the CPU.
    """
    size = world()[1]
    if size == 1 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device if device.index is not None else local_rank() % torch.cuda.device_count())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def gather(item: Any) -> list:
    """Every process's ``item``, in rank order; [item] outside torchrun."""
    size = world()[1]
    if size == 1:
        return [item]
    items: list = [None] * size
    dist.all_gather_object(items, item)
    return items


def gather_to_main(item: Any) -> Optional[list]:
    """Every process's ``item``, in rank order, on rank 0 (None on the others); [item] outside torchrun.

    For results only rank 0 writes (maps): the others do not receive them.
    """
    rank, size = world()
    if size == 1:
        return [item]
    items: Optional[list] = [None] * size if rank == 0 else None
    dist.gather_object(item, items, dst=0)
    return items


def broadcast(item: Any) -> Any:
    """Rank 0's ``item`` in every process; ``item`` itself outside torchrun."""
    if world()[1] == 1:
        return item
    box = [item]
    dist.broadcast_object_list(box, src=0)
    return box[0]
