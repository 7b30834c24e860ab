"""Feeding samples to the model: decoded and preprocessed by DataLoader workers, in batches, sharded under torchrun.

Each process loads only its share of the samples: a DistributedSampler deals them round-robin
(sample r of each round of ``world`` goes to rank r). The sampler's own padding would repeat
samples to even out the shares; here the dataset is padded with empty items instead, so every
sample is explained exactly once and every process runs the same number of batches (each batch
ends with a collective exchange of results).

An image that cannot be read becomes a failure of its own in its batch; the others still load.
"""
from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from shapcam_ext.cli import distributed
from shapcam_ext.cli.boxes import Box, box_to_input
from shapcam_ext.cli.datasets import Sample
from shapcam_ext.cli.errors import IMAGE_ERRORS
from shapcam_ext.cli.preprocessing import PreprocessConfig

__all__ = ["Batch", "SampleImages", "batches"]


@dataclass
class _Item:
    index: int
    x: Optional[torch.Tensor] = None
    boxes: tuple[Box, ...] = ()
    error: Optional[tuple[str, str]] = None  # message, traceback
    skipped: bool = False


@dataclass
class Batch:
    """One batch of samples, by index into the sample list.

    indices: the samples whose images loaded, in the order of ``x``.
    x: (len(indices), 3, H, W) model inputs, or None when none loaded.
    boxes: per loaded sample, its boxes in the input's pixels (boxes cropped away dropped).
    failures: (index, one-line message, traceback) of samples whose image could not be loaded.
    skipped: samples passed over (their outputs are kept).
    """

    indices: list[int] = field(default_factory=list)
    x: Optional[torch.Tensor] = None
    boxes: list[tuple[Box, ...]] = field(default_factory=list)
    failures: list[tuple[int, str, str]] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)


def _message(sample: Sample, err: Exception) -> str:
    text = str(err)
    return text if str(sample.image) in text else f"{sample.image}: {text}"  # load_image's errors name the file


class SampleImages(Dataset):
    """The preprocessed images of some samples, padded with empty items to a multiple of the world size.

    Args:
        samples: every sample of the run.
        cfg: the model's preprocessing.
        indices: which samples to go through, in order.
        skip: samples among them to pass over without loading.
    """

    def __init__(self, samples: Sequence[Sample], cfg: PreprocessConfig, indices: Sequence[int],
                 skip: frozenset = frozenset()):
        self.samples, self.cfg, self.indices, self.skip = samples, cfg, list(indices), skip
        world = distributed.world()[1]
        self.length = math.ceil(len(self.indices) / world) * world

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, position: int) -> Optional[_Item]:
        from shapcam_ext.cli.images import load_image
        from shapcam_ext.cli.preprocessing import preprocess

        if position >= len(self.indices):
            return None  # padding
        index = self.indices[position]
        sample = self.samples[index]
        if index in self.skip:
            return _Item(index, skipped=True)
        try:
            image = load_image(sample.image)
            boxes = tuple(box_to_input(box, image.size, self.cfg) for box in sample.boxes)
            return _Item(index, preprocess(image, self.cfg)[0], tuple(b for b in boxes if b[2] > b[0] and b[3] > b[1]))
        except IMAGE_ERRORS as err:  # the traceback as text: a worker's exception does not travel
            return _Item(index, error=(_message(sample, err), traceback.format_exc()))


def _collate(items: list) -> Batch:
    batch = Batch()
    loaded = []
    for item in items:
        if item is None:
            continue
        if item.skipped:
            batch.skipped.append(item.index)
        elif item.error is not None:
            batch.failures.append((item.index, *item.error))
        else:
            batch.indices.append(item.index)
            batch.boxes.append(item.boxes)
            loaded.append(item.x)
    batch.x = torch.stack(loaded) if loaded else None
    return batch


def batches(images: SampleImages, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    """This process's batches of ``images``, in sample order within its share.

    Args:
        images: the samples to load.
        batch_size: samples per batch.
        workers: DataLoader worker processes (0 loads in this process).
        pin_memory: page-locked batches, for copies to a GPU.
    """
    rank, world = distributed.world()
    sampler = DistributedSampler(images, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
    return DataLoader(images, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=_collate,
                      pin_memory=pin_memory)
