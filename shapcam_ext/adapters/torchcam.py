"""torchcam's convention: build the extractor, run the model, then ``extractor(class_idx, scores)``."""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from shapcam_ext.cam import ShapCAM as _ShapCAM
from shapcam_ext.postprocess import scale_cam_image
from shapcam_ext.targets import ClassifierOutputSoftmaxTarget

Layer = Union[torch.nn.Module, str]


class ShapCAM:
    """Shap-CAM with torchcam's interface.

    ``ShapCAM(model, target_layer=...)`` hooks the model's input; after a forward pass,
    ``extractor(class_idx, scores)`` returns one (B, h, w) map per target layer, ReLU'd and
    min-max normalised per image like torchcam's ``normalized=True`` (signed when False).
    Keyword arguments are the sampling settings of :class:`shapcam_ext.ShapCAM`.

    Raises:
        RuntimeError: called before any forward pass of the model.
    """

    def __init__(self, model: torch.nn.Module, target_layer: Union[Layer, Sequence[Layer]], **options):
        layers = list(target_layer) if isinstance(target_layer, (list, tuple)) else [target_layer]
        self.cam = _ShapCAM(model, layers, **options)
        self._input: Optional[torch.Tensor] = None
        self._hook = model.register_forward_pre_hook(self._store_input)

    def _store_input(self, module, args):
        self._input = args[0].detach()

    def __call__(self, class_idx: Union[int, Sequence[int]], scores: Optional[torch.Tensor] = None,
                 normalized: bool = True) -> List[torch.Tensor]:
        x = self._input
        if x is None:
            raise RuntimeError("run the model on your input before calling the extractor (torchcam's convention)")
        batch = x.shape[0]
        classes = [class_idx] * batch if isinstance(class_idx, int) else list(class_idx)
        targets = [ClassifierOutputSoftmaxTarget(c) for c in classes]
        maps = []
        for layer in range(len(self.cam.engines)):
            cams = torch.stack([r.feature_map for r in self.cam.explain(x, targets, layer)])
            maps.append(torch.from_numpy(scale_cam_image(cams.clamp_min(0))) if normalized else cams.float())
        self._input = x  # the hook path of an untraceable model reruns the model inside explain()
        return maps

    def remove_hooks(self) -> None:
        self._hook.remove()

    def __enter__(self) -> "ShapCAM":
        return self

    def __exit__(self, *exc) -> None:
        self.remove_hooks()
