"""Split a model at a target module into a trunk (input -> activation) and a head (activation -> output).

Shap-CAM evaluates the head on many masked copies of the target activation, so the head must be
cheap to call on its own. The split is done on a torch.fx graph of the model: the trunk graph
computes everything up to the target module, the head graph everything that depends on its output.
Values computed before the cut that the head still needs (residual skip inputs, for example) are
returned by the trunk as ``held`` tensors and passed to the head unchanged.

When fx cannot trace the model, or the target module is called more than once, a hook-based
split is used instead: correct, but the head reruns the whole model on every call.
"""
from __future__ import annotations

import difflib
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from shapcam_ext.fxutils import ancestors, descendants, extract, mutates_first_arg

__all__ = ["LayerInput", "SplitModel", "TrunkOutput", "expand_held", "split_model", "module_name"]


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
        trunk: ``trunk(x) -> TrunkOutput``; runs the model once up to the cut.
        head: ``head(activation, *held) -> output``. ``activation`` may hold N = B*M rows for held
            values of batch B (image-major: rows b*M .. (b+1)*M-1 belong to image b); held tensors
            are then repeated to N with ``repeat_interleave``. The head never modifies its inputs.
        layer_name: qualified name of the target module inside the model.
        traced: True when trunk and head are fx graphs, False for the hook fallback or a user head.
        graph_module: the head's fx GraphModule (placeholders: activation, *held) when traced.
    """

    trunk: Callable[[Tensor], TrunkOutput]
    head: Callable[..., Tensor]
    layer_name: str
    traced: bool
    graph_module: Optional[fx.GraphModule]


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


_COMPILED_PREFIX = "_orig_mod."


def _uncompiled(model: nn.Module, target_layer: Union[nn.Module, str]) -> tuple[nn.Module, Union[nn.Module, str]]:
    """A ``torch.compile``d model is split at the module it wraps (``_orig_mod``): fx traces that,
    and its layer names are the ones the user wrote (``"layer4"``; ``"_orig_mod.layer4"``, the
    compiled model's own name for it, works too). Other models come back as they are."""
    # A compiled model has imported dynamo; importing it only to check would cost seconds.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is None or not isinstance(model, eval_frame.OptimizedModule):
        return model, target_layer
    if isinstance(target_layer, str) and target_layer.startswith(_COMPILED_PREFIX):
        target_layer = target_layer[len(_COMPILED_PREFIX):]
    return model._orig_mod, target_layer


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
    """Keeps the target module (and timm's no-trace modules) as single call_module nodes.

    The graph is the modules' own computation. fx calls a module it traces through with
    ``Module.__call__``, which would also run the hooks other code keeps on the model (a live
    GradCAM's call ``register_hook`` on the proxies, which breaks the trace, and would record
    them as its activations); this tracer calls their ``forward`` instead, as fx already does for
    the root, and leaves the hooks registered. Leaf modules are called by the extracted graphs,
    hooks included, as the model calls them.

    A root that defines ``__call__`` instead of ``forward`` (pytorch-grad-cam's embeddings
    tutorial) is traced through its ``__call__``.
    """

    def __init__(self, target: str, extra_leaves: tuple[type, ...], autowrap_functions: tuple[Callable, ...]):
        super().__init__(autowrap_functions=autowrap_functions)
        self.target = target
        self.extra_leaves = extra_leaves

    def trace(self, root: nn.Module, concrete_args: Optional[dict[str, Any]] = None) -> fx.Graph:
        self.traced_func_name = "__call__" if type(root).__call__ is not nn.Module.__call__ else "forward"
        return super().trace(root, concrete_args)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        return super().call_module(m, m.forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name == self.target:
            return True
        if self.target.startswith(module_qualified_name + "."):
            return False  # an ancestor of the target must be traced through, or the cut vanishes
        return isinstance(m, self.extra_leaves) or super().is_leaf_module(m, module_qualified_name)


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


def _protect_inputs(head: fx.GraphModule, root: nn.Module) -> None:
    """Clone placeholders that an in-place op would overwrite (e.g. densenet's F.relu(inplace=True)
    right after ``features``), so the caller's activation and held tensors stay intact."""
    graph = head.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    for ph in placeholders:
        if any(u.args and u.args[0] is ph and mutates_first_arg(u, root) for u in ph.users):
            with graph.inserting_before(first_op):
                copy = graph.call_method("clone", (ph,))
            ph.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
    head.recompile()


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
    def __init__(self, graph_module: fx.GraphModule):
        super().__init__()
        self.graph_module = graph_module

    def forward(self, x: Tensor) -> TrunkOutput:
        activation, *held = self.graph_module(x)
        return TrunkOutput(activation, tuple(held))


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


def _fx_split(model: nn.Module, name: str, at_input: bool) -> SplitModel:
    """fx split at the output of module ``name`` (at its input with ``at_input``); raises
    _NotTraceable (with the reason) when the hook path must be used instead."""
    leaves, functions = _timm_notrace()
    try:
        graph = _CutTracer(name, leaves, functions).trace(model)
    except Exception as err:  # fx raises many types for untraceable Python (TraceError, TypeError, ...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if "not installed as a submodule" in reason:  # fx's wording for a module held outside the model
            reason = "the model calls a module that is not one of its submodules"
        raise _NotTraceable(f"{type(err).__name__}: {reason}") from err
    cuts = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if len(cuts) != 1:
        raise _NotTraceable(f"the target layer {name!r} appears {len(cuts)} times in the traced graph, not once")
    cut = cuts[0]
    if at_input:
        if len(cut.args) != 1 or cut.kwargs or not isinstance(cut.args[0], fx.Node):
            raise _NotTraceable(f"the target layer {name!r} is not called on one tensor, whose positions could be players")
        cut = cut.args[0]
    held = _held_values(graph, cut)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    trunk_gm = extract(model, graph, placeholders, (cut, *held), keep_defaults=True)
    head_gm = extract(model, graph, [cut, *held], output.args[0])
    _protect_inputs(head_gm, model)
    return SplitModel(_GraphTrunk(trunk_gm), _GraphHead(head_gm, len(held)), name, True, head_gm)


# ------------------------------------------------------------------------------ hook fallback


class _CutReached(Exception):
    """Raised by the capture hook to stop the forward pass once the target output is known."""


def _cut_hook(target: nn.Module, at_input: bool, hook: Callable) -> Any:
    """Registers ``hook(module, args, output=None)`` where the cut is: before the target runs
    (``at_input``; a value it returns replaces the arguments) or after (it replaces the output)."""
    return target.register_forward_pre_hook(hook) if at_input else target.register_forward_hook(hook)


class _HookTrunk(nn.Module):
    """Runs the model until the target module's first call returns and captures its output
    (with ``at_input``: until that call starts, capturing its first argument).

    With ``hold_input`` the input is returned as the only held value, for the hook head.
    """

    def __init__(self, model: nn.Module, target: nn.Module, name: str, hold_input: bool, at_input: bool):
        super().__init__()
        self.model, self.target, self.name, self.hold_input, self.at_input = model, target, name, hold_input, at_input

    def forward(self, x: Tensor) -> TrunkOutput:
        captured = []

        def capture(module, args, output=None):
            captured.append(args[0] if self.at_input else output)
            raise _CutReached

        handle = _cut_hook(self.target, self.at_input, capture)
        try:
            self.model(x)
        except _CutReached:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"the target layer {self.name!r} was not called by the model's forward pass")
        return TrunkOutput(captured[0], (x,) if self.hold_input else ())


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
            value = tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, activation)
            return (value, *args[1:]) if self.at_input else value

        handle = _cut_hook(self.target, self.at_input, replace)
        try:
            return self.model(x)
        finally:
            handle.remove()


