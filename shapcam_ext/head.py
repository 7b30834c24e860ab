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
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Collection, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from shapcam_ext.fxutils import ancestors, descendants, extract, protect_inputs

__all__ = ["LayerActivation", "LayerInput", "ModelCuts", "Prepared", "SplitModel", "TrunkOutput", "cut_model",
           "expand_held", "module_name", "split_model"]


@dataclass(frozen=True)
class LayerInput:
    """The input of ``layer`` (a module or its qualified name) as the cut, instead of its output:
    the positions of the tensor the layer is called on are the players (Captum's
    ``attribute_to_layer_input``). The layer must be called on one tensor."""

    layer: Union[nn.Module, str]


@dataclass
class TrunkOutput:
    """What the trunk returns for a batch of B inputs.

    Attributes:
        activation: the target module's output, (B, C, h, w) for CNNs; a dict or tuple of such
            maps for layers that return several (an FPN's levels).
        held: other values alive at the cut that the head needs, in a fixed order; pass them to
            the head unchanged (``head(activation, *held)``). Usually tensors of batch B (skip
            inputs; the input itself on the hook path); non-tensor values (e.g. an attention mask
            of None from timm) are passed through as they are.
    """

    activation: Any
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


@dataclass(frozen=True)
class _Cut:
    """Where a model is cut: after module ``name``, or before it (``at_input``)."""

    name: str
    at_input: bool


_COMPILED_PREFIX = "_orig_mod."


def _uncompiled(model: nn.Module, target_layers: Sequence[Any]) -> tuple[nn.Module, list]:
    """A ``torch.compile``d model is cut in the module it wraps (``_orig_mod``): fx traces that,
    and its layer names are the ones the user wrote (``"layer4"``; ``"_orig_mod.layer4"``, the
    compiled model's own name for it, works too). Other models come back as they are."""
    # A compiled model has imported dynamo; importing it only to check would cost seconds.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is None or not isinstance(model, eval_frame.OptimizedModule):
        return model, list(target_layers)

    def own_name(layer: Any) -> Any:
        if isinstance(layer, LayerInput):
            return LayerInput(own_name(layer.layer))
        if isinstance(layer, str) and layer.startswith(_COMPILED_PREFIX):
            return layer[len(_COMPILED_PREFIX):]
        return layer

    return model._orig_mod, [own_name(layer) for layer in target_layers]


def _resolve_cut(model: nn.Module, target_layer: Union[nn.Module, str, LayerInput]) -> tuple[_Cut, nn.Module]:
    at_input = isinstance(target_layer, LayerInput)
    name, module = _resolve_layer(model, target_layer.layer if at_input else target_layer)
    return _Cut(name, at_input), module


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
    """Keeps the target modules (and timm's no-trace modules) as single call_module nodes.

    The graph is the modules' own computation. fx calls a module it traces through with
    ``Module.__call__``, which would also run the hooks other code keeps on the model (a live
    GradCAM's call ``register_hook`` on the proxies, which breaks the trace, and would record
    them as its activations); this tracer calls their ``forward`` instead, as fx already does for
    the root, and leaves the hooks registered. Leaf modules are called by the extracted graphs,
    hooks included, as the model calls them.

    A root without a ``forward`` of its own that defines ``__call__`` (pytorch-grad-cam's
    embeddings tutorial) is traced through its ``__call__``.
    """

    def __init__(self, targets: Collection[str], extra_leaves: tuple[type, ...],
                 autowrap_functions: tuple[Callable, ...]):
        super().__init__(autowrap_functions=autowrap_functions)
        self.targets = frozenset(targets)
        self.extra_leaves = extra_leaves

    def trace(self, root: nn.Module, concrete_args: Optional[dict[str, Any]] = None) -> fx.Graph:
        own_forward = type(root).forward is not nn.Module.forward
        self.traced_func_name = "forward" if own_forward or type(root).__call__ is nn.Module.__call__ else "__call__"
        return super().trace(root, concrete_args)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        return super().call_module(m, m.forward, args, kwargs)

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


