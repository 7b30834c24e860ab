"""What an explanation returns: one ShapleyResult per image, or a BatchError naming the images that failed."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from shapcam_ext.postprocess import scale_cam_image
from shapcam_ext.statistics import CONFIDENCE, t_quantile
from shapcam_ext.targets import Target


@dataclass(repr=False)
class ShapleyResult:
    """Shap-CAM of one image at one target layer.

    shapley: (H, W) signed Shapley value of each player (float64, CPU); sums to
        value_full - value_empty up to ``efficiency_gap``. With group_size g, one value per
        g x g cell of the feature map. With ``create_graph``, on the model's device and
        differentiable (a ``grad_fn``), like ``feature_map``.
    std_error: (H, W) standard error of each value over independent units (a Latin block or an
        antithetic pair counts as one); zeros for exact enumeration; None when undefined (a single
        unit). :meth:`interval` turns it into confidence intervals.
    units: how many independent units the standard errors come from.
    value_full / value_empty: the target's score with every / no position kept.
    path: how the coalitions were evaluated: "generic" (the head on masked maps), or an exact
        fast path: "pooled-linear", "pooled", "local-pool-linear", or for heads that mix positions
        locally before their pool, "incremental-table" or "incremental-recompute", for ViTs cut at
        a block's norm1 "class-token-attention"; "additive": the game is additive and the map
        was computed in closed form (``n_permutations`` is then 0, ``std_error`` zeros).
    feature_map: (h, w) the values over the feature map's positions (a grouped player's value
        on each of its positions), for display.
    tolerance_met: with a tolerance, whether the run stopped because every image met it (False:
        the permutation cap came first, and a warning said so); None without a tolerance.
    """

    shapley: torch.Tensor
    std_error: Optional[torch.Tensor]
    value_full: float
    value_empty: float
    efficiency_gap: float
    n_permutations: int
    units: int
    backend: str
    seconds: float
    layer: str
    target: Target
    feature_map: torch.Tensor = field(default=None)
    path: str = "generic"
    tolerance_met: Optional[bool] = None

    @property
    def max_std_error(self) -> Optional[float]:
        """The largest standard error, or None when it is undefined."""
        return None if self.std_error is None else float(self.std_error.max())

    def interval(self, confidence: float = CONFIDENCE) -> tuple[torch.Tensor, torch.Tensor]:
        """(low, high), each (H, W): an interval for each player's Shapley value at ``confidence``,
        ``shapley -+ q * std_error`` with q Student's t quantile on units - 1 degrees of freedom.
        The normal quantile would be too narrow with few units: with the 8 Latin blocks of a
        default run, +-1.645 SE covers about 86% of the time, not 90%. Zero width for exact
        enumeration.

        Raises:
            ValueError: the standard errors are undefined (a single unit), or ``confidence`` is
                outside (0, 1).
        """
        if self.std_error is None:
            raise ValueError("no interval from a single unit of permutations; run at least two units "
                             "(a larger n_permutations)")
        half = t_quantile(confidence, self.units - 1) * self.std_error
        return self.shapley - half, self.shapley + half

    def cam_image(self, size: Optional[tuple] = None) -> np.ndarray:
        """The map as ShapCAM returns it: ReLU, min-max to [0, 1], resized to size = (width, height)."""
        return scale_cam_image(self.feature_map.detach().cpu()[None].clamp_min(0), size)[0]

    def __repr__(self) -> str:
        h, w = self.shapley.shape
        se = "undefined" if self.std_error is None else f"{self.max_std_error:.2g}"
        return (f"ShapleyResult(layer={self.layer!r}, {h}x{w} players, path={self.path!r}, "
                f"sum={self.value_full - self.value_empty:+.4g} (full {self.value_full:.4g}, empty "
                f"{self.value_empty:.4g}), K={self.n_permutations}, max SE {se}, {self.seconds:.3g} s)")


class BatchError(ValueError):
    """Some images of a batch failed; ``results`` holds the others (None where failed)."""

    def __init__(self, failures: dict, results: list):
        lines = "; ".join(f"image {i}: {msg}" for i, msg in failures.items())
        super().__init__(f"{len(failures)} of {len(results)} images failed ({lines})")
        self.failures = failures
        self.results = results


__all__ = ["BatchError", "ShapleyResult"]
