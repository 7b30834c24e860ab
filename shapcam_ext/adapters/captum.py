"""Shap-CAM as a Captum layer attribution: ``LayerShapCAM(forward_func, layer).attribute(inputs, target)``.

Example, in Captum's convention::

    from captum.attr import LayerAttribution

    from shapcam_ext.adapters.captum import LayerShapCAM

    probabilities = torch.nn.Sequential(model, torch.nn.Softmax(-1)).eval()  # the paper's Y^c
    shap_cam = LayerShapCAM(probabilities, model.layer4, n_permutations=256)
    attributions, delta = shap_cam.attribute(input_tensor, target=281, return_convergence_delta=True)
    upsampled = LayerAttribution.interpolate(attributions, input_tensor.shape[-2:], "bilinear")

``LayerShapCAM`` subclasses Captum's own ``LayerAttribution``, so ``isinstance`` checks and
``interpolate`` are Captum's. Captum is imported with this module only (``import shapcam_ext``
does not import it), which is what keeps it optional; a class built on first use would buy
nothing more and could not be named in annotations or ``isinstance`` checks.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from shapcam_ext.adapters import import_optional
from shapcam_ext.cam import ShapCAM
from shapcam_ext.head import LayerInput
from shapcam_ext.targets import ClassifierOutputTarget, Target

LayerAttribution = import_optional("captum.attr", "captum").LayerAttribution
log_usage = import_optional("captum.log", "captum").log_usage

TargetType = Union[None, int, Tuple[int, ...], Tensor, List[Any]]


class LayerShapCAM(LayerAttribution):
    """Shap-CAM of a layer's output positions, as a Captum layer attribution.

    As in Captum, the attributed score is ``forward_func``'s output at ``target``: a logit for a
    classifier, so wrap the model with a softmax to attribute the paper's class probability Y^c.
    The map has one value per position of the layer's (N, C, h, w) output, its Shapley value, and
    sums to the score difference between the layer's real output and the baseline activation.
    With ``group_size=g > 1`` the players are g x g blocks of positions and each position holds an
    equal share of its block's value, so the map still sums to that difference.

    A module ``forward_func`` holding ``layer`` and called on one input tensor is cut at the
    layer once, on the engine's fast traced paths where they apply. Any other callable, several
    input tensors or ``additional_forward_args`` are bound to each call's inputs; a callable that
    is not a module runs through the engine's hook path, which reruns it on every coalition, so
    prefer a module (``nn.Sequential(model, nn.Softmax(-1))`` rather than a lambda). The modules
    this adapter can reach (``forward_func`` when it is a module, and ``layer``) are run in eval
    mode and then restored; put the rest of a plain callable's model in eval mode yourself.

    The signature is Captum's ``LayerGradCam``'s (plus the sampling settings and
    ``return_convergence_delta``), so code written for it switches by changing the class;
    ``has_convergence_delta()`` is True, so Captum's ``NoiseTunnel`` passes deltas through.

    Args:
        forward_func: the model, or any callable ``forward_func(*inputs, *additional_forward_args)``
            returning a (N, ...) tensor that calls ``layer`` once.
        layer: the module whose output positions are attributed.
        device_ids: Captum's list of devices for a ``forward_func`` that applies a DataParallel
            model; only None is taken: the engine runs the model on one device.
        **options: the sampling settings of :class:`shapcam_ext.ShapCAM` (``n_permutations``,
            ``seed``, ``group_size``, ``baseline``, ``reshape_transform``, ...).

    Raises:
        TypeError: ``layer`` is not a module.
        ValueError: ``device_ids`` is given.
    """

    def __init__(self, forward_func: Callable[..., Tensor], layer: nn.Module,
                 device_ids: Optional[List[int]] = None, **options: Any) -> None:
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layer must be a torch.nn.Module, as in Captum; got {type(layer).__name__}")
        if device_ids is not None:
            raise ValueError("LayerShapCAM runs the model on one device and takes no device_ids; pass the model "
                             "inside the DataParallel (its .module) as forward_func")
        super().__init__(forward_func, layer, device_ids)
        self.options = options
        self._holds_layer = isinstance(forward_func, nn.Module) and any(m is layer for m in forward_func.modules())
        self._direct: Dict[bool, ShapCAM] = {}  # by attribute_to_layer_input

    def has_convergence_delta(self) -> bool:
        """True: ``attribute(..., return_convergence_delta=True)`` also returns the deltas."""
        return True

    @log_usage()  # as Captum's own methods: NoiseTunnel calls attribute.__wrapped__
    def attribute(
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        target: TargetType = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        relu_attributions: bool = False,
        attr_dim_summation: bool = True,
        grad_kwargs: Optional[Dict[str, Any]] = None,
        return_convergence_delta: bool = False,
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Signed Shap-CAM of ``layer`` for each example.

        Args:
            inputs: a (N, ...) tensor, or a tuple of tensors sharing the batch N, passed to
                ``forward_func``.
            target: which value of ``forward_func``'s output is attributed, as in Captum: an int
                (or a one-element tensor) for every example, a list or 1-D tensor of N ints, a
                tuple of indices for every example (outputs with more dimensions), or a list of N
                tuples; None when the output holds one value per example.
            additional_forward_args: passed to ``forward_func`` after the inputs, as in Captum:
                one value, or a tuple of them; tensors (other than 0-d ones) are batched along
                dimension 0 with the inputs.
            attribute_to_layer_input: attribute the positions of the layer's input (the one
                tensor it is called on) instead of its output.
            relu_attributions: ReLU the map, as in Captum (GradCAM's original, non-negative form).
            attr_dim_summation: only True: a player is a position with all of its channels, so
                the map holds one value per position, as Captum's channel sum does.
            grad_kwargs: only None: Shap-CAM evaluates the model and takes no gradients.
            return_convergence_delta: also return, per example, the map's sum minus
                (f(inputs) - f(baseline activation)), f being ``forward_func`` at ``target``
                (of the ReLU'd map with ``relu_attributions``).

        Returns:
            The (N, 1, h, w) map, with the inputs' dtype (the default float dtype for integer
            inputs) and device; with ``return_convergence_delta``, ``(map, delta)`` where
            ``delta`` is a (N,) tensor of the same dtype and device.

        Raises:
            ValueError: inputs or tensor arguments without a common batch, a target that does not
                pick one value per example, bad sampling settings (checked when the layer is cut),
                ``attr_dim_summation=False`` or ``grad_kwargs``.
            shapcam_ext.BatchError: some examples could not be explained (non-finite activations).
        """
        if not attr_dim_summation:
            raise ValueError("Shap-CAM values a position with all of its channels, so there are no per-channel "
                             "attributions; drop attr_dim_summation=False")
        if grad_kwargs is not None:
            raise ValueError("Shap-CAM takes no gradients, so grad_kwargs has no use; drop it")
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        args = _as_tuple(additional_forward_args)
        explainer, engine_input = self._explainer(inputs, args, attribute_to_layer_input)
        prepared = explainer.prepare(engine_input)  # the one forward pass: the output and the layer's activation
        output = prepared.outputs
        indices = _target_indices(target, output)
        results = explainer.estimate(prepared, [_engine_target(i, output) for i in indices])

        dtype = inputs[0].dtype if inputs[0].is_floating_point() else torch.get_default_dtype()
        maps = torch.stack([r.feature_map for r in results])[:, None]
        maps = maps.to(inputs[0].device, dtype)
        if relu_attributions:
            maps = maps.clamp_min(0)
        if not return_convergence_delta:
            return maps
        full = torch.stack([output[(b, *index)] for b, index in enumerate(indices)]).double().cpu()
        empty = torch.tensor([r.value_empty for r in results], dtype=torch.float64)
        delta = maps.double().sum((1, 2, 3)).cpu() - (full - empty)
        return maps, delta.to(inputs[0].device, dtype)

    def _explainer(self, inputs: Tuple[Tensor, ...], args: Tuple[Any, ...],
                   at_input: bool) -> Tuple[ShapCAM, Tensor]:
        """The engine's explainer for this call and the one tensor it is run on; the explainer of
        ``forward_func`` itself is cut once, on first use."""
        cut = LayerInput(self.layer) if at_input else self.layer
        if self._holds_layer and len(inputs) == 1 and not args:
            if at_input not in self._direct:
                self._direct[at_input] = ShapCAM(self.forward_func, [cut], **self.options)
            return self._direct[at_input], inputs[0]
        bound = _BoundForward(self.forward_func, self.layer, inputs, args)
        # Cut afresh per call: a traced cut holds this call's inputs as constants.
        return ShapCAM(bound, [cut], **self.options), torch.arange(bound.batch, device=inputs[0].device)


