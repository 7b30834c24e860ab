"""Figures of one Shap-CAM explanation: the model's view of the image, heat-map overlays, the signed map.

Figures are built on matplotlib's object API with the Agg canvas, never through pyplot, so no
global figure state builds up over a long run and no display is needed.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from shapcam_ext.engine import ShapleyResult
from shapcam_ext.targets import ClassTarget

__all__ = ["explanation_figure", "heatmap_overlay", "run_summary"]

PANEL_INCHES = 3.3


def heatmap_overlay(rgb: np.ndarray, mask: np.ndarray, colormap: str = "jet", image_weight: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] mask, coloured with ``colormap``, over an RGB image.

    The arithmetic of pytorch-grad-cam's ``show_cam_on_image(use_rgb=True)``, with a matplotlib
    colormap instead of OpenCV's: ``(1 - w) * heatmap + w * image``, divided by its maximum.

    Args:
        rgb: (H, W, 3) float image in [0, 1].
        mask: (H, W) map in [0, 1].
        colormap: any matplotlib colormap name ("jet", "turbo", ...).
        image_weight: weight w of the image in the blend, in [0, 1].

    Returns:
        (H, W, 3) float32 image in [0, 1].

    Raises:
        ValueError: shapes that do not match, values outside [0, 1], or a bad image_weight.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or mask.shape != rgb.shape[:2]:
        raise ValueError(f"expected an (H, W, 3) image and an (H, W) mask, got {rgb.shape} and {mask.shape}")
    if rgb.min() < 0 or rgb.max() > 1:
        raise ValueError("the image must be float in [0, 1]; divide 8-bit images by 255")
    if not 0 <= image_weight <= 1:
        raise ValueError(f"image_weight must be in [0, 1], got {image_weight}")
    heatmap = colormaps[colormap](np.clip(mask, 0, 1))[..., :3]
    blend = (1 - image_weight) * heatmap + image_weight * rgb
    return (blend / blend.max()).astype(np.float32)


def _score_unit(result: ShapleyResult) -> str:
    if isinstance(result.target, ClassTarget):
        return "probability" if result.target.softmax else "logit"
    return "score"


def run_summary(result: ShapleyResult) -> str:
    """One line with the run's figures: permutations, largest standard error, efficiency gap, time."""
    std_error = "undefined" if result.max_std_error is None else f"{result.max_std_error:.2g}"
    return (
        f"{result.n_permutations} permutations · max std error {std_error} · "
        f"efficiency gap {result.efficiency_gap:.1e} · {result.seconds:.3g} s · {result.backend} backend"
    )


def _show(ax, image: np.ndarray, title: str) -> None:
    ax.imshow(image)
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()


def explanation_figure(
    rgb: np.ndarray,
    result: ShapleyResult,
    label: str,
    comparisons: Optional[Mapping[str, np.ndarray]] = None,
    colormap: str = "jet",
) -> Figure:
    """The figure of one explanation, one row of panels.

    Panels: the image as the model sees it (resized and cropped), the Shap-CAM overlay, one
    overlay per comparison method, and the signed Shapley map at feature resolution on a
    symmetric diverging scale with its colorbar.

    Args:
        rgb: (H, W, 3) float image in [0, 1], aligned with the model input.
        result: the image's ShapleyResult.
        label: the figure title's first line (image name, explained class and probability).
        comparisons: panel title -> (H, W) map in [0, 1] (pytorch-grad-cam's output), in order.
        colormap: colormap of the overlays.

    Returns:
        A matplotlib Figure on an Agg canvas (``outputs.write_figure`` saves it).
    """
    comparisons = dict(comparisons or {})
    panels = 3 + len(comparisons)
    fig = Figure(figsize=(PANEL_INCHES * panels + 0.6, PANEL_INCHES + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels)
    fig.suptitle(f"{label}\n{run_summary(result)}", fontsize=11)

    _show(axes[0], rgb, "model input")
    _show(axes[1], heatmap_overlay(rgb, result.cam_image((rgb.shape[1], rgb.shape[0])), colormap),
          f"Shap-CAM (layer {result.layer})")
    for ax, (title, mask) in zip(axes[2:], comparisons.items()):
        _show(ax, heatmap_overlay(rgb, mask, colormap), title)

    ax = axes[-1]
    signed = result.shapley.numpy()
    limit = float(np.abs(signed).max()) or 1.0
    image = ax.imshow(signed, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    h, w = signed.shape
    ax.set_title(f"signed Shapley values ({h}×{w})", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    total = result.value_full - result.value_empty
    ax.set_xlabel(f"sum {total:+.3f} = full {result.value_full:.3f} − empty {result.value_empty:.3f}", fontsize=9)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label(f"Δ {_score_unit(result)}", fontsize=9)
    bar.ax.tick_params(labelsize=8)
    return fig
