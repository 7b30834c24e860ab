"""Proving, from the head's fx graph, that the output reads the tokens only through the attention
of a few query tokens that are never players (a ViT's class token).

A ViT cut at a block's ``norm1`` (timm: ``x = x + ls1(attn(norm1(x))); x = x + ls2(mlp(norm2(x)))``,
then the final norm, the class token and the classifier) qualifies when its (B, N, C) activation
reaches the output only through:

* token-wise ops: each token's value depends on that token's values alone (Linear and LayerNorm
  over the features, elementwise ops with parameters or with held per-token tensors such as the
  block input, and the reshapes, permutes, transposes and unbinds that move features and heads
  around the image and token dims without touching them);
* one ``scaled_dot_product_attention`` without a mask, dropout or grouped keys: the only op that
  mixes tokens;
* selections of single tokens, ``x[:, i]`` (the class token; DeiT's distillation token), after
  which anything may follow (the tail: the classifier) that reads only selected tokens.

Then only the selected tokens' attention outputs matter; each player changes only its own token's
key and value, and :mod:`.token_attention` walks exactly that. Whatever is not recognised is "not
proven", and the engine keeps the generic path; leaf modules are matched by exact type (through
:mod:`.pattern`'s rules).
"""
from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from shapcam_ext.fxutils import ancestors, descendants, extract, protect_inputs
from shapcam_ext.paths.pattern import NHWC, NotProven, _describe, _functions, _rule, _static_nodes

NO_ATTENTION = "no attention reads the activation"
_ATTENTION_FUNCTIONS = _functions("scaled_dot_product_attention")
_ATTENTION_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_RESHAPES = frozenset(("reshape", "view"))


@dataclass(frozen=True)
class Layout:
    """Where a token-wise value keeps the images (dim ``batch``) and the tokens (dim ``token``)
    among its ``ndim`` dims; every other dim holds one token's features (or attention heads)."""

    ndim: int
    batch: int
    token: int


ACTIVATION = Layout(3, 0, 1)  # (B, N, C): the target layer's output, checked at run time


@dataclass(frozen=True)
class ClassTokenPattern:
    """A head proven to read its (B, N, C) activation only through the attention of the tokens
    ``selected``, which the runtime check makes sure are no player's.

    queries: ``queries(activation, *held[queries_held]) -> (q, k, v)``, the attention's inputs for
        every token, (B, *heads, N, d).
    rest: ``rest(tokens, attention, *held[rest_held]) -> output``: the head after the attention on the
        selected tokens only: ``tokens`` (rows, S, C) the activation's selected tokens,
        ``attention`` (rows, *heads, S, d) their attention outputs, the held values sliced to them.
    selected: the token indices the head reads after the attention, in the order ``rest`` takes them.
    token_held: indices of the held values read token-wise: (B, N, ...) per token at run time.
    fixed: (held index, value the walk needs, what it is) for the attention's mask and causal flag
        when they are held values: a mask or a causal attention is not walked.
    scale: the attention's scale; None for its default, 1 / sqrt(d).
    """

    queries: fx.GraphModule
    rest: fx.GraphModule
    queries_held: tuple[int, ...]
    rest_held: tuple[int, ...]
    selected: tuple[int, ...]
    token_held: frozenset[int]
    fixed: tuple[tuple[int, object, str], ...]
    scale: Optional[float]


