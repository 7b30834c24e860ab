"""Choosing the target layer: a sensible default per family, and a check that a layer outputs a feature map."""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

__all__ = ["default_layer", "feature_map_layers", "layer_output_shape", "require_feature_map"]

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


def layer_output_shape(model: nn.Module, layer: str, input_size: tuple[int, int]) -> Optional[tuple[int, ...]]:
    """The shape of ``layer``'s output for one zero image of ``input_size``, or None when it returns no tensor."""
    return _output_shapes(model, input_size).get(layer)


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
    shape = layer_output_shape(model, layer, input_size)
    if shape is None or len(shape) == 4:
        return
    default = default_layer(model_name, model, input_size)
    others = [n for n in reversed(feature_map_layers(model, input_size))
              if n != default and not n.startswith(f"{default}.")][:3]  # the default's children repeat it
    raise ValueError(
        f"layer {layer!r} outputs shape {shape}, not a (B, C, h, w) feature map, so it has no positions to "
        f"explain; choose a convolutional layer such as {', '.join([f'{default} (the default)', *others])}"
    )