def _rows(activation: Any) -> int:
    """The head's batch: the activation's rows (its first map's, for a structure of maps)."""
    return next(t for t in tree_leaves(activation) if isinstance(t, Tensor)).shape[0]


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

    def forward(self, activation: Any, *held: Any) -> Any:
        if len(held) != self.n_held:
            raise TypeError(f"head expects the activation and {self.n_held} held values, got {len(held)}")
        return self.graph_module(activation, *expand_held(held, _rows(activation)))


class _NotTraceable(Exception):
    """Why the fx split is not possible; the hook path is used instead."""


def _fx_cuts(model: nn.Module, targets: list[_Cut]) -> tuple[list[SplitModel], Callable]:
    """The heads of the fx split at every cut and the one-pass trunk; raises _NotTraceable
    (with the reason) when the hook path must be used instead."""
    names = [target.name for target in targets]
    graph = _trace(model, names)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    cuts = []
    for target in targets:
        nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == target.name]
        if len(nodes) != 1:
            raise _NotTraceable(f"the target layer {target.name!r} appears {len(nodes)} times in the traced graph, "
                                "not once")
        node = nodes[0]
        if target.at_input:
            if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
                raise _NotTraceable(f"the target layer {target.name!r} is not called on one tensor, whose positions "
                                    "could be players")
            node = node.args[0]
        cuts.append((node, _held_values(graph, node)))
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


def _cut_hook(target: nn.Module, at_input: bool, hook: Callable) -> Any:
    """Registers ``hook(module, args, output=None)`` where the cut is: before the target runs
    (``at_input``; a value it returns replaces the arguments) or after (it replaces the output)."""
    return target.register_forward_pre_hook(hook) if at_input else target.register_forward_hook(hook)


class _HookTrunk(nn.Module):
    """Runs the model once and captures each target module's first output (first argument, for
    a cut at its input).

    With ``stop`` the pass ends as soon as every target has returned (its output is then None);
    otherwise it runs to the end and returns the model's output. With ``hold_input`` the input is
    each cut's only held value, for the hook heads.
    """

    def __init__(self, model: nn.Module, targets: dict[_Cut, nn.Module], stop: bool, hold_input: bool):
        super().__init__()
        self.model, self.targets, self.stop, self.hold_input = model, targets, stop, hold_input

    def forward(self, x: Tensor) -> tuple[Any, tuple[TrunkOutput, ...]]:
        captured: dict[_Cut, Any] = {}

        def capture(cut: _Cut) -> Callable:
            def hook(module, args, output=None):
                if cut not in captured:  # a copy: the pass goes on, and may work in place after the cut
                    captured[cut] = tree_map(_snapshot, args[0] if cut.at_input else output)
                if self.stop and len(captured) == len(self.targets):
                    raise _CutReached
            return hook

        handles = [_cut_hook(module, cut.at_input, capture(cut)) for cut, module in self.targets.items()]
        outputs = None
        try:
            outputs = self.model(x)
        except _CutReached:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [cut.name for cut in self.targets if cut not in captured]
        if missing:
            raise RuntimeError(f"the target layer {missing[0]!r} was not called by the model's forward pass")
        held = (x,) if self.hold_input else ()
        return outputs, tuple(TrunkOutput(captured[cut], held) for cut in self.targets)


