"""Bounding boxes: reading them from PASCAL VOC XML files and from JSON, and mapping them into the model input.

A box is (x0, y0, x1, y1) in pixels of the original image file, half-open like slicing
(columns x0..x1-1, rows y0..y1-1), origin top-left: the convention of
:func:`shapcam_ext.metrics.box_mask`.
"""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple

import numpy as np

from shapcam_ext.cli.preprocessing import PreprocessConfig

__all__ = ["Box", "LabelledBoxes", "box_to_input", "read_json_boxes", "read_voc_xml"]

Box = tuple[float, float, float, float]


class LabelledBoxes(NamedTuple):
    """The boxes of one object class in one image."""

    image: str  # as the file names it: a file stem or a path
    name: str  # the class name (a WordNet id, a VOC class) or its index as text
    boxes: tuple[Box, ...]


def read_voc_xml(path: Path, one_based: bool) -> dict[str, tuple[Box, ...]]:
    """The boxes of a PASCAL VOC XML annotation, grouped by object name, objects marked difficult left out.

    Args:
        path: the XML file (PASCAL VOC's Annotations/*.xml, ImageNet's ILSVRC2012_bbox_val files).
        one_based: PASCAL VOC counts pixels from 1, inclusive (so xmin - 1 is the first column);
            ImageNet's boxes count from 0, inclusive.

    Raises:
        ValueError: the file is not XML, or an object lacks a complete ``bndbox``.
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{path} is not a readable XML annotation ({err}); check the file") from err
    shift = 1 if one_based else 0
    grouped: dict[str, list[Box]] = {}
    for obj in root.iter("object"):
        if obj.findtext("difficult", "0").strip() == "1":
            continue
        try:
            corners = [float(obj.find("bndbox").findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"{path}: an object has no complete <bndbox> (xmin, ymin, xmax, ymax)") from None
        x0, y0, x1, y1 = corners
        grouped.setdefault(obj.findtext("name", "").strip(), []).append((x0 - shift, y0 - shift, x1 + 1 - shift,
                                                                         y1 + 1 - shift))
    return {name: tuple(boxes) for name, boxes in grouped.items()}


def read_json_boxes(path: Path) -> list[LabelledBoxes]:
    """The objects of a boxes file in this project's JSON format (``experiments/boxes.json``).

    ``{"objects": [{"image": "chelsea", "class_index": 285, "boxes": [[x0, y0, x1, y1], ...]}, ...]}``:
    ``image`` is a file stem or a path relative to the data, boxes are half-open pixels of the
    original file; several boxes of one object mean their union.

    Raises:
        ValueError: the file is not such JSON.
        OSError: it cannot be read.
    """
    try:
        objects = json.loads(Path(path).read_text())["objects"]
        return [LabelledBoxes(str(o["image"]), str(int(o["class_index"])),
                              tuple(tuple(float(v) for v in box) for box in o["boxes"])) for o in objects]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a boxes file ({type(err).__name__}: {err}); expected "
                         '{"objects": [{"image": ..., "class_index": ..., "boxes": [[x0, y0, x1, y1]]}]}') from err


def box_to_input(box: Box, image_size: tuple[int, int], cfg: PreprocessConfig) -> Box:
    """A box in original-image pixels mapped into the model input's pixels, clipped to it.

    Mirrors :func:`shapcam_ext.cli.preprocessing.preprocess`: timm's eval transform resizes
    ("squash": both sides; "center": the shorter side, aspect kept) to input_size / crop_pct and
    centre-crops input_size.

    Args:
        box: (x0, y0, x1, y1), half-open, in pixels of the original image.
        image_size: (width, height) of the original image.
        cfg: the model's preprocessing.

    Raises:
        ValueError: a crop mode other than "squash" or "center" ("border" pads; not supported).
    """
    width, height = image_size
    in_h, in_w = cfg.input_size
    scale = [math.floor(in_h / cfg.crop_pct), math.floor(in_w / cfg.crop_pct)]
    if cfg.crop_mode == "squash":
        new_h, new_w = scale
    elif cfg.crop_mode != "center":
        raise ValueError(f"boxes cannot follow crop_mode {cfg.crop_mode!r}; only 'squash' and 'center' are supported")
    elif scale[0] == scale[1]:  # shorter side to scale, aspect kept (torchvision int-size resize)
        short, long = (height, width) if height <= width else (width, height)
        new_short, new_long = scale[0], int(scale[0] * long / short)
        new_h, new_w = (new_short, new_long) if height <= width else (new_long, new_short)
    else:
        factor = max(scale[0] / height, scale[1] / width)
        new_h, new_w = round(height * factor), round(width * factor)
    top, left = int(round((new_h - in_h) / 2.0)), int(round((new_w - in_w) / 2.0))
    x0, y0, x1, y1 = box
    sx, sy = new_w / width, new_h / height
    return (float(np.clip(x0 * sx - left, 0, in_w)), float(np.clip(y0 * sy - top, 0, in_h)),
            float(np.clip(x1 * sx - left, 0, in_w)), float(np.clip(y1 * sy - top, 0, in_h)))
