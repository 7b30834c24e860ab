"""Photos that ship with installed packages, image loading and model-input preprocessing.

``preprocess`` and ``to_display_rgb`` apply the same resize and crop, so a saliency map computed
on the tensor lines up pixel for pixel with the image returned for overlays.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode

from shapcam_ext.cli.models import PreprocessConfig

__all__ = ["bundled_photos", "load_image", "preprocess", "to_display_rgb"]

# (package, folder inside it, file names)
_PHOTO_SOURCES = [
    ("skimage", "data", ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png", "horse.png")),
    ("matplotlib", "mpl-data/sample_data", ("grace_hopper.jpg",)),
    ("sklearn", "datasets/images", ("china.jpg", "flower.jpg")),
]


def bundled_photos() -> dict[str, Path]:
    """Real photos found in installed packages, keyed by file stem (``"chelsea"``, ``"grace_hopper"``...).

    Packages or files that are absent are skipped, so the dict may hold fewer than nine photos.
    """
    import importlib

    photos = {}
    for package, folder, files in _PHOTO_SOURCES:
        try:
            root = Path(importlib.import_module(package).__file__).parent / folder
        except ImportError:
            continue
        for file in files:
            if (root / file).is_file():
                photos[Path(file).stem] = root / file
    return photos


def load_image(path: Union[str, Path]) -> Image.Image:
    """Open an image file as RGB.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable image (unknown format, truncated, corrupt).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # decodes the whole file, so truncation shows up here
    except Image.DecompressionBombError as err:
        raise ValueError(f"{path} is too large to decode safely ({err}); downscale it first") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{path} is not a readable image ({type(err).__name__}); check the file") from err


def _resize_crop(img: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """timm's eval resize and centre crop (transforms_imagenet_eval, 'center' and 'squash' modes)."""
    height, width = cfg.input_size
    scale = [math.floor(height / cfg.crop_pct), math.floor(width / cfg.crop_pct)]
    if cfg.crop_mode == "center":
        if scale[0] == scale[1]:
            scale = scale[:1]  # torchvision semantics: the shorter side becomes scale, aspect kept
        else:
            factor = max(scale[0] / img.height, scale[1] / img.width)  # cover scale, aspect kept
            scale = [round(img.height * factor), round(img.width * factor)]
    elif cfg.crop_mode != "squash":
        raise ValueError(f"unsupported crop_mode {cfg.crop_mode!r}; use 'center' or 'squash'")
    resized = TF.resize(img, scale, interpolation=InterpolationMode(cfg.interpolation))
    return TF.center_crop(resized, [height, width])


def preprocess(img: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """Resize, centre-crop and normalise an RGB image into a (1, 3, H, W) float32 batch."""
    tensor = TF.to_tensor(_resize_crop(img, cfg))
    return TF.normalize(tensor, list(cfg.mean), list(cfg.std)).unsqueeze(0)


def to_display_rgb(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """The resized, cropped image as float32 H x W x 3 in [0, 1], aligned with ``preprocess``."""
    return np.asarray(_resize_crop(img, cfg), dtype=np.float32) / 255.0