class _BoundForward(nn.Module):
    """``forward_func`` bound to one call's inputs and extra arguments, as a module of example indices.

    The engine cuts a module of one batched tensor and evaluates rows of it, each example repeated
    once per coalition; with example indices as that tensor, every row selects its own example's
    inputs and batched arguments. It owns ``layer`` (through ``forward_func`` when that is a
    module holding it), so the engine can find the layer in it.
    """

    def __init__(self, forward_func: Callable[..., Tensor], layer: nn.Module, inputs: Tuple[Tensor, ...],
                 args: Tuple[Any, ...]):
        super().__init__()
        self.forward_func = forward_func
        self.layer = layer
        self.batch = inputs[0].shape[0]
        for value in inputs + args:
            if isinstance(value, Tensor) and value.dim() and value.shape[0] != self.batch:
                raise ValueError(
                    f"inputs and tensor additional_forward_args must share the batch dimension 0 "
                    f"({self.batch} examples), got a tensor of shape {tuple(value.shape)}"
                )
        self.inputs, self.args = inputs, args
        # The engine checks this module's own mode; a new module is in training mode, the user's layer may not be.
        self.training = layer.training

    def forward(self, rows: Tensor) -> Tensor:
        def select(value: Any) -> Any:
            return value[rows] if isinstance(value, Tensor) and value.dim() else value

        return self.forward_func(*map(select, self.inputs), *map(select, self.args))