# ------------------------------------------------------------------------------------ public


def split_model(
    model: nn.Module,
    target_layer: Union[nn.Module, str, LayerInput],
    head: Optional[Union[nn.Module, Callable[..., Tensor]]] = None,
) -> SplitModel:
    """Cut ``model`` at ``target_layer``.

    The model is used as is: trunk and head share its parameters and its train/eval mode, so put
    it in eval mode first (a warning is emitted otherwise); then
    ``head(out.activation, *out.held)`` with ``out = trunk(x)`` equals ``model(x)``.

    Args:
        model: the network; its forward (or its ``__call__``, when it defines that instead) takes
            one input batch. A ``torch.compile``d model is split at the module it wraps.
        target_layer: a submodule of ``model`` or its qualified name (``"layer4"``, ``"features.29"``),
            cut at its output; or :class:`LayerInput` of one, cut at its input.
        head: optional callable mapping the target activation to the output. When given, the trunk
            only captures the target output (``held == ()``) and this head is used as is.

    Returns:
        A SplitModel. With fx, trunk and head are graphs and ``traced`` is True. If fx cannot trace
        the model or the target is called more than once, a warning is emitted and the hook path is
        used: the trunk stops the model at the target's first call and holds the input, the head
        reruns the model with that output replaced (same values, slower); ``traced`` is False.

    Raises:
        ValueError: the layer name is unknown, the module is not part of ``model``, or it is the
            model itself.
    """
    at_input = isinstance(target_layer, LayerInput)
    model, layer = _uncompiled(model, target_layer.layer if at_input else target_layer)
    name, module = _resolve_layer(model, layer)
    if model.training:
        warnings.warn(
            "split_model: the model is in training mode; call model.eval() first, or batch norm and "
            "dropout make the head's output differ from the model's",
            stacklevel=2,
        )
    if head is not None:
        return SplitModel(_HookTrunk(model, module, name, False, at_input), head, name, False, None)
    try:
        return _fx_split(model, name, at_input)
    except _NotTraceable as reason:
        warnings.warn(
            f"split_model: torch.fx could not trace {type(model).__name__} at {name!r} ({reason}); "
            "using the slower hook path, whose head reruns the whole model on every call",
            stacklevel=2,
        )
        return SplitModel(_HookTrunk(model, module, name, True, at_input), _HookHead(model, module, at_input),
                          name, False, None)
