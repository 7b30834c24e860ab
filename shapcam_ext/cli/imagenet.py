"""ImageNet (ILSVRC2012) validation metadata: class order, class names and ground truth, from the devkit.

The class index of a WordNet id (wnid) is its position among the 1000 leaf wnids sorted, as in
torchvision's ImageNet and every ImageNet-1k model. The metadata comes from the first of:

- ``meta.bin``, the file torchvision's ``ImageNet`` writes into its root;
- the devkit folder ``ILSVRC2012_devkit_t12/data`` (``meta.mat``, ``ILSVRC2012_validation_ground_truth.txt``);
- the devkit archive ``ILSVRC2012_devkit_t12.tar.gz``, read in place.

torchvision only parses the devkit from its archive (checked against the official MD5), writes
meta.bin into the data root and moves the validation images into class folders; a read-only or
partial copy of the data needs the files read where they are, hence this module.
"""
from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

__all__ = ["DEVKIT", "ImageNetMeta", "find_meta", "read_meta", "val_number"]

DEVKIT = "ILSVRC2012_devkit_t12"
_META_MAT = "data/meta.mat"
_GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})")


@dataclass(frozen=True)
class ImageNetMeta:
    """The classes (wnids in index order, their names) and, when known, each validation image's wnid.

    ``val_wnids[n - 1]`` is the wnid of ``ILSVRC2012_val_{n:08d}``.
    """

    wnids: tuple[str, ...]
    names: tuple[str, ...]
    val_wnids: Optional[tuple[str, ...]] = None
    positions: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", {wnid: i for i, wnid in enumerate(self.wnids)})

    def index(self, wnid: str) -> Optional[int]:
        """The class index of ``wnid``, or None when it is not one of the classes."""
        return self.positions.get(wnid)


def val_number(path: Path) -> Optional[int]:
    """n for a file named like ``ILSVRC2012_val_{n:08d}.JPEG``, else None."""
    match = _VAL_NAME.search(path.name)
    return int(match.group(1)) if match else None


def _from_meta_bin(path: Path) -> ImageNetMeta:
    import torch

    wnid_to_classes, val_wnids = torch.load(path, weights_only=True)
    wnids = tuple(sorted(wnid_to_classes))
    return ImageNetMeta(wnids, tuple(wnid_to_classes[w][0] for w in wnids), tuple(val_wnids))


def _from_devkit(read: Callable[[str], bytes]) -> ImageNetMeta:
    """Parse the devkit's meta.mat and ground truth; ``read(member)`` returns a file's bytes or raises KeyError."""
    import numpy as np
    import scipy.io

    synsets = scipy.io.loadmat(io.BytesIO(read(_META_MAT)), squeeze_me=True)["synsets"]
    leaves = [s for s in synsets if int(s["num_children"]) == 0]  # the 1000 classes; the rest are their ancestors
    by_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
    names = {str(s["WNID"]): str(s["words"]).split(", ")[0] for s in leaves}
    wnids = tuple(sorted(by_id.values()))
    try:
        truth = np.loadtxt(io.BytesIO(read(_GROUND_TRUTH)), dtype=np.int64, ndmin=1)
    except KeyError:  # a devkit without the validation ground truth still gives the classes
        return ImageNetMeta(wnids, tuple(names[w] for w in wnids))
    return ImageNetMeta(wnids, tuple(names[w] for w in wnids), tuple(by_id[int(i)] for i in truth))


def _read_member(folder: Path, member: str) -> bytes:
    try:
        return (folder / member).read_bytes()
    except FileNotFoundError:
        raise KeyError(member) from None


def find_meta(root: Path) -> Optional[Path]:
    """The metadata source in ``root`` (see the module docstring), or None."""
    for candidate in (root / "meta.bin", root / DEVKIT, root / f"{DEVKIT}.tar.gz"):
        if candidate.exists():
            return candidate
    return None


def read_meta(source: Path) -> ImageNetMeta:
    """ImageNet metadata from meta.bin, a devkit folder or a devkit archive.

    Raises:
        ValueError: the source is unreadable or has no meta.mat.
    """
    try:
        if source.name == "meta.bin":
            return _from_meta_bin(source)
        if source.is_dir():
            return _from_devkit(lambda member: _read_member(source, member))
        with tarfile.open(source) as archive:
            return _from_devkit(lambda member: archive.extractfile(archive.getmember(f"{DEVKIT}/{member}")).read())
    except KeyError as err:
        raise ValueError(f"{source} has no {_META_MAT}; pass the ILSVRC2012 devkit ({DEVKIT})") from err
    except (OSError, tarfile.TarError, ValueError, RuntimeError) as err:
        raise ValueError(f"{source} is not a readable ImageNet devkit or meta.bin ({type(err).__name__}: {err})") from err
