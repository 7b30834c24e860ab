"""The samples a command runs on, from its arguments, checked against the model's classes."""
from __future__ import annotations

import argparse

from shapcam_ext.cli.datasets import SampleSet, add_json_boxes, from_paths, one_per_image, open_data
from shapcam_ext.cli.errors import CommandError
from shapcam_ext.cli.images import bundled_photos
from shapcam_ext.cli.parser import LABEL
from shapcam_ext.cli.session import Session

__all__ = ["adopt_class_names", "samples_of"]


def samples_of(args: argparse.Namespace) -> SampleSet:
    """The samples of IMAGE arguments, ``--data``, or else the bundled photos, with ``--boxes``.

    With ``--target label`` every sample needs a label, and an image with several labelled objects
    counts once per object; with any other target each image counts once.

    Raises:
        CommandError: no data, unreadable data or boxes, conflicting inputs, or samples without a
            label for ``--target label``; the message names the fix.
    """
    images = getattr(args, "images", [])
    if images and args.data:
        raise CommandError("pass IMAGE arguments or --data, not both")
    try:
        if args.data:
            found = open_data(args.data, args.data_format, args.boxes, args.split)
        else:
            found = from_paths(images or bundled_photos().values())
            if not found.samples:
                raise CommandError("no images given and no bundled photos found; pass --data or install scikit-image")
            if args.boxes is not None:
                found = add_json_boxes(found, args.boxes)
    except (ValueError, OSError) as err:
        raise CommandError(str(err)) from err
    if args.target != LABEL:
        return one_per_image(found)
    unlabelled = [s.image.name for s in found.samples if s.label is None]
    if unlabelled:
        raise CommandError(
            f"--target label: {len(unlabelled)} image(s) have no label ({', '.join(unlabelled[:3])}); pass labelled "
            "data (ImageFolder, ImageNet with its devkit, VOC, or --boxes with class indices) or --target top"
        )
    return found


def adopt_class_names(found: SampleSet, session: Session, labels: bool) -> None:
    """Name the model's classes after the data's when they number alike (a VOC model, an ImageFolder model).

    Raises:
        CommandError: ``labels`` (``--target label``) with data whose classes are not the model's.
    """
    names = found.class_names
    if names is not None and len(names) == session.n_classes:
        session.class_names = list(names)
    elif names is not None and labels:
        raise CommandError(
            f"--target label: the data's labels are its own {len(names)} classes ({', '.join(names[:3])}, ...) but "
            f"{session.args.model} has {session.n_classes} outputs; pass a model trained on them or --target top"
        )
    elif labels and max(s.label for s in found.samples) >= session.n_classes:
        raise CommandError(f"--target label: labels go past {session.args.model}'s {session.n_classes} classes")
