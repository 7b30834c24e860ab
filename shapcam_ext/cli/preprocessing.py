"""Model-input preprocessing, taken from the model's library, and the image the overlays use.

One description, :class:`PreprocessConfig` (timm's data-config fields), serves every model:
timm models resolve it with ``timm.data.resolve_model_data_config``, torchvision models read it
from their DEFAULT weights' own ``transforms()`` (no download), and timm's ``create_transform``
builds the transform from it. The display image is the model input with its normalisation
undone, so an overlay lines up with the map pixel for pixel whatever the resize and crop.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

if TYPE_CHECKING:  # PIL comes with the cli extra; `shapcam info` runs without it
    from PIL import Image

__all__ = [
    "LITE0_PREPROCESS",
    "PreprocessConfig",
    "for_timm_model",
    "for_torchvision_weights",
    "preprocess",
    "to_display_rgb",
    "unnormalize",
]


@dataclass(frozen=True)
class PreprocessConfig:
    """Evaluation preprocessing in timm's data-config vocabulary.

    Attributes:
        input_size: (H, W) of the network input.
        mean, std: per-channel normalisation of RGB values in [0, 1].
        interpolation: resize filter (``"bilinear"``, ``"bicubic"`` ...).
        crop_pct: fraction of the resized image kept by the centre crop.
        crop_mode: ``"center"`` resizes the shorter side to input_size / crop_pct (aspect kept) then
            centre-crops; ``"squash"`` resizes both sides to input_size / crop_pct (aspect not
            kept); ``"border"`` fits the longer side and pads with the mean colour.
    """

    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    crop_mode: str = "center"


# The real Lite0 weights give Egyptian cat 0.77 on chelsea.png with a plain 224x224 bicubic
# resize of RGB in [0, 1] normalised by 0.5 (measured); timm's centre crop drops it to about 0.38.
LITE0_PREPROCESS = PreprocessConfig(
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", crop_pct=1.0, crop_mode="squash"
)


def for_timm_model(model: torch.nn.Module) -> PreprocessConfig:
    """The evaluation preprocessing timm resolves for ``model`` (its pretrained config)."""
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    return PreprocessConfig(
        input_size=tuple(cfg["input_size"][1:]), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
        interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"], crop_mode=cfg.get("crop_mode", "center"),
    )


def for_torchvision_weights(arch: str) -> PreprocessConfig:
    """The preprocessing of torchvision architecture ``arch``'s DEFAULT weights, from their ``transforms()``.

    torchvision's preset resizes the shorter side to ``resize_size`` and centre-crops
    ``crop_size``: timm's "center" mode with crop_pct = crop_size / resize_size.

    Raises:
        ValueError: ``arch`` has no registered weights (torchvision.models.get_model_weights).
    """
    import torchvision

    preset = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    (crop,), (resize,) = preset.crop_size, preset.resize_size
    return PreprocessConfig(
        input_size=(crop, crop), mean=tuple(preset.mean), std=tuple(preset.std),
        interpolation=preset.interpolation.value, crop_pct=crop / resize, crop_mode="center",
    )


@lru_cache(maxsize=8)
def _transform(cfg: PreprocessConfig) -> Callable[[Image.Image], torch.Tensor]:
    import timm.data

    fields = asdict(cfg)
    return timm.data.create_transform(input_size=(3, *fields.pop("input_size")), **fields)


def preprocess(img: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """Resize, crop and normalise an RGB image into a (1, 3, H, W) float32 batch (timm's eval transform)."""
    return _transform(cfg)(img).unsqueeze(0)


def unnormalize(x: torch.Tensor, cfg: PreprocessConfig) -> np.ndarray:
    """The image a (3, H, W) model input shows: float32 H x W x 3 in [0, 1], pixel-aligned with it.

    Args:
        x: one normalised model input, as :func:`preprocess` makes it (on any device).
        cfg: the config it was made with.
    """
    mean = torch.tensor(cfg.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    # rounding can leave values a hair outside [0, 1]; overlays require the range
    return (x * std + mean).clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def to_display_rgb(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """The image as the model sees it (resized, cropped), float32 H x W x 3 in [0, 1]."""
    return unnormalize(preprocess(img, cfg)[0], cfg)
