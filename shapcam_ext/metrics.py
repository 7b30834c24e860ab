"""Evaluation metrics for saliency maps, as used in the Shap-CAM paper (§4.1, §4.2).

Faithfulness (Grad-CAM++'s protocol): the input is masked by point-wise multiplication with the
saliency map (``explanation_input``), the model scores the masked input, and the scores with and
without the mask give ``average_drop`` and ``increase_in_confidence``.

Causal curves (RISE's deletion and insertion): ``ranked_curve`` scores the input as its most
salient pixels are taken, in order, from another image; ``area_under_curve`` summarises a curve.
Deletion takes them from a substrate (RISE: zeros), insertion starts from a substrate (RISE: a
blurred copy, ``blurred``) and takes them from the image.

Localisation (Score-CAM's energy-based pointing game): ``energy_pointing_game`` is the share of a
map's total energy that falls inside the object's bounding box(es).

All functions are pure: they take tensors or arrays and return new values.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[float]]

__all__ = [
    "area_under_curve", "average_drop", "blurred", "box_mask", "energy_pointing_game", "explanation_input",
    "increase_in_confidence", "ranked_curve",
]


def _scores(full_scores: ArrayLike, explanation_scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(torch.as_tensor(full_scores, dtype=torch.float64).detach().cpu()).ravel()
    o = np.asarray(torch.as_tensor(explanation_scores, dtype=torch.float64).detach().cpu()).ravel()
    if y.shape != o.shape or y.size == 0:
        raise ValueError(f"need two equally long, non-empty score lists; got {y.size} and {o.size} scores")
    return y, o


def average_drop(full_scores: ArrayLike, explanation_scores: ArrayLike) -> float:
    """Average Drop %: mean over images of max(0, Y - O) / Y, times 100 (lower is better).

    The paper's formula prints a plain sum; Grad-CAM++, which defines the metric, divides by the
    number of images N, and so do the paper's percentages. This function uses the mean.

    Args:
        full_scores: Y, the target-class score (softmax probability) on each original image.
        explanation_scores: O, the same class's score on each explanation-masked image.

    Raises:
        ValueError: the two lists differ in length or are empty, or some Y is not > 0.
    """
    y, o = _scores(full_scores, explanation_scores)
    if not (y > 0).all():
        raise ValueError("full_scores must all be > 0 (probabilities of the explained class)")
    return float(np.mean(np.maximum(0.0, y - o) / y) * 100.0)


def increase_in_confidence(full_scores: ArrayLike, explanation_scores: ArrayLike) -> float:
    """Increase in Confidence %: the share of images whose score rises under the mask (O > Y), times 100.

    Higher is better. Ties count as no increase.

    Raises:
        ValueError: the two lists differ in length or are empty.
    """
    y, o = _scores(full_scores, explanation_scores)
    return float(np.mean(o > y) * 100.0)


def _as_maps(saliency: Union[np.ndarray, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(B, h, w) maps as a tensor beside ``x``, resized bilinearly to its (H, W) when they differ."""
    sal = torch.as_tensor(saliency).to(device=x.device, dtype=x.dtype)
    if x.dim() != 4 or sal.dim() != 3 or sal.shape[0] != x.shape[0]:
        raise ValueError(f"need x (B, C, H, W) and saliency (B, h, w); got {tuple(x.shape)} and {tuple(sal.shape)}")
    if sal.shape[-2:] != x.shape[-2:]:
        sal = F.interpolate(sal[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return sal


def _keep_top(saliency: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Zero all but the ``keep_fraction`` highest pixels of each (H, W) map (ties may keep a few more)."""
    flat = saliency.flatten(1)
    k = max(1, int(round(keep_fraction * flat.shape[1])))
    threshold = flat.topk(k, dim=1).values[:, -1:]
    return torch.where(flat >= threshold, flat, torch.zeros_like(flat)).view_as(saliency)


def explanation_input(
    x: torch.Tensor,
    saliency: Union[np.ndarray, torch.Tensor],
    mean: Sequence[float],
    std: Sequence[float],
    keep_fraction: Optional[float] = None,
) -> torch.Tensor:
    """The input "seen through" the explanation: the image multiplied point-wise by its saliency map.

    The map multiplies the un-normalised image (RGB in [0, 1]), which is then normalised again:
    a pixel with saliency 0 becomes black, the paper's baseline X_b = 0 in image space. Multiplying
    the normalised tensor instead would turn it into the dataset mean colour.

    Args:
        x: (B, 3, H, W) model input, normalised with ``mean`` and ``std``.
        saliency: (B, h, w) maps in [0, 1] (the pytorch-grad-cam contract); resized bilinearly to
            (H, W) when h, w differ.
        mean, std: the per-channel normalisation that produced ``x``.
        keep_fraction: if given, in (0, 1]: only the top ``keep_fraction`` of each map's pixels keep
            their saliency, the rest are set to 0 (the paper "limits the number of positive pixels").

    Returns:
        (B, 3, H, W) normalised tensor, same dtype and device as ``x``.

    Raises:
        ValueError: shapes that don't match, a map outside [0, 1], or keep_fraction outside (0, 1].
    """
    sal = _as_maps(saliency, x)
    if sal.numel() and (sal.min() < 0 or sal.max() > 1):
        raise ValueError("saliency must lie in [0, 1]; min-max scale it first (pytorch-grad-cam maps already are)")
    if keep_fraction is not None and not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if keep_fraction is not None:
        sal = _keep_top(sal, keep_fraction)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    image = x * s + m
    return (image * sal[:, None] - m) / s


def ranked_curve(
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    first: torch.Tensor,
    rest: torch.Tensor,
    saliency: Union[np.ndarray, torch.Tensor],
    steps: int,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The score of inputs whose k most salient pixels come from ``first`` and the others from ``rest``.

    k runs over 0, s, 2s, ... and finally every pixel, with s = ceil(pixels / steps), as in
    torchcam's DeletionInsertionMetric. Pixels are ranked by decreasing saliency, ties in
    row-major order, and a pixel is taken with all its channels. Deletion (RISE) is
    ``ranked_curve(score, substrate, x, ...)``: the top pixels are removed first; insertion is
    ``ranked_curve(score, x, substrate, ...)``: they are restored first.

    Args:
        score: ``score(inputs, images)`` returns the (N,) scores of N model inputs, where
            ``images[i]`` is the index in the batch of the image that ``inputs[i]`` derives from
            (so each image is scored for its own class).
        first, rest: (B, C, H, W) the two sources of pixels.
        saliency: (B, h, w) maps; resized bilinearly to (H, W) when they differ.
        steps: the number of intervals (the curve has at most steps + 1 points).
        batch_size: inputs per call of ``score``.

    Returns:
        (fractions, scores): (P,) the share of pixels taken from ``first`` at each point, from 0
        to 1, and (B, P) the scores there, float64.

    Raises:
        ValueError: shapes that do not match, or steps / batch_size below 1.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if first.shape != rest.shape:
        raise ValueError(f"first and rest must have one shape, got {tuple(first.shape)} and {tuple(rest.shape)}")
    sal = _as_maps(saliency, first)
    batch, pixels = first.shape[0], first.shape[-1] * first.shape[-2]
    order = torch.argsort(sal.flatten(1), dim=1, descending=True, stable=True)
    ranks = torch.argsort(order, dim=1)  # rank of each pixel, 0 = most salient
    stride = -(-pixels // steps)
    counts = torch.tensor([*range(0, pixels, stride), pixels], device=first.device)
    jobs = torch.cartesian_prod(torch.arange(batch, device=first.device), torch.arange(len(counts), device=first.device))
    scores = torch.empty(batch, len(counts), dtype=torch.float64, device=first.device)
    with torch.no_grad():
        for chunk in jobs.split(batch_size):
            images, points = chunk[:, 0], chunk[:, 1]
            taken = (ranks[images] < counts[points, None]).view(-1, 1, *first.shape[-2:])
            inputs = torch.where(taken, first[images], rest[images])
            scores[images, points] = score(inputs, images).to(torch.float64)
    return counts.to(torch.float64) / pixels, scores


def area_under_curve(fractions: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(B,) trapezoidal areas under the curves ``scores`` (B, P) over ``fractions`` (P,) in [0, 1]."""
    return torch.trapezoid(scores, fractions, dim=-1)


def blurred(x: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """A Gaussian-blurred copy of a (B, C, H, W) batch: RISE's insertion substrate (kernel 11, sigma 5).

    The blur is linear with weights summing to 1, so blurring the normalised input equals
    normalising the blurred image.
    """
    import torchvision.transforms.functional as TF

    return TF.gaussian_blur(x, [kernel_size, kernel_size], [sigma, sigma])


def box_mask(shape: tuple[int, int], boxes: ArrayLike) -> np.ndarray:
    """Boolean (H, W) mask of the union of boxes.

    Args:
        shape: (H, W) of the map.
        boxes: one box (x0, y0, x1, y1) or a (K, 4) list of them, in pixel coordinates of the map,
            half-open like slicing: pixel columns x0..x1-1 and rows y0..y1-1 are inside.
            Coordinates are rounded to the nearest pixel edge and clipped to the map.

    Raises:
        ValueError: a box that is not 4 numbers, or an empty box (x1 <= x0 or y1 <= y0).
    """
    boxes = np.atleast_2d(np.asarray(boxes, dtype=np.float64))
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (x0, y0, x1, y1) or (K, 4); got shape {boxes.shape}")
    height, width = shape
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"empty box {(x0, y0, x1, y1)}: need x1 > x0 and y1 > y0")
        c0, c1 = (int(np.clip(round(v), 0, width)) for v in (x0, x1))
        r0, r1 = (int(np.clip(round(v), 0, height)) for v in (y0, y1))
        mask[r0:r1, c0:c1] = True
    return mask


def energy_pointing_game(saliency: Union[np.ndarray, torch.Tensor], boxes: ArrayLike) -> float:
    """Energy-based pointing game (Score-CAM): the share of the map's energy inside the box(es).

    Proportion = sum of L inside / (sum inside + sum outside), in [0, 1]. A uniform map scores the
    boxes' area fraction, a map that lies entirely inside scores 1.

    Args:
        saliency: (H, W) non-negative map, e.g. a pytorch-grad-cam output.
        boxes: see :func:`box_mask`, in pixel coordinates of ``saliency``.

    Raises:
        ValueError: a map that is not 2-D, has negative values or sums to 0, or bad boxes.
    """
    sal = np.asarray(torch.as_tensor(saliency, dtype=torch.float64).detach().cpu())
    if sal.ndim != 2:
        raise ValueError(f"saliency must be one (H, W) map, got shape {sal.shape}")
    if (sal < 0).any():
        raise ValueError("saliency must be non-negative (apply ReLU first); energy is undefined otherwise")
    total = sal.sum()
    if not total > 0:
        raise ValueError("saliency sums to 0: the map has no energy to locate")
    return float(sal[box_mask(sal.shape, boxes)].sum() / total)
