"""Shap-CAM as a torchcam extractor: build it on the model, run the model, then ask for the maps.

Example, in torchcam's convention::

    from torchcam.utils import overlay_mask
    from torchvision.transforms.functional import to_pil_image

    from shapcam_ext.adapters.torchcam import ShapCAM

    with ShapCAM(model, target_layer="layer4", n_permutations=128) as cam_extractor:
        out = model(input_tensor)
        cams = cam_extractor(out.squeeze(0).argmax().item(), out)
    overlay = overlay_mask(to_pil_image(img), to_pil_image(cams[0].squeeze(0), mode="F"), alpha=0.5)

The extractor is a subclass of torchcam's own ``_CAM``, so the layer lookup (including the
default layer), the hooks and their switches, ``fuse_cams``, the argument checks and the context
manager are torchcam's; torchcam's metrics (``ClassificationMetric``, ``DeletionInsertionMetric``)
take it like any torchcam method.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from shapcam_ext.adapters import import_optional
from shapcam_ext.cam import ShapCAM as _ShapCAM
from shapcam_ext.targets import ClassifierOutputSoftmaxTarget

_core = import_optional("torchcam.methods.core", "torchcam")
_CAM = _core._CAM

Layer = Union[nn.Module, str]


class ShapCAM(_CAM):
    """Shap-CAM with torchcam's extractor interface.

    The map of a target layer is the Shapley value of each of its positions for the softmax
    probability of the class (the paper's Y^c), estimated by the engine on the input of the last
    forward pass. ``scores`` are not needed: the extractor evaluates the model itself.

    Calling the extractor, ``cam_extractor(class_idx, scores=None, normalized=True)``, returns a
    list with one (N, h, w) map per target layer, of the layer activation's dtype and device:
    ReLU'd and min-max normalised per image to [0, 1] with torchcam's own normalisation when
    ``normalized``; otherwise the signed Shapley values (the paper's map, like torchcam's CAM,
    which is not ReLU'd either), summing to Y^c(input) - Y^c(baseline activation). With
    ``group_size=g > 1`` each cell holds an equal share of its g x g player's value.

    Args:
        model: the network; its first positional forward argument is the input explained.
        target_layer: the layer(s), as modules or qualified names; None lets torchcam pick the
            last layer with a spatial output for an input of ``input_shape`` (it logs its choice).
        input_shape: (C, H, W) of one input, used only to find the default layer.
        enable_hooks: whether the hooks record from the start (see ``enable_hooks()`` /
            ``disable_hooks()``).
        reshape_transform: maps a target layer's output that is not (N, C, h, w), such as ViT
            tokens, to that shape; torchcam's hooks and the engine both use it.
        **options: the sampling settings of :class:`shapcam_ext.ShapCAM` (``n_permutations``,
            ``seed``, ``group_size``, ``baseline``, ...).

    Raises:
        ValueError: an unknown layer name, no default layer found, or bad sampling settings.
        TypeError: a target layer that is neither a module nor a name.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: Optional[Union[Layer, List[Layer]]] = None,
        input_shape: Tuple[int, ...] = (3, 224, 224),
        enable_hooks: bool = True,
        reshape_transform: Optional[Callable[[Tensor], Tensor]] = None,
        **options: Any,
    ) -> None:
        super().__init__(model, target_layer, input_shape, enable_hooks, reshape_transform)
        self._targets_supported = True  # the engine scores any per-sample output target
        self.options = options
        try:
            self.cam = _ShapCAM(model, self.target_names, reshape_transform, **options)
        except Exception:
            self.remove_hooks()  # torchcam registered its hooks already; don't leave them on the user's model
            raise
        self.hook_handles.append(model.register_forward_pre_hook(self._store_input))

    def _store_input(self, _: nn.Module, args: Tuple[Any, ...]) -> None:
        if self._hooks_enabled:
            self._input = args[0].detach().clone()  # as torchcam: later in-place edits of the input must not leak in

    def reset_hooks(self) -> None:
        """Clear the stored activations and input."""
        super().reset_hooks()
        self._input: Optional[Tensor] = None

    def compute_cams(
        self,
        class_idx: Union[int, Sequence[int], None] = None,
        scores: Any = None,
        normalized: bool = True,
        *,
        targets: Any = None,
    ) -> List[Tensor]:
        """One map per target layer for the last input (torchcam's ``__call__`` checks the arguments first).

        Args:
            class_idx: the class of every image, or one class per image; its softmax probability
                is the worth.
            scores: unused; the extractor evaluates the model itself.
            normalized: ReLU and min-max normalise each map to [0, 1]; False returns the signed values.
            targets: instead of ``class_idx``, torchcam's output targets: one callable on a
                sample's output for the whole batch, or one per sample.

        Returns:
            (N, h, w) maps, one per target layer, in the order of ``target_names``.

        Raises:
            shapcam_ext.BatchError: some images could not be explained (non-finite activations).
        """
        batch = self._input.shape[0]
        if targets is not None:
            worth = _core._resolve_targets(targets, batch)
        else:
            classes = [class_idx] * batch if isinstance(class_idx, int) else class_idx
            worth = [ClassifierOutputSoftmaxTarget(c) for c in classes]
        # torchcam's own switches: the engine's forward pass runs in eval mode and leaves the hooked state alone
        with self._hooks_off(), self._eval_mode():
            prepared = self.cam.prepare(self._input)  # one forward pass for every target layer
        cams = []
        for layer, activation in enumerate(self.hook_a):
            with self._hooks_off(), self._eval_mode():
                results = self.cam.estimate(prepared, worth, layer)
            cam = torch.stack([r.feature_map for r in results]).to(activation)
            cams.append(self._normalize(cam.clamp_min(0)) if normalized else cam)
        return cams

    def _extra_repr(self) -> str:
        return super()._extra_repr() + "".join(f", {key}={value!r}" for key, value in self.options.items())