def class_token_pattern(gm: fx.GraphModule) -> ClassTokenPattern:
    """The head's class-token pattern; raises NotProven (NO_ATTENTION when nothing attends)."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    act = placeholders[0]
    reads_act = descendants(act)
    if not any(_is_attention(node) for node in reads_act):
        raise NotProven(NO_ATTENTION)
    analysis = _Analysis(gm, act, placeholders[1:], _static_nodes(graph))
    for node in graph.nodes:
        if node in reads_act and node is not act:
            analysis.visit(node, reads_act)
    attention = analysis.attention
    if attention is None:
        raise NotProven("the attention reads only selected tokens")
    held = placeholders[1:]

    def held_read(outputs, stop) -> tuple[int, ...]:
        needed = ancestors(outputs, stop=stop)
        return tuple(i for i, node in enumerate(held) if node in needed)

    q, k, v = (analysis.bound[name] for name in ("query", "key", "value"))
    queries_held = held_read([q, k, v], {act})
    queries = extract(gm, graph, [act, *(held[i] for i in queries_held)], (q, k, v))
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    outputs: list[fx.Node] = []
    fx.map_arg(output.args[0], outputs.append)
    rest_held = held_read(outputs, {act, attention})
    rest = extract(gm, graph, [act, attention, *(held[i] for i in rest_held)], output.args[0])
    selected = tuple(dict.fromkeys(analysis.selections.values()))
    for node in rest.graph.nodes:  # the rest sees only the selected tokens, in that order
        if node.name in analysis.selections:
            node.args = (node.args[0], (slice(None), selected.index(analysis.selections[node.name])))
    return ClassTokenPattern(
        queries=protect_inputs(queries, gm), rest=protect_inputs(rest, gm), queries_held=queries_held,
        rest_held=rest_held, selected=selected, token_held=frozenset(analysis.token_held),
        fixed=tuple(analysis.fixed), scale=analysis.scale)


def _is_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _ATTENTION_FUNCTIONS


class _Analysis:
    """Follows the activation through the graph, in graph order: the layout of every token-wise
    value, the size reads, the one attention, the selected tokens and the tail after them."""

    def __init__(self, gm: fx.GraphModule, act: fx.Node, held: list[fx.Node], static: set[fx.Node]):
        self.gm, self.held, self.static = gm, held, static
        self.layouts: dict[fx.Node, Layout] = {act: ACTIVATION}
        self.unbound: dict[fx.Node, Layout] = {}  # unbind results: the layout of each element
        self.shapes: dict[fx.Node, Layout] = {}  # x.shape of a token-wise x
        self.sizes: dict[fx.Node, str] = {}  # size reads: "batch" or "token"
        self.tail: set[fx.Node] = set()
        self.selections: dict[str, int] = {}  # selection node's name -> token index
        self.token_held: set[int] = set()
        self.fixed: list[tuple[int, object, str]] = []
        self.attention: Optional[fx.Node] = None
        self.bound: dict[str, object] = {}
        self.scale: Optional[float] = None

    def visit(self, node: fx.Node, reads_act: set[fx.Node]) -> None:
        inputs = [i for i in node.all_input_nodes if i in reads_act]
        if node.op == "output":
            if any(i not in self.tail for i in inputs):
                raise NotProven("the output holds values of every token, not of selected tokens (a pool over "
                                "the tokens, or the tokens themselves)")
            return
        if inputs and all(i in self.tail for i in inputs):
            self._tail(node)
        elif any(i in self.tail for i in inputs):
            raise NotProven(f"{node.name} combines a selected token with the values of every token")
        elif self._size_read(node):
            pass
        elif _is_attention(node):
            self._attention(node)
        elif (index := self._selection(node)) is not None:
            self.tail.add(node)
            self.selections[node.name] = index
        elif (layout := self._token_wise(node)) is not None:
            self.layouts[node] = layout

    # ---------------------------------------------------------------------------- pieces

    def _tail(self, node: fx.Node) -> None:
        for value in node.all_input_nodes:
            if value not in self.tail and value not in self.static:
                raise NotProven(f"{node.name}, after the selected tokens, reads {value.name}, which is neither "
                                "computed from them nor a parameter")
        self.tail.add(node)

    def _size_read(self, node: fx.Node) -> bool:
        """Records x.shape, x.shape[d] and x.size(d) of token-wise values; refuses other metadata."""
        if node.op == "call_function" and node.target is getattr and node.args[0] in self.layouts:
            if node.args[1] != "shape":
                raise NotProven(f"{node.name} reads {node.args[1]!r} of a token-wise value")
            self.shapes[node] = self.layouts[node.args[0]]
            return True
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in self.shapes:
            self.sizes[node] = self._role(self.shapes[node.args[0]], node.args[1], node)
            return True
        if node.op == "call_method" and node.target == "size" and node.args[0] in self.layouts:
            if len(node.args) != 2 or node.kwargs:
                raise NotProven(f"{node.name} reads every size of a token-wise value")
            self.sizes[node] = self._role(self.layouts[node.args[0]], node.args[1], node)
            return True
        return False

    @staticmethod
    def _role(layout: Layout, dim, node: fx.Node) -> str:
        if isinstance(dim, int) and dim % layout.ndim == layout.batch:
            return "batch"
        if isinstance(dim, int) and dim % layout.ndim == layout.token:
            return "token"
        raise NotProven(f"{node.name} reads a feature size of a token-wise value")

    def _attention(self, node: fx.Node) -> None:
        if self.attention is not None:
            raise NotProven(f"{node.name}, a second attention, mixes the tokens again after {self.attention.name}")
        bound = dict(zip(_ATTENTION_ARGUMENTS, node.args))
        bound.update(node.kwargs)
        inputs = [bound.get(name) for name in ("query", "key", "value")]
        layouts = {self.layouts.get(value) for value in inputs}
        layout = layouts.pop()
        if layouts or layout is None or layout.batch != 0 or layout.token != layout.ndim - 2:
            raise NotProven(f"{node.name} attends over values that are not (B, heads, tokens, d) of the activation")
        if bound.get("dropout_p", 0.0) != 0 or bound.get("enable_gqa", False) is not False:
            raise NotProven(f"{node.name} drops attention weights or groups its keys")
        for name, needed in (("attn_mask", None), ("is_causal", False)):
            value = bound.get(name, needed)
            if isinstance(value, fx.Node) and value in self.held:
                self.fixed.append((self.held.index(value), needed, name))
            elif value is not needed:
                raise NotProven(f"{node.name} has an attention {name}")
        scale = bound.get("scale")
        if scale is not None and not isinstance(scale, numbers.Real):
            raise NotProven(f"{node.name} has a computed scale")
        self.attention, self.bound, self.scale = node, bound, scale
        self.layouts[node] = layout

    def _selection(self, node: fx.Node) -> Optional[int]:
        """i for ``x[:, i]`` of an (images, tokens, ...) value x."""
        if node.op != "call_function" or node.target is not operator.getitem:
            return None
        layout = self.layouts.get(node.args[0])
        index = node.args[1]
        if layout is None or (layout.batch, layout.token) != (0, 1) or not isinstance(index, tuple):
            return None
        if len(index) == 2 and index[0] == slice(None) and isinstance(index[1], int):
            return index[1]
        return None

    # ------------------------------------------------------------------------ token-wise ops

    def _token_wise(self, node: fx.Node) -> Optional[Layout]:
        """The layout of ``node``'s value when it is a token-wise op (None for an unbind, whose
        elements have theirs); else NotProven."""
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in self.unbound:
            return self.unbound[node.args[0]]
        method = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
        if node.op in ("call_method", "call_function") and method in ("reshape", "view", "permute", "transpose",
                                                                        "unbind"):
            layout = self._first_input(node)
            if method in _RESHAPES:
                return self._reshape(node, layout)
            if method == "unbind":
                self.unbound[node] = self._unbind(node, layout)
                return None
            return self._move(node, layout, method)
        if node.op == "call_function" and node.target is operator.getitem:
            raise NotProven(f"{node.name} indexes a token-wise value other than by one token, x[:, i]")
        rule = _rule(node, self.gm)
        if rule == "elementwise":
            return self._elementwise(node)
        if rule == NHWC:  # mixes only the last dim: Linear, LayerNorm over the features
            layout = self._first_input(node)
            if layout.ndim - 1 in (layout.batch, layout.token):
                raise NotProven(f"{_describe(node, self.gm)} at {node.name} mixes the tokens or the images")
            for value in node.all_input_nodes[1:]:
                if value not in self.static:
                    raise NotProven(f"{node.name} reads {value.name}, which is not a parameter")
            return layout
        raise NotProven(f"{_describe(node, self.gm)} at {node.name} is not a recognised token-wise op")

    def _first_input(self, node: fx.Node) -> Layout:
        first = node.args[0] if node.args else None
        if first not in self.layouts or any(i not in self.static for i in node.all_input_nodes if i is not first
                                              and i not in self.sizes):
            raise NotProven(f"{node.name} does not read exactly one token-wise value as its first input")
        return self.layouts[first]

    def _reshape(self, node: fx.Node, layout: Layout) -> Layout:
        """A reshape that keeps the image and token dims in front and regroups the features."""
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        if {layout.batch, layout.token} != {0, 1} or len(sizes) < 2 or node.kwargs:
            raise NotProven(f"{node.name} reshapes a value whose images and tokens are not its first dims")
        roles = ["batch" if layout.batch == d else "token" for d in (0, 1)]
        if [self.sizes.get(s) if isinstance(s, fx.Node) else None for s in sizes[:2]] != roles or not all(
                isinstance(s, int) for s in sizes[2:]):
            raise NotProven(f"{node.name} reshapes the image or token dims")
        return Layout(len(sizes), layout.batch, layout.token)

    @staticmethod
    def _unbind(node: fx.Node, layout: Layout) -> Layout:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(dim, int) or dim % layout.ndim in (layout.batch, layout.token):
            raise NotProven(f"{node.name} unbinds the image or token dim")
        dim %= layout.ndim
        return Layout(layout.ndim - 1, layout.batch - (layout.batch > dim), layout.token - (layout.token > dim))

    @staticmethod
    def _move(node: fx.Node, layout: Layout, method: str) -> Layout:
        dims = node.args[1:]
        if method == "permute":
            dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else tuple(dims)
        if node.kwargs or not all(isinstance(d, int) for d in dims) or (method == "transpose" and len(dims) != 2):
            raise NotProven(f"{node.name} moves dims that are not constants")
        order = list(range(layout.ndim))
        if method == "permute":
            order = [d % layout.ndim for d in dims]
            if sorted(order) != list(range(layout.ndim)):
                raise NotProven(f"{node.name} is not a permutation of the dims")
        else:
            a, b = (d % layout.ndim for d in dims)
            order[a], order[b] = order[b], order[a]
        return Layout(layout.ndim, order.index(layout.batch), order.index(layout.token))

    def _elementwise(self, node: fx.Node) -> Layout:
        """Elementwise in token-wise values of one layout, parameters that do not vary along the
        image and token dims, and held values of one value per token."""
        layouts = {self.layouts[i] for i in node.all_input_nodes if i in self.layouts}
        if len(layouts) != 1:
            raise NotProven(f"{node.name} combines token-wise values of different layouts")
        layout = layouts.pop()
        for value in node.all_input_nodes:
            if value in self.layouts:
                continue
            if value in self.held and layout == ACTIVATION:
                self.token_held.add(self.held.index(value))  # the block input: checked per token at run time
            elif value.op == "get_attr" and _constant_per_token(_fetch(self.gm, value.target), layout):
                pass
            else:
                raise NotProven(f"{node.name} reads {value.name}, which may differ between tokens or images in "
                                "a way the walk does not follow")
        return layout


def _fetch(gm: fx.GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _constant_per_token(value, layout: Layout) -> bool:
    """Whether a parameter broadcast against ``layout`` is the same for every image and token."""
    if not isinstance(value, torch.Tensor):
        return False
    shape = (1,) * (layout.ndim - value.dim()) + tuple(value.shape)
    return len(shape) == layout.ndim and shape[layout.batch] == 1 and shape[layout.token] == 1


__all__ = ["ACTIVATION", "ClassTokenPattern", "Layout", "NO_ATTENTION", "class_token_pattern"]
