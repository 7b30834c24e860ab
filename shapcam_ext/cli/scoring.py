"""The paper's metrics of one method's maps on a batch: what each image's record holds.

- ``ad-ic`` (§4.1): Y, the softmax probability of the explained class on the image, and O, the
  same on the image multiplied by its map (only its top ``keep`` pixels kept, for each keep
  fraction); Average Drop and Increase in Confidence are computed from them over the data.
- ``deletion`` / ``insertion`` (RISE): the area under the probability as the map's pixels are
  removed (replaced by 0 in the model's input, the mean colour) or restored into a blurred copy,
  most salient first, as in RISE's evaluation code.
- ``pointing`` (§4.2): the share of the map's energy inside the boxes, for samples explained for
  the class the boxes belong to. A map without energy (constant, so all zeros after min-max)
  says nothing about where the object is: it scores as a uniform map, the boxes' area.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from shapcam_ext.cli.boxes import Box
from shapcam_ext.cli.preprocessing import PreprocessConfig
from shapcam_ext.metrics import area_under_curve, blurred, box_mask, energy_pointing_game, explanation_input, ranked_curve

__all__ = ["Scoring", "probabilities_of", "score_maps"]


@dataclass(frozen=True)
class Scoring:
    """Which metrics, and their settings: keep fractions (AD/IC), curve steps and model batch (deletion/insertion)."""

    metrics: tuple[str, ...]
    keep_fractions: tuple[float, ...] = (1.0,)
    steps: int = 224
    batch_size: int = 64


def probabilities_of(model: torch.nn.Module, classes: Sequence[int]):
    """``score(inputs, images)``: the softmax probability of ``classes[images[i]]`` on ``inputs[i]``."""
    index = torch.as_tensor(list(classes))

    def score(inputs: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(inputs).softmax(-1)[torch.arange(len(images)), index.to(inputs.device)[images]]
    return score


def score_maps(model: torch.nn.Module, cfg: PreprocessConfig, x: torch.Tensor, classes: Sequence[int],
               maps: np.ndarray, boxes: Sequence[tuple[Box, ...]], box_classes: Sequence[Optional[int]],
               scoring: Scoring) -> list[dict]:
    """Each image's metric values for its map.

    Args:
        model: the classifier, in eval mode.
        cfg: its preprocessing (AD/IC multiply the un-normalised image).
        x: (B, 3, H, W) the inputs.
        classes: the class each map explains.
        maps: (B, H, W) maps in [0, 1].
        boxes: per image, its boxes in the input's pixels (may be empty).
        box_classes: per image, the class its boxes belong to (None: unknown).
        scoring: the metrics to compute.

    Returns:
        Per image a dict with, as the metrics ask: ``explanation_probability`` (keep fraction as
        text -> O), ``deletion_auc``, ``insertion_auc``, ``energy``, ``box_area``, ``box_count``.
    """
    score = probabilities_of(model, classes)
    sal = torch.from_numpy(np.asarray(maps, dtype=np.float32)).to(x.device)
    images = torch.arange(len(x), device=x.device)
    values: list[dict] = [{} for _ in classes]
    if "ad-ic" in scoring.metrics:
        for keep in scoring.keep_fractions:
            seen = score(explanation_input(x, sal, cfg.mean, cfg.std, None if keep == 1 else keep), images)
            for value, o in zip(values, seen.tolist()):
                value.setdefault("explanation_probability", {})[f"{keep:g}"] = o
    curves = {"deletion": (torch.zeros_like(x), x), "insertion": (x, blurred(x))}
    for name, (first, rest) in curves.items():
        if name in scoring.metrics:
            areas = area_under_curve(*ranked_curve(score, first, rest, sal, scoring.steps, scoring.batch_size))
            for value, area in zip(values, areas.tolist()):
                value[f"{name}_auc"] = area
    if "pointing" in scoring.metrics:
        for value, heat, image_boxes, cls, box_cls in zip(values, maps, boxes, classes, box_classes):
            if image_boxes and cls == box_cls:
                area = float(box_mask(heat.shape, image_boxes).mean())
                energy = energy_pointing_game(heat, image_boxes) if heat.sum() > 0 else area
                value.update(energy=energy, box_area=area, box_count=len(image_boxes))
    return values
