"""ShapCAM: the pytorch-grad-cam contract over the Shapley engine.

``ShapCAM(model, target_layers, reshape_transform)`` then ``cam(input_tensor, targets)``
returns a float32 (B, H, W) numpy array, post-processed exactly as pytorch-grad-cam's BaseCAM
does: ReLU, per-image min-max, resize to the input, and for several layers the mean of the
scaled maps, scaled again. Code written for pytorch-grad-cam switches by changing the import.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch

from shapcam_ext.engine import SamplingConfig, ShapleyEngine, ShapleyResult, _check_device
from shapcam_ext.head import split_model
from shapcam_ext.postprocess import scale_cam_image
from shapcam_ext.targets import Target

Layer = Union[torch.nn.Module, str]


class ShapCAM:
    """Shap-CAM with pytorch-grad-cam's interface.

    Args:
        model: the network, in eval mode.
        target_layers: modules (or qualified names) whose output positions are the players.
        reshape_transform: maps a non-4-D activation (e.g. ViT tokens) to (B, C, h, w).
        n_permutations, antithetic, seed, tolerance, exact, baseline, group_size,
        memory_budget, batch_size, fast_path: see :class:`shapcam_ext.engine.SamplingConfig`.
        head: the model from the target layer on, when it can't be extracted automatically.
        progress: show a progress bar over permutations.

    Raises:
        ValueError: a target layer not in the model, bad sampling settings.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        target_layers: Sequence[Layer],
        reshape_transform: Optional[Callable] = None,
        *,
        n_permutations: int = 256,
        antithetic: bool = True,
        seed: Optional[int] = 0,
        tolerance: Optional[float] = None,
        exact: bool = False,
        baseline=0.0,
        group_size: int = 1,
        memory_budget: int = SamplingConfig.memory_budget,
        batch_size: Optional[int] = None,
        fast_path: bool = True,
        head: Optional[Callable] = None,
        progress: bool = False,
    ):
        self.model = model
        self.target_layers = list(target_layers)
        self.reshape_transform = reshape_transform
        self.config = SamplingConfig(
            n_permutations=n_permutations, antithetic=antithetic, seed=seed, tolerance=tolerance, exact=exact,
            baseline=baseline, group_size=group_size, memory_budget=memory_budget, batch_size=batch_size,
            fast_path=fast_path,
        )
        self.config.validate()
        self.engines = [
            ShapleyEngine(split_model(model, layer, head), self.config, reshape_transform, progress)
            for layer in self.target_layers
        ]
        self.outputs: Optional[torch.Tensor] = None

    def explain(self, input_tensor: torch.Tensor, targets: Optional[Sequence[Target]] = None,
                layer: int = 0) -> List[ShapleyResult]:
        """Full results (signed map, standard errors, efficiency, timing) for one target layer.

        Raises:
            ValueError: targets not matching the batch, input and model on different devices.
            shapcam_ext.engine.BatchError: some images failed (its ``results`` has the rest).
        """
        _check_device(self.model, input_tensor)
        results, self.outputs = self.engines[layer].explain(input_tensor, targets)
        return results

    def forward(self, input_tensor: torch.Tensor, targets: Optional[Sequence[Target]] = None,
                eigen_smooth: bool = False) -> np.ndarray:
        """(B, H, W) float32 maps in [0, 1], combined over the target layers."""
        if eigen_smooth:
            raise ValueError("eigen_smooth projects channel-weighted activations; Shap-CAM has none. Drop it.")
        size = (input_tensor.shape[-1], input_tensor.shape[-2])
        per_layer = []
        for layer in range(len(self.engines)):
            per_layer.append(np.stack([r.cam_image(size) for r in self.explain(input_tensor, targets, layer)]))
        combined = np.maximum(np.stack(per_layer, axis=1), 0).mean(axis=1)
        return scale_cam_image(torch.from_numpy(combined))

    def __call__(self, input_tensor: torch.Tensor, targets: Optional[Sequence[Target]] = None,
                 aug_smooth: bool = False, eigen_smooth: bool = False) -> np.ndarray:
        if aug_smooth:
            raise ValueError("aug_smooth is not supported by ShapCAM; average several calls yourself.")
        return self.forward(input_tensor, targets, eigen_smooth)

    def __enter__(self) -> "ShapCAM":
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        # Nothing to release: no hooks stay registered between calls.
        return None
