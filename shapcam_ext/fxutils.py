"""torch.fx graph utilities shared by the model split (head.py) and the fast-path proofs (paths/).

What both need: walking a graph forwards or backwards from some nodes, copying the part of a
graph between given inputs and outputs into a module of its own, reading a call's arguments by
name, and telling which calls write into their input, so that a graph never overwrites a tensor
its caller keeps.
"""
from __future__ import annotations

import inspect
import operator
from typing import Any, Callable, Iterable, Optional

import torch.fx as fx
from torch import nn

__all__ = ["ancestors", "bound_arguments", "descendants", "extract", "mutates_first_arg", "protect_inputs",
           "reachable"]

_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift,
}


def reachable(roots: Iterable[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]],
              stop: Iterable[fx.Node] = ()) -> set[fx.Node]:
    """The roots and every node reached from them by repeated ``step``, not going past ``stop``
    (the stop nodes themselves are included when reached)."""
    stop = set(stop)
    seen, stack = set(roots), list(roots)
    while stack:
        node = stack.pop()
        if node in stop:
            continue
        for other in step(node):
            if other not in seen:
                seen.add(other)
                stack.append(other)
    return seen


def descendants(root: fx.Node) -> set[fx.Node]:
    """``root`` and every node that reads it, directly or not."""
    return reachable([root], lambda node: node.users)


def ancestors(roots: Iterable[fx.Node], stop: Iterable[fx.Node] = ()) -> set[fx.Node]:
    """``roots`` and every node they read, directly or not, not going past ``stop``."""
    return reachable(roots, lambda node: node.all_input_nodes, stop)


def extract(root: nn.Module, graph: fx.Graph, inputs: list[fx.Node], outputs: Any,
            keep_defaults: bool = False) -> fx.GraphModule:
    """The part of ``graph`` that computes ``outputs`` from ``inputs``, as a GraphModule of ``root``.

    Args:
        root: the module owning the graph's parameters and submodules.
        graph: the graph to copy from.
        inputs: nodes that become the new graph's placeholders, in this order (named like them).
        outputs: a node, or a tuple/list/dict structure of nodes, that the new graph returns.
        keep_defaults: placeholders of ``graph`` among the inputs keep their default values
            (timm's ViT has an optional ``attn_mask``), for a graph called like the original.

    Every node between the inputs and the outputs is copied in graph order; the graph's own
    placeholders may only be reached when they are among ``inputs``.

    Raises:
        ValueError: the outputs need a placeholder of ``graph`` that is not an input.
    """
    new = fx.Graph()
    env = {node: new.node_copy(node) if keep_defaults and node.op == "placeholder" else new.placeholder(node.name)
           for node in inputs}
    result_nodes: list[fx.Node] = []
    fx.map_arg(outputs, result_nodes.append)
    needed = ancestors(result_nodes, stop=inputs)
    for node in graph.nodes:
        if node not in needed or node in env:
            continue
        if node.op == "placeholder":
            raise ValueError(f"the extracted graph needs the placeholder {node.name!r}, which is not an input")
        env[node] = new.node_copy(node, env.__getitem__)
    new.output(fx.map_arg(outputs, env.__getitem__))
    return fx.GraphModule(root, new)


def bound_arguments(node: fx.Node) -> Optional[dict]:
    """The call's arguments by parameter name, defaults included; None when the target has no
    Python signature (builtins) or the arguments do not bind to it."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return bound.arguments


def mutates_first_arg(node: fx.Node, root: nn.Module) -> bool:
    """Whether ``node`` may write into its first argument (in-place ops seen in torchvision/timm)."""
    if node.op == "call_module":
        return getattr(root.get_submodule(node.target), "inplace", False) is True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op != "call_function":
        return False
    if node.target in _INPLACE_OPERATORS:
        return True
    name = getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        return True  # torch.relu_, torch.add_ ...
    arguments = bound_arguments(node)
    return (arguments if arguments is not None else node.kwargs).get("inplace") is True


def protect_inputs(module: fx.GraphModule, root: nn.Module) -> fx.GraphModule:
    """Clone the placeholders that an in-place op would overwrite (densenet's F.relu(inplace=True)
    right after ``features``, VGG's ReLU(inplace=True) after its first Linear), so the caller's
    tensors stay intact; returns ``module``, recompiled."""
    graph = module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    for ph in placeholders:
        if any(u.args and u.args[0] is ph and mutates_first_arg(u, root) for u in ph.users):
            with graph.inserting_before(first_op):
                copy = graph.call_method("clone", (ph,))
            ph.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
    module.recompile()
    return module