@dataclass(frozen=True)
class _OutputAt:
    """The value of a model output at ``index`` (the dimensions after the batch).

    It indexes the trailing dimensions, so it picks the same value from one example's output or
    from a stack of them.
    """

    index: Tuple[int, ...]

    def __call__(self, output: Tensor) -> Tensor:
        return output[(..., *self.index)]


def _engine_target(index: Tuple[int, ...], output: Tensor) -> Target:
    # A class of a (N, classes) output is the engine's class target, which keeps its fast paths.
    return ClassifierOutputTarget(index[0]) if output.dim() == 2 else _OutputAt(index)


def _target_indices(target: TargetType, output: Tensor) -> List[Tuple[int, ...]]:
    """Captum's target as one index per example into ``output``'s dimensions after the batch.

    Raises:
        TypeError: the output is not a tensor.
        ValueError: the target does not pick exactly one value of each example's output.
    """
    if not isinstance(output, Tensor):
        raise TypeError(f"forward_func must return a tensor, as in Captum; got {type(output).__name__}")
    batch, dims = output.shape[0], output.dim() - 1
    if target is None:
        if output[0].numel() != 1:
            raise ValueError(
                f"forward_func returns {tuple(output.shape[1:])} values per example; pass target= to pick one "
                "(as in Captum: a class index, a list of them, or a tuple of indices)"
            )
        return [(0,) * dims] * batch
    if isinstance(target, Tensor):
        target = target.item() if target.numel() == 1 else target.tolist()
    if not isinstance(target, list):
        target = [target] * batch
    if len(target) != batch:
        raise ValueError(f"got {len(target)} targets for {batch} examples; pass one target, or one per example")
    try:
        indices = [tuple(map(operator.index, t)) if isinstance(t, tuple) else (operator.index(t),) for t in target]
    except TypeError as err:
        raise ValueError(f"targets must be ints or tuples of ints, as in Captum; got {target!r}") from err
    if any(len(index) != dims for index in indices):
        raise ValueError(
            f"forward_func's output has shape {tuple(output.shape)}; each target must index its {dims} "
            "dimension(s) after the batch, to pick one value per example"
        )
    return indices


def _as_tuple(additional_forward_args: Any) -> Tuple[Any, ...]:
    """Captum's convention: None is no argument, a tuple is several, anything else is one."""
    if additional_forward_args is None:
        return ()
    return additional_forward_args if isinstance(additional_forward_args, tuple) else (additional_forward_args,)
