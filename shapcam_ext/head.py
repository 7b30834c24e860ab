"""Split a model at a target module into a trunk (input -> activation) and a head (activation -> output).

Shap-CAM evaluates the head on many masked copies of the target activation, so the head must be
cheap to call on its own. The split is done on a torch.fx graph of the model: the trunk graph
computes everything up to the target module, the head graph everything that depends on its output.
Values computed before the cut that the head still needs (residual skip inputs, for example) are
returned by the trunk as ``held`` tensors and passed to the head unchanged.

Several target layers share one trunk: a single graph of the whole model that returns its output
and every cut's activation and held values, so a batch is run through the model once however many
layers are explained (:func:`cut_model`, :class:`ModelCuts`).

When fx cannot trace the model, a target module is called more than once, or one target holds
another, a hook-based split is used instead: one pass of the model captures the targets' outputs,
and each head reruns the whole model on every call (correct, but slow).
"""
from __future__ import annotations

import difflib
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Collection, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map
from torch import Tensor, nn

from shapcam_ext.fxutils import ancestors, descendants, extract, protect_inputs

__all__ = ["LayerActivation", "ModelCuts", "Prepared", "SplitModel", "TrunkOutput", "cut_model", "expand_held",
           "module_name", "split_model"]


@dataclass
class TrunkOutput:
    """What the trunk returns for a batch of B inputs.

    Attributes:
        activation: the target module's output, (B, C, h, w) for CNNs.
        held: other values alive at the cut that the head needs, in a fixed order; pass them to
            the head unchanged (``head(activation, *held)``). Usually tensors of batch B (skip
            inputs; the input itself on the hook path); non-tensor values (e.g. an attention mask
            of None from timm) are passed through as they are.
    """

    activation: Tensor
    held: tuple[Tensor, ...]


@dataclass
class SplitModel:
    """A model cut at ``layer_name``.

    Attributes:
        trunk: ``trunk(x) -> TrunkOutput``; runs the model up to the cut.
        head: ``head(activation, *held) -> output``. ``activation`` may hold N = B*M rows for held
            values of batch B (image-major: rows b*M .. (b+1)*M-1 belong to image b); held tensors
            are then repeated to N with ``repeat_interleave``. The head never modifies its inputs.
        layer_name: qualified name of the target module inside the model.
        graph_module: the head's fx GraphModule (placeholders: activation, *held) when the model
            was traced; None on the hook path or for a user-supplied head.
    """

    trunk: Callable[[Tensor], TrunkOutput]
    head: Callable[..., Tensor]
    layer_name: str
    graph_module: Optional[fx.GraphModule]


@dataclass(frozen=True)
class LayerActivation:
    """One target layer's part of a forward pass.

    name: the layer's qualified name. activation: its output. held: the other values alive at
    the cut that the head needs. head: ``head(activation, *held) -> output``, the model from the
    layer on (differentiable when called under autograd).
    """

    name: str
    activation: Tensor
    held: tuple
    head: Callable[..., Any]


@dataclass(frozen=True)
class Prepared:
    """One forward pass of a batch, kept for every explanation that reads it.

    input: the batch. outputs: the model's output. layers: each target layer's activation and
    held values, in the order of the target layers. seconds: how long the pass took.
    graph: whether the pass recorded its autograd graph, so that gradients of a map reach the
    model before the target layer (and the input).
    """

    input: Tensor
    outputs: Any
    layers: tuple[LayerActivation, ...]
    seconds: float
    graph: bool


def module_name(model: nn.Module, module: nn.Module) -> str:
    """Qualified name of ``module`` inside ``model`` (first name if it is registered twice).

    Raises:
        ValueError: ``module`` is not a submodule of ``model``.
    """
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(
        f"{type(module).__name__} module is not a submodule of the {type(model).__name__} model; "
        "pass a module taken from this model (see model.named_modules())"
    )


def _resolve_layer(model: nn.Module, target_layer: Union[nn.Module, str]) -> tuple[str, nn.Module]:
    if isinstance(target_layer, nn.Module):
        name = module_name(model, target_layer)
        module = target_layer
    else:
        modules = dict(model.named_modules())
        if target_layer not in modules:
            names = [n for n in modules if n]
            close = difflib.get_close_matches(target_layer, names, n=5, cutoff=0.5) or names[-5:]
            raise ValueError(
                f"layer {target_layer!r} not found in the {type(model).__name__} model; "
                f"close names: {', '.join(close)} (see model.named_modules())"
            )
        name, module = target_layer, modules[target_layer]
    if not name:
        raise ValueError("the target layer must be a submodule of the model, not the model itself")
    return name, module


