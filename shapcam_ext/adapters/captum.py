"""Captum's layer-attribution convention: ``LayerShapCAM(forward_func, layer).attribute(inputs, target)``."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from shapcam_ext.cam import ShapCAM
from shapcam_ext.targets import ClassifierOutputTarget


class LayerShapCAM:
    """Shap-CAM as a Captum-style layer attribution.

    Like Captum, the attributed score is ``forward_func``'s output at ``target`` (wrap the
    model with a softmax to attribute probabilities, the paper's Y^c). ``attribute`` returns
    the signed Shapley map at the layer's resolution, (B, 1, h, w), summing to the score
    difference between the full and the baseline activation. Keyword arguments of the
    constructor are the sampling settings of :class:`shapcam_ext.ShapCAM`.
    """

    def __init__(self, forward_func: torch.nn.Module, layer: Union[torch.nn.Module, str], **options):
        self.forward_func = forward_func
        self.layer = layer
        self.options = options
        self._cam = ShapCAM(forward_func, [layer], **options)

    def attribute(self, inputs: torch.Tensor, target: Optional[Union[int, Sequence[int], torch.Tensor]] = None,
                  return_convergence_delta: bool = False):
        """Signed (B, 1, h, w) map; with ``return_convergence_delta`` also each image's efficiency gap."""
        batch = inputs.shape[0]
        if target is None:
            targets = None
        else:
            classes = torch.as_tensor(target).reshape(-1).tolist()
            classes = classes * batch if len(classes) == 1 else classes
            targets = [ClassifierOutputTarget(c) for c in classes]
        if targets is None:
            with torch.no_grad():
                targets = [ClassifierOutputTarget(c) for c in self.forward_func(inputs).argmax(-1).tolist()]
        results = self._cam.explain(inputs, targets)
        maps = torch.stack([r.feature_map for r in results])[:, None].to(inputs.device)
        if return_convergence_delta:
            return maps, torch.tensor([r.efficiency_gap for r in results])
        return maps
