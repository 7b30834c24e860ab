"""Tiny datasets written in exactly the on-disk formats the commands read, from the bundled real photos.

- ImageNet validation: flat ``ILSVRC2012_val_{n:08d}.JPEG`` files, the devkit
  (``ILSVRC2012_devkit_t12/data/meta.mat`` with the 1000 leaf synsets and some ancestors, and
  ``ILSVRC2012_validation_ground_truth.txt`` of ILSVRC2012_IDs), and ILSVRC2012_bbox_val-style XML
  boxes (0-based pixels);
- PASCAL VOC 2007: ``VOCdevkit/VOC2007/{JPEGImages,Annotations,ImageSets/Main}`` (1-based pixels);
- an ImageFolder tree.

The boxes are the hand-drawn ones of experiments/boxes.json.
"""
from __future__ import annotations

import json
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image

from shapcam_ext.cli.images import bundled_photos, load_image

BOXES_JSON = Path(__file__).resolve().parent.parent / "experiments" / "boxes.json"
DEVKIT = "ILSVRC2012_devkit_t12"


def hand_boxes() -> list[dict]:
    return json.loads(BOXES_JSON.read_text())["objects"]


def imagenet_wnids() -> list[str]:
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def ilsvrc_ids(seed: int = 0) -> dict[str, int]:
    """A devkit-like numbering: ILSVRC2012_IDs 1..1000 that are not in sorted-wnid order."""
    wnids = imagenet_wnids()
    order = np.random.default_rng(seed).permutation(len(wnids))
    return {wnids[i]: rank + 1 for rank, i in enumerate(order)}


def write_meta_mat(path: Path, ids: dict[str, int]) -> None:
    import scipy.io

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(ilsvrc, wnid, f"words of {wnid}, more words", "a gloss", 0, np.zeros((1, 0)), 0, 1300)
            for wnid, ilsvrc in sorted(ids.items(), key=lambda item: item[1])]
    rows += [(1000 + k, f"n9999999{k}", f"ancestor {k}", "a gloss", 2, np.array([[1, 2]]), 1, 0) for k in range(1, 4)]
    synsets = np.empty((len(rows), 1), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        synsets[i, 0] = row
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"synsets": synsets})


def voc_xml(filename: str, size: tuple[int, int], objects: list[tuple[str, tuple, int]]) -> str:
    """A PASCAL VOC annotation; ``objects``: (name, (xmin, ymin, xmax, ymax) as stored, difficult)."""
    parts = [f"<annotation><folder>val</folder><filename>{escape(filename)}</filename>",
             f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size><segmented>0</segmented>"]
    for name, (x0, y0, x1, y1), difficult in objects:
        parts.append(f"<object><name>{escape(name)}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
                     f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    return "\n".join(parts + ["</annotation>"])


def write_imagenet_val(root: Path, photos: list[str] | None = None, class_folders: bool = False) -> list[dict]:
    """The objects of ``photos`` (default: one object per bundled photo) as ImageNet validation data.

    Returns one entry per image: its path, class index, wnid and boxes (half-open, original pixels).
    """
    wnids, ids, available = imagenet_wnids(), ilsvrc_ids(), bundled_photos()
    seen, entries = set(), []
    for obj in hand_boxes():
        if obj["image"] in seen or obj["image"] not in available or (photos and obj["image"] not in photos):
            continue  # ILSVRC validation images have one class each
        seen.add(obj["image"])
        n, wnid = len(entries) + 1, wnids[obj["class_index"]]
        folder = root / "val" / wnid if class_folders else root / "val"
        folder.mkdir(parents=True, exist_ok=True)
        image = load_image(available[obj["image"]])
        path = folder / f"ILSVRC2012_val_{n:08d}.JPEG"
        image.save(path, quality=95)
        stored = [(wnid, (round(x0), round(y0), round(x1) - 1, round(y1) - 1), 0) for x0, y0, x1, y1 in obj["boxes"]]
        (root / "bbox_val").mkdir(exist_ok=True)
        (root / "bbox_val" / f"{path.stem}.xml").write_text(voc_xml(path.stem, image.size, stored))
        entries.append({"path": path, "label": obj["class_index"], "wnid": wnid, "photo": obj["image"],
                        "boxes": [tuple(float(round(v)) for v in box) for box in obj["boxes"]]})
    write_meta_mat(root / DEVKIT / "data" / "meta.mat", ids)
    (root / DEVKIT / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{ids[e['wnid']]}\n" for e in entries))
    return entries


def write_voc2007(root: Path, split: str = "val") -> dict[str, list]:
    """Three bundled photos as VOC 2007 images with VOC classes; returns the stored objects per image id."""
    available = bundled_photos()
    annotations = {
        "000001": ("chelsea", [("cat", (1, 1, 395, 300), 0)]),
        "000002": ("astronaut", [("person", (100, 20, 400, 512), 0), ("aeroplane", (353, 1, 468, 270), 0),
                                 ("chair", (1, 300, 50, 400), 1)]),
        "000003": ("motorcycle_left", [("motorbike", (93, 96, 686, 450), 0), ("person", (10, 10, 60, 90), 0),
                                       ("person", (600, 20, 700, 100), 0)]),
    }
    voc = root / "VOCdevkit" / "VOC2007"
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    for image_id, (photo, objects) in annotations.items():
        image = load_image(available[photo])
        image.save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
        (voc / "Annotations" / f"{image_id}.xml").write_text(voc_xml(f"{image_id}.jpg", image.size, objects))
    (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in annotations))
    return {image_id: objects for image_id, (_, objects) in annotations.items()}


def write_image_folder(root: Path, classes: dict[str, list[str]]) -> None:
    """``root/<class>/<photo>.png`` for each class and its bundled photos."""
    available = bundled_photos()
    for name, photos in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for photo in photos:
            Image.open(available[photo]).save(root / name / f"{photo}.png")


def tiny_classifier(classes: int = 1000, seed: int = 0, size: int = 32):
    """A small random CNN and its preprocessing: its ``features`` layer is a (size / 4)^2 map of a size^2 input."""
    import torch
    from torch import nn

    from shapcam_ext.cli.preprocessing import PreprocessConfig

    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("stem", nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU()))
    model.add_module("features", nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()))
    model.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    model.add_module("fc", nn.Linear(16, classes))
    with torch.no_grad():
        model.fc.weight *= 30  # confident enough for masks to move the probabilities
    return model.eval(), PreprocessConfig(input_size=(size, size), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0,
                                          crop_mode="squash")