# ----------------------------------------------------------------------------------- fx split


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """timm's registered no-trace modules and functions (what its own fx feature extractor uses)."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


class _CutTracer(fx.Tracer):
    """Keeps the target modules (and timm's no-trace modules) as single call_module nodes."""

    def __init__(self, targets: Collection[str], extra_leaves: tuple[type, ...],
                 autowrap_functions: tuple[Callable, ...]):
        super().__init__(autowrap_functions=autowrap_functions)
        self.targets = frozenset(targets)
        self.extra_leaves = extra_leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.targets:
            return True
        if any(t.startswith(module_qualified_name + ".") for t in self.targets):
            return False  # an ancestor of a target must be traced through, or the cut vanishes
        return isinstance(m, self.extra_leaves) or super().is_leaf_module(m, module_qualified_name)


def _trace(root: nn.Module, targets: Collection[str]) -> fx.Graph:
    """``root``'s graph with ``targets`` kept whole; raises _NotTraceable with the reason."""
    leaves, functions = _timm_notrace()
    try:
        return _CutTracer(targets, leaves, functions).trace(root)
    except Exception as err:  # fx raises many types for untraceable Python (TraceError, TypeError, ...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if "not installed as a submodule" in reason:  # fx's wording for a module held outside the model
            reason = "the model calls a module that is not one of its submodules"
        raise _NotTraceable(f"{type(err).__name__}: {reason}") from err


# Metadata reads: recomputed in the head (from a held tensor) so that sizes follow the head's batch.
_META_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda"}
_META_METHODS = {"size", "dim"}


def _is_metadata(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _META_ATTRS
    return node.op == "call_method" and node.target in _META_METHODS


def _data_dependent(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on the input's data (metadata reads such as ``x.shape`` do not)."""
    dependent: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or (not _is_metadata(node) and any(i in dependent for i in node.all_input_nodes)):
            dependent.add(node)
    return dependent


def _held_values(graph: fx.Graph, cut: fx.Node) -> list[fx.Node]:
    """The values the head needs that the trunk computes (in graph order), for a cut at ``cut``.

    The head recomputes whatever it uses that does not depend on the input's data (parameters,
    constants, shape reads): those are cheap and must see the head's batch. Anything else it uses
    from before the cut is computed once by the trunk and held.
    """
    before_cut = _data_dependent(graph) - descendants(cut)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    used = ancestors([output], stop=before_cut | {cut})
    return [node for node in graph.nodes if node in used and node in before_cut]


def expand_held(held: tuple[Any, ...], n: int) -> tuple[Any, ...]:
    """Repeat batched held tensors (batch B) to the head's batch N = B*M, image-major."""
    out = []
    for h in held:
        if isinstance(h, Tensor) and h.dim() > 0 and h.shape[0] != n:
            b = h.shape[0]
            if n % b:
                raise ValueError(
                    f"head got {n} activation rows but held tensors have batch {b}; the activation "
                    "batch must be a multiple M of B, rows b*M..(b+1)*M-1 belonging to image b"
                )
            h = h.repeat_interleave(n // b, dim=0)
        out.append(h)
    return tuple(out)


class _GraphTrunk(nn.Module):
    """The model's forward pass as one graph that also returns every cut's activation and held values."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__()
        self.graph_module = graph_module

    def forward(self, x: Tensor) -> tuple[Any, tuple[TrunkOutput, ...]]:
        outputs, cuts = self.graph_module(x)
        return outputs, tuple(TrunkOutput(activation, tuple(held)) for activation, held in cuts)


class _GraphHead(nn.Module):
    def __init__(self, graph_module: fx.GraphModule, n_held: int):
        super().__init__()
        self.graph_module = graph_module
        self.n_held = n_held

    def forward(self, activation: Tensor, *held: Any) -> Any:
        if len(held) != self.n_held:
            raise TypeError(f"head expects the activation and {self.n_held} held values, got {len(held)}")
        return self.graph_module(activation, *expand_held(held, activation.shape[0]))


class _NotTraceable(Exception):
    """Why the fx split is not possible; the hook path is used instead."""


def _fx_cuts(model: nn.Module, names: list[str]) -> tuple[list[SplitModel], Callable]:
    """The heads of the fx split at every layer and the one-pass trunk; raises _NotTraceable
    (with the reason) when the hook path must be used instead."""
    graph = _trace(model, names)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    cuts = []
    for name in names:
        nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
        if len(nodes) != 1:
            raise _NotTraceable(f"the target layer {name!r} appears {len(nodes)} times in the traced graph, not once")
        cuts.append((nodes[0], _held_values(graph, nodes[0])))
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    taps = tuple((_snapshot_node(graph, cut), tuple(_snapshot_node(graph, h) for h in held)) for cut, held in cuts)
    trunk = _GraphTrunk(extract(model, graph, placeholders, (output.args[0], taps), keep_defaults=True))
    splits = []
    for index, (name, (cut, held)) in enumerate(zip(names, cuts)):
        head = extract(model, graph, [cut, *held], output.args[0])
        if any(n.op == "call_module" and n.target in names for n in head.graph.nodes):
            # another target layer runs after this cut: trace through it, so the head's graph is whole
            head = fx.GraphModule(head, _trace(head, ()))
        protect_inputs(head, model)
        splits.append(SplitModel(_LayerTrunk(trunk, index), _GraphHead(head, len(held)), name, head))
    return splits, trunk


def _snapshot(value: Any) -> Any:
    return value.clone() if isinstance(value, Tensor) else value


def _snapshot_node(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """A copy of ``node``'s value taken as soon as it is computed: the pass goes on past the cut,
    and an in-place op there (densenet's relu after ``features``) would overwrite what the trunk
    returns."""
    with graph.inserting_after(node):
        return graph.call_function(_snapshot, (node,))


class _LayerTrunk(nn.Module):
    """One layer's part of a trunk pass: ``trunk(x) -> TrunkOutput``."""

    def __init__(self, trunk: Callable, index: int):
        super().__init__()
        self.trunk, self.index = trunk, index

    def forward(self, x: Tensor) -> TrunkOutput:
        return self.trunk(x)[1][self.index]


# ------------------------------------------------------------------------------ hook fallback


class _CutReached(Exception):
    """Raised by the capture hooks to stop the forward pass once every target output is known."""


class _HookTrunk(nn.Module):
    """Runs the model once and captures each target module's first output.

    With ``stop`` the pass ends as soon as every target has returned (its output is then None);
    otherwise it runs to the end and returns the model's output. With ``hold_input`` the input is
    each cut's only held value, for the hook heads.
    """

    def __init__(self, model: nn.Module, targets: dict[str, nn.Module], stop: bool, hold_input: bool):
        super().__init__()
        self.model, self.targets, self.stop, self.hold_input = model, targets, stop, hold_input

    def forward(self, x: Tensor) -> tuple[Any, tuple[TrunkOutput, ...]]:
        captured: dict[str, Tensor] = {}

        def capture(name: str) -> Callable:
            def hook(module, inputs, output):
                if name not in captured:  # a copy: the pass goes on, and may work in place after the cut
                    captured[name] = tree_map(_snapshot, output)
                if self.stop and len(captured) == len(self.targets):
                    raise _CutReached
            return hook

        handles = [module.register_forward_hook(capture(name)) for name, module in self.targets.items()]
        outputs = None
        try:
            outputs = self.model(x)
        except _CutReached:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in self.targets if name not in captured]
        if missing:
            raise RuntimeError(f"the target layer {missing[0]!r} was not called by the model's forward pass")
        held = (x,) if self.hold_input else ()
        return outputs, tuple(TrunkOutput(captured[name], held) for name in self.targets)


class _HookHead(nn.Module):
    """Reruns the whole model on the (repeated) input, replacing the target's first output."""

    def __init__(self, model: nn.Module, target: nn.Module):
        super().__init__()
        self.model, self.target = model, target

    def forward(self, activation: Tensor, x: Tensor) -> Any:
        (x,) = expand_held((x,), activation.shape[0])
        calls = []

        def replace(module, inputs, output):
            calls.append(None)
            # clone: the layers after the cut may work in place
            return activation.clone() if len(calls) == 1 else output

        handle = self.target.register_forward_hook(replace)
        try:
            return self.model(x)
        finally:
            handle.remove()


# ------------------------------------------------------------------------------------ public


class ModelCuts:
    """A model cut at its target layers, whose trunk runs once for all of them.

    ``splits[i]`` is the cut at the i-th layer (its head, and its graph for the fast-path proofs);
    :meth:`run` makes one forward pass of a batch and returns the model's output and every
    layer's activation and held values.
    """

    def __init__(self, splits: list[SplitModel], trunk: Callable[[Tensor], tuple[Any, tuple[TrunkOutput, ...]]]):
        self.splits = tuple(splits)
        self._trunk = trunk

    def run(self, x: Tensor) -> Prepared:
        """One forward pass of ``x`` (under the caller's autograd and module modes)."""
        start = time.perf_counter()
        outputs, trunks = self._trunk(x)
        if outputs is None:  # the pass stopped at the last cut: the first head gives the output
            outputs = self.splits[0].head(trunks[0].activation, *trunks[0].held)
        layers = tuple(LayerActivation(split.layer_name, trunk.activation, trunk.held, split.head)
                       for split, trunk in zip(self.splits, trunks))
        return Prepared(x, outputs, layers, time.perf_counter() - start, torch.is_grad_enabled())


def cut_model(
    model: nn.Module,
    target_layers: Sequence[Union[nn.Module, str]],
    head: Optional[Union[nn.Module, Callable[..., Tensor]]] = None,
) -> ModelCuts:
    """Cut ``model`` at each of ``target_layers``, with one trunk pass for all of them.

    The model is used as is: trunk and heads share its parameters and its train/eval mode, so put
    it in eval mode first (a warning is emitted otherwise).

    Args:
        model: the network; its forward takes one input batch.
        target_layers: submodules of ``model`` or their qualified names (``"layer4"``, ``"features.29"``).
        head: optional callable mapping the (first) target activation to the output. When given,
            the trunk only captures the target outputs (``held == ()``) and this head is used as is.

    Returns:
        ModelCuts. With fx, the trunk is one graph of the whole model that also returns every
        cut's activation and held values, and each head is a graph (``graph_module``). If fx cannot
        trace the model, a target is called more than once, or one target lies inside another, a
        warning is emitted and the hook path is used: one pass of the model captures each target's
        first output, and each head reruns the model with that output replaced (same values,
        slower).

    Raises:
        ValueError: a layer name is unknown, a module is not part of ``model``, or it is the model itself.
    """
    pairs = [_resolve_layer(model, layer) for layer in target_layers]
    names = [name for name, _ in pairs]
    resolved = dict(pairs)  # the distinct layers, in order
    if model.training:
        warnings.warn(
            "split_model: the model is in training mode; call model.eval() first, or batch norm and "
            "dropout make the head's output differ from the model's",
            stacklevel=3,
        )
    if head is not None:
        trunk = _HookTrunk(model, resolved, stop=True, hold_input=False)
        return ModelCuts([SplitModel(_LayerTrunk(trunk, list(resolved).index(name)), head, name, None)
                          for name in names], trunk)
    try:
        nested = [a for a in resolved for b in resolved if b.startswith(a + ".")]
        if nested:
            raise _NotTraceable(f"the target layer {nested[0]!r} holds another target layer")
        splits, trunk = _fx_cuts(model, list(resolved))
        by_name = {split.layer_name: split for split in splits}
        return ModelCuts([by_name[name] for name in names], _Reordered(trunk, list(resolved), names))
    except _NotTraceable as reason:
        where = ", ".join(map(repr, resolved))
        warnings.warn(
            f"split_model: torch.fx could not trace {type(model).__name__} at {where} ({reason}); "
            "using the slower hook path, whose head reruns the whole model on every call",
            stacklevel=3,
        )
    trunk = _HookTrunk(model, resolved, stop=False, hold_input=True)
    order = list(resolved)
    return ModelCuts([SplitModel(_LayerTrunk(trunk, order.index(name)), _HookHead(model, resolved[name]), name, None)
                      for name in names], _Reordered(trunk, order, names))


class _Reordered(nn.Module):
    """A trunk over distinct layers, answering for the target layers as given (repeats included)."""

    def __init__(self, trunk: Callable, distinct: list[str], names: list[str]):
        super().__init__()
        self.trunk, self.index = trunk, [distinct.index(name) for name in names]

    def forward(self, x: Tensor) -> tuple[Any, tuple[TrunkOutput, ...]]:
        outputs, trunks = self.trunk(x)
        return outputs, tuple(trunks[i] for i in self.index)


def split_model(
    model: nn.Module,
    target_layer: Union[nn.Module, str],
    head: Optional[Union[nn.Module, Callable[..., Tensor]]] = None,
) -> SplitModel:
    """Cut ``model`` at ``target_layer`` (see :func:`cut_model`): then
    ``head(out.activation, *out.held)`` with ``out = trunk(x)`` equals ``model(x)``.

    Raises:
        ValueError: the layer name is unknown, the module is not part of ``model``, or it is the
            model itself.
    """
    return cut_model(model, [target_layer], head).splits[0]
