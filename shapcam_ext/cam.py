"""ShapCAM: the pytorch-grad-cam contract over the Shapley engine.

``ShapCAM(model, target_layers, reshape_transform)`` then ``cam(input_tensor, targets)``
returns a float32 (B, H, W) numpy array, post-processed exactly as pytorch-grad-cam's BaseCAM
does: ReLU, per-image min-max, resize to the input, and for several layers the mean of the
scaled maps, scaled again. Code written for pytorch-grad-cam switches by changing the import.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Union

import numpy as np
import torch

from shapcam_ext.config import SamplingConfig
from shapcam_ext.engine import ShapleyEngine
from shapcam_ext.head import LayerInput, Prepared, cut_model
from shapcam_ext.model_state import eval_semantics
from shapcam_ext.postprocess import scale_cam_image
from shapcam_ext.results import ShapleyResult
from shapcam_ext.targets import Target

Layer = Union[torch.nn.Module, str, LayerInput]


class ShapCAM:
    """Shap-CAM with pytorch-grad-cam's interface.

    The model is never modified: it is traced and explained under eval semantics (batch norm on
    its running statistics, dropout off, no autograd), and every module's mode is restored
    afterwards, so parameters and buffers stay bit-identical and a model in training mode gets
    the maps of its evaluation mode.

    Differentiable maps: ``explain(x, targets, create_graph=True)`` (or ``prepare`` and
    ``estimate`` with ``create_graph=True``) records autograd's graph, still in eval mode, and
    returns results whose ``shapley`` and ``feature_map`` have a ``grad_fn``: for the permutations
    drawn (fixed by the seed), the estimate is a differentiable function of the model's
    parameters, the input and the baseline, so a loss on the map trains the model. The graph's
    memory is bounded (see :mod:`shapcam_ext.engine`); gradients go wherever the caller's
    ``backward`` sends them, never written by ShapCAM itself.

    Args:
        model: the network.
        target_layers: a list of modules (or qualified names) whose output positions are the
            players (``shapcam_ext.head.LayerInput(module)``: its input's positions); several
            layers' maps are averaged as pytorch-grad-cam does.
        reshape_transform: maps a non-4-D activation (e.g. ViT tokens) to (B, C, h, w); it must
            only rearrange elements (pytorch-grad-cam's ViT and Swin transforms do).
        config: the sampling settings (:class:`shapcam_ext.SamplingConfig`); default: its defaults.
        head: the model from the target layer on, when it can't be extracted automatically.
        progress: show a progress bar over permutations.
        **overrides: sampling settings changed from ``config`` (``n_permutations=1024, seed=3``...).

    Raises:
        ValueError / TypeError: target layers that are not a list of this model's modules or
            names, bad or unknown sampling settings.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        target_layers: Sequence[Layer],
        reshape_transform: Optional[Callable] = None,
        *,
        config: Optional[SamplingConfig] = None,
        head: Optional[Callable] = None,
        progress: bool = False,
        **overrides: Any,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if config is not None and not isinstance(config, SamplingConfig):
            raise TypeError(f"config must be a shapcam_ext.SamplingConfig, got {type(config).__name__}")
        self.model = model
        self.target_layers = _check_target_layers(target_layers)
        self.reshape_transform = reshape_transform
        self.config = (config or SamplingConfig()).replace(**overrides)
        with eval_semantics(model):  # trace what evaluation runs, whatever the model's mode
            cuts = cut_model(model, self.target_layers, head)
        self.engine = ShapleyEngine(model, cuts, self.config, reshape_transform, progress)
        self.outputs: Any = None

    def prepare(self, input_tensor: torch.Tensor, create_graph: bool = False) -> Prepared:
        """Runs the model once on a batch and keeps what every explanation of it reads: the
        model's output (``.outputs``, also kept as ``self.outputs``) and each target layer's
        activation and held values (``.layers``). With ``create_graph``, the pass records its
        autograd graph, which ``estimate(..., create_graph=True)`` needs.

        Raises:
            TypeError / ValueError: input the model cannot take, named with the fix.
        """
        prepared = self.engine.prepare(input_tensor, create_graph)
        self.outputs = prepared.outputs
        return prepared

    def estimate(self, prepared: Prepared, targets: Optional[Sequence[Target]] = None,
                 layer: int = 0, create_graph: bool = False) -> List[ShapleyResult]:
        """Full results (signed map, standard errors, efficiency, timing) of a prepared batch for
        one target layer; no model forward runs again.

        Args:
            prepared: what :meth:`prepare` returned for the batch.
            targets: one pytorch-grad-cam-style target per image (a callable on one image's
                output), or None for each image's top class with its softmax probability.
            layer: index into ``target_layers``.
            create_graph: return differentiable maps (``shapley`` and ``feature_map`` on the
                model's device, with a ``grad_fn``); ``prepared`` must then come from
                ``prepare(x, create_graph=True)``.

        Raises:
            TypeError / ValueError: targets or a layer that do not fit, named; create_graph for a
                batch prepared without its graph.
            shapcam_ext.BatchError: some images failed (its ``results`` has the rest).
        """
        return self.engine.estimate(prepared, targets, layer, create_graph)

    def explain(self, input_tensor: torch.Tensor, targets: Optional[Sequence[Target]] = None,
                layer: int = 0, create_graph: bool = False) -> List[ShapleyResult]:
        """``estimate(prepare(input_tensor, create_graph), targets, layer, create_graph)``: one
        forward pass, then the maps (differentiable ones with ``create_graph``)."""
        return self.estimate(self.prepare(input_tensor, create_graph), targets, layer, create_graph)

    def forward(self, input_tensor: torch.Tensor, targets: Optional[Sequence[Target]] = None,
                eigen_smooth: bool = False) -> np.ndarray:
        """(B, H, W) float32 maps in [0, 1], combined over the target layers (one forward pass)."""
        refuse_eigen_smooth(eigen_smooth)
        size = (input_tensor.shape[-1], input_tensor.shape[-2])
        prepared = self.prepare(input_tensor)
        per_layer = []
        for layer in range(len(self.target_layers)):
            per_layer.append(np.stack([r.cam_image(size) for r in self.estimate(prepared, targets, layer)]))
        combined = np.maximum(np.stack(per_layer, axis=1), 0).mean(axis=1)
        return scale_cam_image(torch.from_numpy(combined))

    def __call__(self, input_tensor: torch.Tensor, targets: Optional[Sequence[Target]] = None,
                 aug_smooth: bool = False, eigen_smooth: bool = False) -> np.ndarray:
        """Shap-CAM maps of a batch, post-processed like pytorch-grad-cam's.

        Example::

            from shapcam_ext import ShapCAM, ClassifierOutputSoftmaxTarget

            with ShapCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
                maps = cam(input_tensor=x, targets=[ClassifierOutputSoftmaxTarget(281)])
            # maps: (B, H, W) float32 in [0, 1], one per image, at the input's resolution

        Args:
            input_tensor: (B, C, H, W) batch on the model's device.
            targets: one target per image (any pytorch-grad-cam target), or None for each
                image's top class scored by its softmax probability (the paper's Y^c).
            aug_smooth, eigen_smooth: pytorch-grad-cam options that have no Shapley counterpart;
                True raises ValueError.

        Returns:
            (B, H, W) float32 numpy array: ReLU, min-max per image, resized to the input.

        Raises:
            TypeError / ValueError: bad input, targets or options, named with the fix.
            shapcam_ext.engine.BatchError: some images failed; the others are in its ``results``.
        """
        if aug_smooth:
            raise ValueError("aug_smooth is not supported by ShapCAM; average several calls yourself.")
        return self.forward(input_tensor, targets, eigen_smooth)

    # What pytorch-grad-cam's wrappers read from their base method: SESS its .model, .device and
    # .activations_and_grads.release(); FinerCAM these two flags, then BaseCAM's internals.
    uses_gradients = False
    compute_input_gradient = False

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are (the CPU for a model without any)."""
        param = next(self.model.parameters(), None)
        return torch.device("cpu") if param is None else param.device

    @property
    def activations_and_grads(self) -> "_NoHooks":
        return _NoHooks()

    def __enter__(self) -> "ShapCAM":
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        # Nothing to release: no hooks stay registered between calls.
        return None


def refuse_eigen_smooth(eigen_smooth: bool) -> None:
    """pytorch-grad-cam's eigen_smooth has no Shapley counterpart: refused, never ignored."""
    if eigen_smooth:
        raise ValueError("eigen_smooth projects channel-weighted activations; Shap-CAM has none. Drop it.")


class _NoHooks:
    """Where pytorch-grad-cam's BaseCAM keeps its hooks (ActivationsAndGradients): ShapCAM keeps
    none, so there is nothing to release, and a wrapper that drives BaseCAM's internals is told
    which class has them."""

    def release(self) -> None:
        return None

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("this pytorch-grad-cam wrapper drives BaseCAM's internals (its hooks, per-layer maps); "
                        "pass base_method=shapcam_ext.adapters.gradcam.ShapCAMBase instead of ShapCAM")


def _check_target_layers(target_layers: Any) -> list:
    """The layers as a list, or a one-line error naming what is wrong and the fix."""
    if isinstance(target_layers, (str, torch.nn.Module)):
        example = repr(target_layers) if isinstance(target_layers, str) else "model.layer4"
        raise TypeError(f"target_layers must be a list of layers, got a single {type(target_layers).__name__}; "
                        f"wrap it in a list: target_layers=[{example}]")
    try:
        layers = list(target_layers)
    except TypeError:
        raise TypeError(f"target_layers must be a list of modules or qualified names, got "
                        f"{type(target_layers).__name__}") from None
    if not layers:
        raise ValueError("target_layers is empty; pass at least one layer, e.g. [model.layer4]")
    for layer in layers:
        if not isinstance(layer, (str, torch.nn.Module, LayerInput)):
            raise TypeError(f"each target layer must be a module of the model or its qualified name, got "
                            f"{type(layer).__name__} {layer!r}; e.g. [model.layer4] or ['layer4']")
    return layers
