"""Evaluation metrics for saliency maps, as used in the Shap-CAM paper (§4.1, §4.2).

Faithfulness (Grad-CAM++'s protocol): the input is masked by point-wise multiplication with the
saliency map (``explanation_input``), the model scores the masked input, and the scores with and
without the mask give ``average_drop`` and ``increase_in_confidence``.

Localisation (Score-CAM's energy-based pointing game): ``energy_pointing_game`` is the share of a
map's total energy that falls inside the object's bounding box(es).

All functions are pure: they take tensors or arrays and return new values.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[float]]

__all__ = ["average_drop", "increase_in_confidence", "explanation_input", "box_mask", "energy_pointing_game"]


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
    sal = torch.as_tensor(saliency).to(device=x.device, dtype=x.dtype)
    if x.dim() != 4 or sal.dim() != 3 or sal.shape[0] != x.shape[0]:
        raise ValueError(f"need x (B, C, H, W) and saliency (B, h, w); got {tuple(x.shape)} and {tuple(sal.shape)}")
    if sal.numel() and (sal.min() < 0 or sal.max() > 1):
        raise ValueError("saliency must lie in [0, 1]; min-max scale it first (pytorch-grad-cam maps already are)")
    if keep_fraction is not None and not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if sal.shape[-2:] != x.shape[-2:]:
        sal = F.interpolate(sal[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    if keep_fraction is not None:
        sal = _keep_top(sal, keep_fraction)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    image = x * s + m
    return (image * sal[:, None] - m) / s


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