class _HookHead(nn.Module):
    """Reruns the whole model on the (repeated) input, replacing the target's first output (with
    ``at_input``: the first argument of its first call)."""

    def __init__(self, model: nn.Module, target: nn.Module, at_input: bool):
        super().__init__()
        self.model, self.target, self.at_input = model, target, at_input

    def forward(self, activation: Any, x: Tensor) -> Any:
        (x,) = expand_held((x,), _rows(activation))
        calls = []

        def replace(module, args, output=None):
            calls.append(None)
            if len(calls) > 1:
                return None  # later calls keep their own values
            # clone: the layers after the cut may work in place
            value = tree_map(_snapshot, activation)
            return (value, *args[1:]) if self.at_input else value

        handle = _cut_hook(self.target, self.at_input, replace)
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
    target_layers: Sequence[Union[nn.Module, str, LayerInput]],
    head: Optional[Union[nn.Module, Callable[..., Tensor]]] = None,
) -> ModelCuts:
    """Cut ``model`` at each of ``target_layers``, with one trunk pass for all of them.

    The model is used as is: trunk and heads share its parameters and its train/eval mode, so put
    it in eval mode first (a warning is emitted otherwise).

    Args:
        model: the network; its forward (or its ``__call__``, when it defines that instead) takes
            one input batch. A ``torch.compile``d model is cut in the module it wraps.
        target_layers: submodules of ``model`` or their qualified names (``"layer4"``, ``"features.29"``),
            cut at their output; or :class:`LayerInput` of one, cut at its input.
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
    model, target_layers = _uncompiled(model, target_layers)
    pairs = [_resolve_cut(model, layer) for layer in target_layers]
    cuts = [cut for cut, _ in pairs]
    resolved = dict(pairs)  # the distinct cuts, in order
    if model.training:
        warnings.warn(
            "split_model: the model is in training mode; call model.eval() first, or batch norm and "
            "dropout make the head's output differ from the model's",
            stacklevel=3,
        )
    if head is not None:
        trunk = _HookTrunk(model, resolved, stop=True, hold_input=False)
        return ModelCuts([SplitModel(_LayerTrunk(trunk, list(resolved).index(cut)), head, cut.name, None)
                          for cut in cuts], trunk)
    try:
        nested = [a.name for a in resolved for b in resolved if b.name.startswith(a.name + ".")]
        if nested:
            raise _NotTraceable(f"the target layer {nested[0]!r} holds another target layer")
        splits, trunk = _fx_cuts(model, list(resolved))
        by_cut = dict(zip(resolved, splits))
        return ModelCuts([by_cut[cut] for cut in cuts], _Reordered(trunk, list(resolved), cuts))
    except _NotTraceable as reason:
        where = ", ".join(repr(cut.name) for cut in resolved)
        warnings.warn(
            f"split_model: torch.fx could not trace {type(model).__name__} at {where} ({reason}); "
            "using the slower hook path, whose head reruns the whole model on every call",
            stacklevel=3,
        )
    trunk = _HookTrunk(model, resolved, stop=False, hold_input=True)
    order = list(resolved)
    return ModelCuts([SplitModel(_LayerTrunk(trunk, order.index(cut)), _HookHead(model, resolved[cut], cut.at_input),
                                 cut.name, None)
                      for cut in cuts], _Reordered(trunk, order, cuts))


class _Reordered(nn.Module):
    """A trunk over distinct cuts, answering for the target layers as given (repeats included)."""

    def __init__(self, trunk: Callable, distinct: list[_Cut], cuts: list[_Cut]):
        super().__init__()
        self.trunk, self.index = trunk, [distinct.index(cut) for cut in cuts]

    def forward(self, x: Tensor) -> tuple[Any, tuple[TrunkOutput, ...]]:
        outputs, trunks = self.trunk(x)
        return outputs, tuple(trunks[i] for i in self.index)


def split_model(
    model: nn.Module,
    target_layer: Union[nn.Module, str, LayerInput],
    head: Optional[Union[nn.Module, Callable[..., Tensor]]] = None,
) -> SplitModel:
    """Cut ``model`` at ``target_layer`` (see :func:`cut_model`): then
    ``head(out.activation, *out.held)`` with ``out = trunk(x)`` equals ``model(x)``.

    Raises:
        ValueError: the layer name is unknown, the module is not part of ``model``, or it is the
            model itself.
    """
    return cut_model(model, [target_layer], head).splits[0]
