"""What the commands run on: samples found in the usual on-disk layouts, with labels and boxes.

``--data`` takes a folder of images, a glob pattern, a file list (a text file with one image path
per line, relative to the list's folder), an ImageFolder tree (one folder per class), ImageNet
validation (class folders, or flat ``ILSVRC2012_val_*.JPEG`` files with the devkit's ground truth;
see :mod:`shapcam_ext.cli.imagenet`), or PASCAL VOC (``VOCdevkit/VOC2007``). ``--boxes`` adds
boxes: a folder of PASCAL VOC XML files named like the images (ImageNet's ILSVRC2012_bbox_val),
or a JSON file (:func:`shapcam_ext.cli.boxes.read_json_boxes`). VOC brings its own.

A :class:`Sample` is one image explained for one class: an image with objects of several classes
(VOC, a JSON file) gives one sample per class, whose boxes are that class's boxes.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from shapcam_ext.cli.boxes import Box, read_json_boxes, read_voc_xml
from shapcam_ext.cli.imagenet import ImageNetMeta, find_meta, read_meta, val_number
from shapcam_ext.cli.images import expand_images, images_in, is_image_file

__all__ = ["VOC_CLASSES", "Sample", "SampleSet", "add_json_boxes", "detect_format", "from_paths",
           "one_per_image", "open_data", "unique_names"]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # PASCAL VOC's class order, alphabetical
_GLOB_CHARACTERS = set("*?[")


@dataclass(frozen=True)
class Sample:
    """One image to explain, with its label and that label's boxes when the data has them.

    key: unique within its set and safe in a file name; outputs and records are named by it.
    label: the class index (as the model numbers classes), or None.
    boxes: the label's boxes, half-open pixels of the original image (see :mod:`shapcam_ext.cli.boxes`).
    """

    key: str
    image: Path
    label: Optional[int] = None
    boxes: tuple[Box, ...] = ()


@dataclass(frozen=True)
class SampleSet:
    """Samples in order, the layout they were read from, and the names of their label classes when
    the data defines its own (VOC, an ImageFolder of named classes; None: ImageNet's)."""

    samples: list[Sample]
    layout: str
    class_names: Optional[tuple[str, ...]] = None


def unique_names(bases: Sequence[str]) -> list[str]:
    """``bases`` made unique in order: a repeated base gets ``_1``, ``_2`` ... appended."""
    taken: set = set()
    names = []
    for base in bases:
        name, number = base, 1
        while name in taken:
            name, number = f"{base}_{number}", number + 1
        taken.add(name)
        names.append(name)
    return names


def _with_keys(images: Sequence[Path], labels: Optional[Sequence[Optional[int]]] = None) -> list[Sample]:
    labels = labels or [None] * len(images)
    keys = unique_names([image.stem for image in images])
    return [Sample(key, image, label) for key, image, label in zip(keys, images, labels)]


def from_paths(paths: Iterable[Path]) -> SampleSet:
    """Image files as given, folders replaced by their images (``shapcam explain IMAGE ...``; see
    :func:`shapcam_ext.cli.images.expand_images`)."""
    return SampleSet(_with_keys(expand_images(paths)), "files")


def detect_format(data: str) -> str:
    """The layout of ``data``: ``files`` (a folder of images, a glob, a file list), ``imagefolder``,
    ``imagenet`` (a devkit or meta.bin inside) or ``voc`` (a ``VOCdevkit/VOC20xx`` inside)."""
    path = Path(data)
    if not path.is_dir():
        return "files"
    if _voc_folder(path) is not None:
        return "voc"
    if find_meta(path) is not None:
        return "imagenet"
    subfolders = [p for p in path.iterdir() if p.is_dir()]
    if subfolders and not images_in(path) and any(images_in(folder) for folder in subfolders):
        return "imagefolder"
    return "files"


def _listed_files(data: str) -> list[Path]:
    """A folder's images, a glob's matches, a file list's entries, or the image itself."""
    path = Path(data)
    if path.is_dir():
        images = images_in(path)
    elif is_image_file(path):
        images = [path]
    elif path.is_file():
        lines = [line.strip() for line in path.read_text().splitlines()]
        images = [path.parent / line for line in lines if line and not line.startswith("#")]
    elif not path.exists() and _GLOB_CHARACTERS & set(data):
        images = sorted(Path(p) for p in glob.glob(data, recursive=True) if is_image_file(Path(p)))
    else:
        raise ValueError(f"--data {data}: no such folder, image list or glob pattern; pass one of those")
    if not images:
        raise ValueError(f"--data {data}: no images found; pass a folder of images, a glob or a list of image files")
    return images


def _wnid_folder(root: Path, meta: ImageNetMeta):
    """torchvision's ImageFolder over class folders named by wnid, numbered as ImageNet numbers them.

    ImageFolder numbers the folders it finds, which is ImageNet's numbering only when all 1000
    are there; a subset (or a test fixture) needs the wnid's own index.
    """
    from torchvision.datasets import ImageFolder

    class WnidFolder(ImageFolder):
        def find_classes(self, directory):
            classes = sorted(entry.name for entry in Path(directory).iterdir() if entry.is_dir())
            unknown = [name for name in classes if meta.index(name) is None]
            if unknown:
                raise ValueError(f"{directory}: {', '.join(unknown[:3])} are not ImageNet class folders (WordNet ids)")
            return classes, {name: meta.index(name) for name in classes}

    return WnidFolder(str(root), allow_empty=True)


def _default_meta() -> ImageNetMeta:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    wnids = tuple(info.label_names())
    return ImageNetMeta(wnids, tuple(info.label_name_to_description(w).split(", ")[0] for w in wnids))


def _imagefolder(root: Path) -> SampleSet:
    from torchvision.datasets import ImageFolder

    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    meta = _default_meta()
    if classes and all(meta.index(name) is not None for name in classes):  # ImageNet class folders
        folder, names = _wnid_folder(root, meta), None
    else:
        folder = ImageFolder(str(root), allow_empty=True)
        names = tuple(folder.classes)
    images, labels = zip(*[(Path(path), label) for path, label in folder.samples]) if folder.samples else ((), ())
    return SampleSet(_with_keys(images, labels), "imagefolder", names)


def _imagenet(root: Path, boxes: Optional[Path]) -> SampleSet:
    source = find_meta(root)
    meta = read_meta(source) if source is not None else _default_meta()
    images_root = root / "val" if (root / "val").is_dir() else root
    if any(entry.is_dir() and meta.index(entry.name) is not None for entry in images_root.iterdir()):
        folder = _wnid_folder(images_root, meta)
        images, labels = zip(*[(Path(p), label) for p, label in folder.samples]) if folder.samples else ((), ())
    else:
        images = tuple(images_in(images_root))
        numbers = [val_number(image) for image in images]
        labels = tuple(meta.index(meta.val_wnids[n - 1]) if meta.val_wnids and n else None for n in numbers)
    if not images:
        raise ValueError(f"--data {root}: no validation images in {images_root}")
    samples = _with_keys(images, labels)
    if boxes is None:
        return SampleSet(samples, "imagenet")
    return SampleSet([_xml_boxes(sample, boxes, meta) for sample in samples], "imagenet")


def _xml_boxes(sample: Sample, folder: Path, meta: ImageNetMeta) -> Sample:
    """The sample with the boxes of its class from ``folder/<stem>.xml`` (its label from them if it had none)."""
    xml = folder / f"{sample.image.stem}.xml"
    if not xml.is_file():
        return sample
    objects = read_voc_xml(xml, one_based=False)
    label = sample.label
    if label is None and len(objects) == 1:
        label = meta.index(next(iter(objects)))
    wnid = meta.wnids[label] if label is not None else None
    return Sample(sample.key, sample.image, label, objects.get(wnid, ()))


def _voc_folder(path: Path) -> Optional[Path]:
    """The ``VOCdevkit/VOC20xx`` folder at or inside ``path`` (2007 first), or None."""
    for devkit in (path / "VOCdevkit", path, path.parent):
        if devkit.name == "VOCdevkit" and devkit.is_dir():
            years = sorted(devkit.glob("VOC20[01][0-9]"), key=lambda p: (p.name != "VOC2007", p.name))
            if path.name.startswith("VOC20") and path.parent == devkit:
                years = [path]
            if years:
                return years[0]
    return None


def _voc(path: Path, split: str) -> SampleSet:
    from torchvision.datasets import VOCDetection

    folder = _voc_folder(path)
    try:
        voc = VOCDetection(str(folder.parent.parent), year=folder.name[3:], image_set=split, download=False)
    except (RuntimeError, ValueError, OSError) as err:
        raise ValueError(f"--data {path}: not a PASCAL VOC {folder.name} split {split!r} ({err}); expected "
                         "VOCdevkit/VOC2007/{JPEGImages,Annotations,ImageSets/Main/<split>.txt}") from err
    entries = []
    for image, annotation in zip(voc.images, voc.annotations):
        for name, boxes in sorted(read_voc_xml(Path(annotation), one_based=True).items()):
            if name in VOC_CLASSES:
                entries.append((f"{Path(image).stem}_{name}", Path(image), VOC_CLASSES.index(name), boxes))
    keys = unique_names([entry[0] for entry in entries])
    return SampleSet([Sample(key, *entry[1:]) for key, entry in zip(keys, entries)], "voc", VOC_CLASSES)


def add_json_boxes(found: SampleSet, path: Path, root: Optional[Path] = None) -> SampleSet:
    """One sample per object of the JSON boxes file, in image order; images without objects stay as they are.

    An object's ``image`` matches a sample by file stem, by path, or by path relative to ``root``.

    Raises:
        ValueError: an unreadable file, or an object naming an image that is not in the data.
        OSError: the file cannot be read.
    """
    samples = found.samples
    objects = read_json_boxes(path)
    def names(sample: Sample) -> set:
        found = {sample.image.stem, str(sample.image)}
        if root is not None and sample.image.is_relative_to(root):
            found.add(str(sample.image.relative_to(root)))
        return found
    matched = {i: [o for o in objects if o.image in names(s)] for i, s in enumerate(samples)}
    missing = {o.image for o in objects} - {o.image for found in matched.values() for o in found}
    if missing:
        raise ValueError(f"--boxes {path} names images that are not in the data: {', '.join(sorted(missing)[:5])}")
    entries = []
    for i, sample in enumerate(samples):
        for obj in matched[i] or [None]:
            if obj is None:
                entries.append((sample.key, sample.image, sample.label, sample.boxes))
            else:
                entries.append((f"{sample.key}_{obj.name}", sample.image, int(obj.name), obj.boxes))
    keys = unique_names([entry[0] for entry in entries])
    return SampleSet([Sample(key, *entry[1:]) for key, entry in zip(keys, entries)], found.layout, found.class_names)


def one_per_image(found: SampleSet) -> SampleSet:
    """The first sample of each image: for targets that do not depend on the label (top class, a fixed class)."""
    seen: set = set()
    kept = [s for s in found.samples if not (s.image in seen or seen.add(s.image))]
    return SampleSet(kept, found.layout, found.class_names)


def open_data(data: str, layout: str = "auto", boxes: Optional[Path] = None, split: str = "val") -> SampleSet:
    """The samples of ``--data`` (see the module docstring).

    Args:
        data: a folder, glob pattern, file list or dataset root.
        layout: ``auto`` (detected, :func:`detect_format`), ``files``, ``imagefolder``, ``imagenet`` or ``voc``.
        boxes: a folder of XML boxes (ImageNet layout) or a JSON boxes file (any layout but VOC).
        split: the VOC image set (``train``, ``val``, ``trainval``, ``test``).

    Raises:
        ValueError: nothing usable at ``data``, a layout that does not fit it, or unusable boxes;
            the message names the expected layout.
    """
    layout = detect_format(data) if layout == "auto" else layout
    if layout == "voc":
        if _voc_folder(Path(data)) is None:
            raise ValueError(f"--data {data}: no VOCdevkit/VOC20xx folder; pass the folder that holds VOCdevkit")
        if boxes is not None:
            raise ValueError("--boxes: PASCAL VOC brings its own boxes (Annotations/); drop --boxes")
        return _voc(Path(data), split)
    xml_boxes = boxes is not None and boxes.is_dir()
    if xml_boxes and layout != "imagenet":
        raise ValueError(f"--boxes {boxes}: a folder of XML boxes goes with --data-format imagenet; "
                         "for other layouts pass a JSON boxes file")
    if layout == "imagenet":
        found = _imagenet(Path(data), boxes if xml_boxes else None)
    elif layout == "imagefolder":
        found = _imagefolder(Path(data))
    else:
        found = SampleSet(_with_keys(_listed_files(data)), "files")
    if boxes is None or xml_boxes:
        return found
    return add_json_boxes(found, boxes, Path(data) if Path(data).is_dir() else Path(data).parent)
