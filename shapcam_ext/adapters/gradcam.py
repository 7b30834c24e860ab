"""ShapCAM as a genuine pytorch-grad-cam ``BaseCAM``, for that library's own tooling."""
from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np
import torch
from pytorch_grad_cam.base_cam import BaseCAM

from shapcam_ext.cam import ShapCAM, refuse_eigen_smooth
from shapcam_ext.head import Prepared


class ShapCAMBase(BaseCAM):
    """A ``BaseCAM`` subclass whose per-layer map comes from the Shapley engine.

    BaseCAM does the forward pass, the ReLU, scaling and layer aggregation; only
    ``get_cam_image`` (its extension point) is overridden. Extra keyword arguments are
    ShapCAM's sampling settings (n_permutations, seed, ...). As in pytorch-grad-cam,
    ``targets=None`` scores the top class's logit here; pass ClassifierOutputSoftmaxTarget
    for the paper's Y^c. ``eigen_smooth=True`` raises ValueError, as in ShapCAM;
    ``aug_smooth=True`` is BaseCAM's (maps of augmented inputs, averaged).

    Wrappers that drive BaseCAM's internals (pytorch-grad-cam's FinerCAM) need this class as
    their ``base_method``; those that only call it (SESS, RefineCAM) also take ShapCAM.
    """

    def __init__(self, model: torch.nn.Module, target_layers: List[torch.nn.Module],
                 reshape_transform: Optional[Callable] = None, **shapcam_options):
        super().__init__(model, target_layers, reshape_transform, uses_gradients=False)
        self.shapcam = ShapCAM(model, target_layers, reshape_transform, **shapcam_options)
        self._prepared: Optional[Prepared] = None

    def get_cam_image(self, input_tensor, target_layer, targets, activations, grads, eigen_smooth=False) -> np.ndarray:
        refuse_eigen_smooth(eigen_smooth)
        layer = next(i for i, t in enumerate(self.target_layers) if t is target_layer)
        # BaseCAM asks once per layer for the same input: the engine's forward pass serves them all
        if self._prepared is None or self._prepared.input is not input_tensor:
            self._prepared = self.shapcam.prepare(input_tensor)
        results = self.shapcam.estimate(self._prepared, targets, layer)
        return torch.stack([r.feature_map for r in results]).float().numpy()
