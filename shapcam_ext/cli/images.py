"""Finding and decoding the images to explain: bundled photos, folders, every PIL mode, EXIF orientation."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Iterable, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["bundled_photos", "expand_images", "images_in", "is_image_file", "load_image", "to_rgb"]

# (package, folder inside it, file names)
_PHOTO_SOURCES = [
    ("skimage", "data", ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png", "horse.png")),
    ("matplotlib", "mpl-data/sample_data", ("grace_hopper.jpg",)),
    ("sklearn", "datasets/images", ("china.jpg", "flower.jpg")),
]

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
# The value that means white in each high-depth grey mode: PIL keeps 16-bit samples in "I;16*"
# and often in "I"; "F" holds floats, taken as [0, 1].
_FULL_SCALE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def bundled_photos() -> dict[str, Path]:
    """Real photos found in installed packages, keyed by file stem (``"chelsea"``, ``"grace_hopper"``...).

    Packages or files that are absent are skipped, so the dict may hold fewer than nine photos.
    """
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


def is_image_file(path: Path) -> bool:
    """Whether ``path`` is a file with an extension PIL reads."""
    return path.is_file() and path.suffix.lower() in {ext.lower() for ext in Image.registered_extensions()}


def images_in(folder: Path) -> list[Path]:
    """The image files directly inside ``folder`` (see :func:`is_image_file`), sorted by name."""
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def expand_images(paths: Iterable[Union[str, Path]]) -> list[Path]:
    """The image files named by ``paths``: files as given, folders replaced by their images.

    A folder contributes :func:`images_in` it. A folder with none is kept as it is, so that
    :func:`load_image` reports it as an error of its own and the other images still run.
    """
    images = []
    for path in map(Path, paths):
        images.extend((images_in(path) if path.is_dir() else []) or [path])
    return images


def _eight_bit(values: np.ndarray, full_scale: float) -> Image.Image:
    """Grey levels mapped to 0..255: by ``full_scale`` when they lie within it, else stretched min..max."""
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > full_scale:
        values, full_scale = values - low, (high - low) or 1.0
    return Image.fromarray(np.round(values * (255.0 / full_scale)).astype(np.uint8))  # uint8 (H, W): mode L


def to_rgb(img: Image.Image) -> Image.Image:
    """An image of any PIL mode as 8-bit RGB, upright.

    EXIF orientation is applied. 16-bit grey (``I;16``) is scaled by 65535 / 255; 32-bit integer
    (``I``) likewise when its values fit in 16 bits, and float (``F``) by 255 when they lie in
    [0, 1]; values outside those ranges are stretched from their minimum to their maximum.
    Transparent pixels (alpha channel, or a palette/grey/RGB ``transparency`` entry) are composited
    over white, the way viewers show them; their stored colour is often arbitrary. CMYK, YCbCr,
    palette and 1-bit images go through PIL's own conversion.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in _FULL_SCALE:
        img = _eight_bit(np.asarray(img), _FULL_SCALE[img.mode])
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return img.convert("RGB")


def load_image(path: Union[str, Path]) -> Image.Image:
    """Open an image file as upright 8-bit RGB (see :func:`to_rgb`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a folder without images, or not a readable image (unknown format,
            truncated, corrupt, too large to decode safely).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder with no image files in it; pass image files or a folder of images")
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decodes the whole file, so truncation shows up here
            return to_rgb(img)
    except Image.DecompressionBombError as err:
        raise ValueError(f"{path} is too large to decode safely ({err}); downscale it first") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{path} is not a readable image ({type(err).__name__}); check the file") from err
