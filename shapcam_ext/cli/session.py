"""What one ``explain`` run loads once for all its images: device, model, preprocessing, layer, explainer."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional

import torch

import shapcam_ext
from shapcam_ext.cli import distributed
from shapcam_ext.cli.errors import IMAGE_ERRORS, CommandError
from shapcam_ext.cli.layers import default_layer, require_feature_map
from shapcam_ext.cli.models import imagenet_classes, load_model
from shapcam_ext.cli.parser import DEFAULT_PERMUTATION_CAP, DEFAULT_PERMUTATIONS
from shapcam_ext.cli.preprocessing import PreprocessConfig

__all__ = ["Session", "open_session", "resolve_device"]


@dataclass
class Session:
    """Everything loaded once and shared by the images of one ``explain`` run."""

    args: argparse.Namespace
    model: torch.nn.Module
    preprocess: PreprocessConfig
    layer: str
    cam: shapcam_ext.ShapCAM
    class_names: Optional[list[str]]
    n_classes: int
    device: torch.device

    def class_name(self, index: int) -> str:
        return self.class_names[index] if self.class_names else f"class {index}"


def resolve_device(requested: torch.device) -> torch.device:
    """The device to run on: ``requested``, checked to exist.

    Under torchrun, a bare ``cuda`` means each process's own GPU (its LOCAL_RANK).

    Raises:
        CommandError: CUDA is not available, or the index names a GPU this machine lacks.
    """
    if requested.type != "cuda":
        return requested
    if not torch.cuda.is_available():
        raise CommandError(
            f"--device {requested}: CUDA is not available to torch {torch.__version__}; use --device cpu"
        )
    count = torch.cuda.device_count()
    index = distributed.local_rank() % count if requested.index is None else requested.index
    if index >= count:
        raise CommandError(
            f"--device {requested}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; "
            "pick one of them or cpu"
        )
    return torch.device("cuda", index)


def open_session(args: argparse.Namespace) -> Session:
    """Load the model and build the explainer for the ``explain`` arguments ``args``.

    Raises:
        CommandError: the device, model, weights, layer or target does not work; the message
            names what to change.
    """
    device = resolve_device(args.device)
    try:
        model, preprocess = load_model(args.model, args.weights)
        model.to(device)
        layer = args.layer or default_layer(args.model, model, preprocess.input_size)
        cam = shapcam_ext.ShapCAM(
            model, [layer],
            n_permutations=args.permutations or (DEFAULT_PERMUTATION_CAP if args.tolerance else DEFAULT_PERMUTATIONS),
            tolerance=args.tolerance, design=args.design, antithetic=args.antithetic, seed=args.seed,
            progress=sys.stderr.isatty() and not args.quiet,
        )
        require_feature_map(args.model, model, layer, preprocess.input_size)
        with torch.no_grad():
            n_classes = model(torch.zeros(1, 3, *preprocess.input_size, device=device)).shape[-1]
    except IMAGE_ERRORS as err:
        raise CommandError(f"model {args.model!r}: {err}") from err
    if isinstance(args.target, int) and args.target >= n_classes:
        raise CommandError(f"--target {args.target}: {args.model} has {n_classes} classes (0 to {n_classes - 1})")
    class_names = imagenet_classes() if n_classes == 1000 else None
    return Session(args, model, preprocess, layer, cam, class_names, n_classes, device)
