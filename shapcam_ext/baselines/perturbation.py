"""Meaningful perturbation ("Mask"): the smallest smooth region whose blurring deletes the class.

Fong & Vedaldi (ICCV 2017), with the settings of the authors' code: a mask m at 1/8 of the input
resolution (1 keeps a pixel, 0 replaces it by a Gaussian blur of the image with sigma 10) is
upsampled (nearest) and blurred (sigma 5), the input is jittered by up to 3 pixels, and Adam
(learning rate 0.1, 300 iterations, m clipped to [0, 1]) minimises

    lambda1 * sum |1 - m|  +  lambda2 * sum (|grad m|^2)^(beta / 2)  +  score(m * x + (1 - m) * blur(x))

with lambda1 = 1e-4, lambda2 = 1e-2, beta = 3 and the class's softmax probability as the score.
The mask starts, as in the authors' code, from the smallest blurred centred disc whose blurring
removes 99% of the score that blurring the largest disc removes. The saliency is 1 - the final
upsampled, blurred mask. Unlike the authors' code, the gradient passes through the mask's blur
(theirs skips it), so Adam minimises exactly the objective above.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from shapcam_ext.model_state import eval_semantics
from shapcam_ext.postprocess import scale_cam_image
from shapcam_ext.targets import Scorer, Target, resolve_targets

__all__ = ["MeaningfulPerturbation", "gaussian_blur"]

DISC_SCORE_LEFT = 0.01  # the initial disc removes all but 1% of what the largest disc removes


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of a (B, C, H, W) batch over 3 sigma each side, with reflected borders.

    torchvision's kernel and borders, applied as two 1-D passes (its 2-D kernel is slow for sigma
    10). The kernel is cut to the image when it is smaller: reflection needs the image to be
    wider than the kernel's half-width.
    """
    radius = min(math.ceil(3 * sigma), min(x.shape[-2:]) - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def total_variation(mask: torch.Tensor, beta: float) -> torch.Tensor:
    """(B,) sum over positions of (dx^2 + dy^2)^(beta / 2), forward differences, 0 past the edge (their ``tv``)."""
    dy = F.pad(mask[..., 1:, :] - mask[..., :-1, :], (0, 0, 0, 1))
    dx = F.pad(mask[..., :, 1:] - mask[..., :, :-1], (0, 1, 0, 0))
    return (dx * dx + dy * dy).pow(beta / 2).flatten(1).sum(1)


class MeaningfulPerturbation:
    """Fong & Vedaldi's learned deletion mask with pytorch-grad-cam's contract.

    Args:
        model: the classifier; it runs under eval semantics, its modes are restored, and only the
            mask receives gradients.
        iterations, learning_rate: Adam's steps and step size (300, 0.1).
        l1_coefficient, tv_coefficient, tv_beta: lambda1, lambda2 and beta (1e-4, 1e-2, 3).
        mask_scale: the mask has 1/mask_scale of the input's resolution (8).
        blur_sigma: the perturbation, a Gaussian blur of the image (10 pixels).
        mask_blur_sigma: smoothing of the upsampled mask (5 pixels).
        jitter: each step shifts the image by 0 to jitter - 1 pixels (4).
        seed: seeds the jitter.
        progress: show a progress bar over the iterations.

    Raises:
        ValueError: a setting out of range.
    """

    def __init__(self, model: torch.nn.Module, iterations: int = 300, learning_rate: float = 0.1,
                 l1_coefficient: float = 1e-4, tv_coefficient: float = 1e-2, tv_beta: float = 3.0,
                 mask_scale: int = 8, blur_sigma: float = 10.0, mask_blur_sigma: float = 5.0, jitter: int = 4,
                 seed: int = 0, progress: bool = False):
        if iterations < 1 or mask_scale < 1 or jitter < 1:
            raise ValueError(f"iterations, mask_scale and jitter must be >= 1, got {iterations}, {mask_scale}, {jitter}")
        if min(learning_rate, blur_sigma, mask_blur_sigma, tv_beta) <= 0 or min(l1_coefficient, tv_coefficient) < 0:
            raise ValueError("learning_rate, blur_sigma, mask_blur_sigma and tv_beta must be > 0, the coefficients >= 0")
        self.model, self.iterations, self.learning_rate = model, iterations, learning_rate
        self.l1_coefficient, self.tv_coefficient, self.tv_beta = l1_coefficient, tv_coefficient, tv_beta
        self.mask_scale, self.blur_sigma, self.mask_blur_sigma = mask_scale, blur_sigma, mask_blur_sigma
        self.jitter, self.seed, self.progress = jitter, seed, progress

    def _upsample(self, mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The mask at input resolution: nearest upsampling, cropped to ``size``, then blurred."""
        up = mask.repeat_interleave(self.mask_scale, -2).repeat_interleave(self.mask_scale, -1)
        return gaussian_blur(up[..., :size[0], :size[1]], self.mask_blur_sigma)

    def _initial_mask(self, x: torch.Tensor, null: torch.Tensor, score) -> torch.Tensor:
        """(B, 1, h, w): per image, the smallest centred blurred disc that removes the class (see module)."""
        height, width = x.shape[-2:]
        side = min(height, width)
        radii = torch.arange(0, round(0.78 * side), max(1, round(side / 45)), device=x.device)
        rows = torch.arange(height, device=x.device).view(-1, 1) - height // 2
        cols = torch.arange(width, device=x.device).view(1, -1) - width // 2
        discs = ((rows ** 2 + cols ** 2)[None] <= radii.view(-1, 1, 1) ** 2).to(x.dtype)[:, None]
        keeps = 1 - gaussian_blur(discs, self.blur_sigma)  # (R, 1, H, W): 1 keeps the image
        masks = []
        for i in range(x.shape[0]):
            kept = score(x[i:i + 1] * keeps + null[i:i + 1] * (1 - keeps), i, len(radii))
            full = score(x[i:i + 1], i, 1)
            left = (kept - kept[-1]) / (full - kept[-1]).clamp_min(1e-12)
            chosen = int(torch.nonzero(left < DISC_SCORE_LEFT)[0]) if bool((left < DISC_SCORE_LEFT).any()) else -1
            masks.append(keeps[chosen])
        size = (math.ceil(height / self.mask_scale), math.ceil(width / self.mask_scale))
        return F.interpolate(torch.stack(masks), size=size, mode="nearest")

    def deletion_masks(self, input_tensor: torch.Tensor, targets: Optional[Sequence[Target]] = None) -> torch.Tensor:
        """(B, 1, h, w) the optimised masks at 1/mask_scale resolution (1 keeps, 0 blurs).

        Raises:
            ValueError: targets that do not fit the batch.
        """
        batch, size = input_tensor.shape[0], tuple(input_tensor.shape[-2:])
        scorer = Scorer()
        generator = torch.Generator().manual_seed(self.seed)
        with eval_semantics(self.model):
            targets = resolve_targets(targets, self.model(input_tensor), batch)

            def score(inputs, image, rows):
                return scorer([targets[image]], self.model(inputs), rows)[0]

            null = gaussian_blur(input_tensor, self.blur_sigma)
            mask = self._initial_mask(input_tensor, null, score).requires_grad_(True)
            optimizer = torch.optim.Adam([mask], lr=self.learning_rate)
            pad = (0, self.jitter - 1, 0, self.jitter - 1)
            image, blur = F.pad(input_tensor, pad, mode="replicate"), F.pad(null, pad, mode="replicate")
            for _ in tqdm(range(self.iterations), desc="mask", unit="step", disable=not self.progress, leave=False):
                dy, dx = torch.randint(0, self.jitter, (2,), generator=generator).tolist()
                crop = (slice(None), slice(None), slice(dy, dy + size[0]), slice(dx, dx + size[1]))
                with torch.enable_grad():
                    keep = self._upsample(mask, size)
                    blended = image[crop] * keep + blur[crop] * (1 - keep)
                    scores = scorer(targets, self.model(blended), 1).sum()
                    loss = (scores + self.l1_coefficient * (1 - mask).abs().sum()
                            + self.tv_coefficient * total_variation(mask, self.tv_beta).sum())
                    (gradient,) = torch.autograd.grad(loss, mask)
                mask.grad = gradient
                optimizer.step()
                with torch.no_grad():
                    mask.clamp_(0, 1)
        return mask.detach()

    def __call__(self, input_tensor: torch.Tensor, targets: Optional[Sequence[Target]] = None) -> np.ndarray:
        """(B, H, W) float32 maps in [0, 1]: 1 - the upsampled blurred mask, min-max scaled per image."""
        size = tuple(input_tensor.shape[-2:])
        deleted = 1 - self._upsample(self.deletion_masks(input_tensor, targets), size)[:, 0]
        return scale_cam_image(deleted.cpu())
