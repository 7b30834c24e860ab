"""RISE: the saliency of a pixel is the expected score of randomly masked inputs that keep it.

Petsiuk, Das & Saenko (BMVC 2018), as in the authors' reference code: N binary grids of s x s
cells, each cell kept with probability p, are upsampled bilinearly to (s + 1) x the cell size and
cropped at a random shift; the normalised input is multiplied by each mask (a removed pixel takes
the mean colour) and the saliency is sum_i score(I * M_i) M_i / (N p).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from shapcam_ext.model_state import eval_semantics
from shapcam_ext.postprocess import scale_cam_image
from shapcam_ext.targets import Scorer, Target, resolve_targets

__all__ = ["RISE"]


class RISE:
    """RISE saliency maps with pytorch-grad-cam's contract.

    Args:
        model: the classifier; it runs under eval semantics and its modes are restored.
        n_masks: N, the number of random masks (the paper's ImageNet setting: 4000).
        cells: s, the grid's cells per side (7).
        keep_probability: p, the chance that a cell is kept (0.5).
        seed: seeds the masks; the same seed gives the same masks on any device.
        batch_size: masked inputs per forward pass.
        progress: show a progress bar over the masks.

    Raises:
        ValueError: a setting out of range.
    """

    def __init__(self, model: torch.nn.Module, n_masks: int = 4000, cells: int = 7, keep_probability: float = 0.5,
                 seed: int = 0, batch_size: int = 100, progress: bool = False):
        if n_masks < 1 or cells < 1 or batch_size < 1:
            raise ValueError(f"n_masks, cells and batch_size must be >= 1, got {n_masks}, {cells}, {batch_size}")
        if not 0 < keep_probability <= 1:
            raise ValueError(f"keep_probability must be in (0, 1], got {keep_probability}")
        self.model, self.n_masks, self.cells, self.keep_probability = model, n_masks, cells, keep_probability
        self.seed, self.batch_size, self.progress = seed, batch_size, progress

    def masks(self, size: tuple[int, int], device: torch.device) -> Iterator[torch.Tensor]:
        """The N masks, (count, 1, H, W) in [0, 1], in chunks of ``batch_size``.

        Grids and shifts are drawn up front on the CPU from ``seed``, so the masks do not depend
        on the device or the chunking.
        """
        height, width = size
        cell = (math.ceil(height / self.cells), math.ceil(width / self.cells))
        generator = torch.Generator().manual_seed(self.seed)
        grids = (torch.rand(self.n_masks, 1, self.cells, self.cells, generator=generator) < self.keep_probability)
        rows = torch.randint(0, cell[0], (self.n_masks,), generator=generator).tolist()
        cols = torch.randint(0, cell[1], (self.n_masks,), generator=generator).tolist()
        for start in range(0, self.n_masks, self.batch_size):
            chunk = range(start, min(self.n_masks, start + self.batch_size))
            # The reference resizes with skimage (order 1); align_corners=False samples the same points,
            # and only its border mode (reflect, here clamped) differs, within half a cell of the edge.
            upsampled = F.interpolate(grids[chunk.start:chunk.stop].to(device, torch.float32),
                                      size=((self.cells + 1) * cell[0], (self.cells + 1) * cell[1]),
                                      mode="bilinear", align_corners=False)
            yield torch.stack([upsampled[i - start, :, rows[i]:rows[i] + height, cols[i]:cols[i] + width]
                               for i in chunk])

    def saliency(self, input_tensor: torch.Tensor, targets: Optional[Sequence[Target]] = None) -> torch.Tensor:
        """(B, H, W) float64 RISE saliency: each pixel's expected score given that it is kept.

        Raises:
            ValueError: targets that do not fit the batch (see :func:`shapcam_ext.targets.resolve_targets`).
        """
        batch, size = input_tensor.shape[0], tuple(input_tensor.shape[-2:])
        total = torch.zeros(batch, size[0] * size[1], dtype=torch.float64, device=input_tensor.device)
        scorer = Scorer()
        with eval_semantics(self.model):
            targets = resolve_targets(targets, self.model(input_tensor), batch)
            bar = tqdm(total=self.n_masks, desc="RISE masks", unit="mask", disable=not self.progress, leave=False)
            with bar:
                for masks in self.masks(size, input_tensor.device):
                    count = masks.shape[0]
                    flat = masks.view(count, -1).double()
                    for i in range(batch):
                        scores = scorer([targets[i]], self.model(input_tensor[i:i + 1] * masks), count)
                        total[i] += scores[0].double() @ flat
                    bar.update(count)
        return (total / (self.n_masks * self.keep_probability)).view(batch, *size)

    def __call__(self, input_tensor: torch.Tensor, targets: Optional[Sequence[Target]] = None) -> np.ndarray:
        """(B, H, W) float32 maps in [0, 1]: :meth:`saliency`, min-max scaled per image."""
        return scale_cam_image(self.saliency(input_tensor, targets).cpu())
