"""Proving, from the head's fx graph, that an exact shortcut applies.

A head qualifies when it reads the activation only through, in this order:

* the body: position-wise ops, whose output at a position depends only on the input at that
  position (elementwise ops, also with held or constant tensors; 1x1 convolutions; eval-mode
  batch norm; layer norm and Linear over the channels of a channels-last value; permutes
  between the two layouts; reshapes that keep the batch and the channels); before a global
  average pool, also convolutions that mix a bounded neighbourhood (k x k, strided, grouped,
  zero-padded), which the incremental walks of :mod:`shapcam_ext.paths.incremental` follow;
* one pool: a global pool, i.e. a fixed weighting of the positions applied to every channel (an
  average over all of them, over a slice of the tokens, or one token picked: timm's
  ``global_pool='avg'`` and ``'token'``), or a non-overlapping local max/avg pool of at most 4
  cells;
* the front: a chain of flatten, eval-mode dropout, identity, at most one Linear and, after a
  local pool, one adaptive average pool (a fixed linear map);
* the tail: anything that reads only the front's output and parameters.

Positions are the indices of every dimension but the batch and the channels, flattened in
row-major order: the (h, w) of a CNN map (B, C, h, w), the tokens of a transformer's (B, N, C)
or (B, h, w, C). The activation's layout is the one its first reader needs. Sizes are only
known at run time, so what the graph cannot show (that a reshape keeps the channels, that a
mean covers every position) is checked on the recorded values before a walk is built
(:func:`body_positions`, :func:`pool_weights`).

Whatever is not recognised is "not proven", and the engine keeps its generic masked-batch path.
Module types are matched exactly, not by subclass: a subclass may override ``forward``.
"""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from shapcam_ext.fxutils import bound_arguments, descendants, extract, protect_inputs
from shapcam_ext.head import SplitModel

# The two layouts, of any number of position dimensions: channels first (B, C, *positions) and
# channels last (B, *positions, C).
NCHW, NHWC = "nchw", "nhwc"
LOCAL = "local"  # the rule of a convolution that mixes neighbouring positions (NCHW in and out)
RESHAPE = "reshape"  # the rule of a reshape: it keeps the layout (and, checked at run time, the positions)
_CHANNEL_DIM = {NCHW: 1, NHWC: -1}
MAX_WINDOW = 4  # cells of a local-pool window: the walk tabulates all 2**cells window states

_TO_NHWC, _TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)


class NotProven(Exception):
    """Why a head does not match a fast pattern."""


@dataclass(frozen=True)
class LocalBody:
    """A body that mixes neighbouring positions before a global pool.

    convs: names of the body's nodes that are spatial convolutions (k x k or strided; their
        geometry is read from the modules when a walk is planned).
    """

    convs: frozenset[str]


@dataclass(frozen=True)
class HeadPattern:
    """A head proven to have an exact shortcut.

    pool: "global" (a fixed weighting of all positions) or "local" (non-overlapping windows).
    body: ``body(activation, *held) -> g``, the pool's input: a position-wise function of the
        activation (of the held values too).
    layouts: NCHW or NHWC, the layout of every activation-dependent node of the body (the
        activation included), by name.
    pooling: ``pooling(g) -> pooled``, the global pool alone (None for a local pool).
    front: ``front(g) -> front_out``: the pool and the front chain.
    tail: the rest of the head, ``tail(front_out) -> output``; None when ``front_out`` is the output.
    linear: the Linear layer ending the front, whose pre-activations are walked; None if absent.
    local_pool: the MaxPool2d / AvgPool2d module (pool == "local").
    window: (kh, kw) of the local pool's windows.
    adaptive: the adaptive average pool between the local pool and flatten, or None.
    local: the body's spatial convolutions when it mixes positions (pool == "global"), else None.
    """

    pool: str
    body: fx.GraphModule
    layouts: Mapping[str, str]
    pooling: Optional[fx.GraphModule]
    front: fx.GraphModule
    tail: Optional[fx.GraphModule]
    linear: Optional[nn.Linear]
    local_pool: Optional[nn.Module] = None
    window: tuple[int, int] = (1, 1)
    adaptive: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    local: Optional[LocalBody] = None

    @property
    def activation_layout(self) -> str:
        """The layout the body reads the activation in."""
        return self.layouts[next(iter(self.body.graph.nodes)).name]

    @property
    def pooled_layout(self) -> str:
        """The layout of the pool's input, the body's output."""
        return self.layouts[next(n for n in reversed(self.body.graph.nodes) if n.op == "output").args[0].name]


def prove(split: SplitModel, analysis: Optional[Callable[[fx.GraphModule], Any]] = None) -> tuple[Optional[Any], str]:
    """The head's fast pattern by ``analysis`` (a function of the head's graph that raises
    NotProven; by default the pooled heads' proof below), or (None, why it is not proven)."""
    if split.graph_module is None:
        return None, "the head is not an fx graph (hook fallback or a user-supplied head)"
    try:
        return (analysis or _prove)(split.graph_module), ""
    except NotProven as reason:
        return None, str(reason)
    except Exception as err:  # an unforeseen graph: the generic path must still run
        warnings.warn(f"shapcam_ext: the fast-path analysis of the head failed ({type(err).__name__}: {err}); "
                      "using the generic path. Please report the model and layer.", RuntimeWarning, stacklevel=3)
        return None, f"analysis failed: {type(err).__name__}: {err}"


# ---------------------------------------------------------------------------- op tables


def _optional(module: str, names: tuple[str, ...]) -> tuple:
    """Attributes of an optional library (timm, torchvision), skipping what this version lacks."""
    try:
        mod = __import__(module, fromlist=list(names))
    except ImportError:
        return ()
    return tuple(getattr(mod, n) for n in names if hasattr(mod, n))


def _functions(*names: str) -> frozenset:
    """torch's functions of these names, in every namespace fx may record them under."""
    return frozenset(fn for name in names for where in (F, torch, torch._C._nn)
                     if callable(fn := getattr(where, name, None)))


_ELEMENTWISE_MODULES = frozenset((
    nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Sigmoid, nn.Hardsigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Softplus, nn.Hardtanh,
    *_optional("timm.layers.activations", (
        "Swish", "Mish", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "HardMish", "GELU", "GELUTanh", "QuickGELU")),
    *_optional("timm.layers.activations_me", ("SwishMe", "MishMe", "HardSigmoidMe", "HardSwishMe", "HardMishMe")),
))
_DROPOUT_MODULES = frozenset((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                              nn.FeatureAlphaDropout))
_PRELU_MODULES = frozenset((nn.PReLU, *_optional("timm.layers.activations", ("PReLU",))))
_BATCHNORM_MODULES = frozenset((nn.BatchNorm2d, *_optional("torchvision.ops.misc", ("FrozenBatchNorm2d",))))
_BATCHNORM_ACT_MODULES = frozenset(_optional("timm.layers.norm_act", ("BatchNormAct2d", "FrozenBatchNormAct2d")))
_LAYERNORM_NCHW_MODULES = frozenset((*_optional("torchvision.models.convnext", ("LayerNorm2d",)),
                                     *_optional("timm.layers.norm", ("LayerNorm2d",))))
_LAYERNORM_NHWC_MODULES = frozenset((nn.LayerNorm, *_optional("timm.layers.norm", ("LayerNorm",))))
_PERMUTE_MODULES = frozenset(_optional("torchvision.ops.misc", ("Permute",)))
# timm's convolution with TensorFlow's input-dependent "same" padding (Conv2d semantics otherwise).
_SAME_CONV_MODULES = frozenset(_optional("timm.layers.conv2d_same", ("Conv2dSame",)))
_FLATTEN_MODULES = frozenset((nn.Flatten,))

_ELEMENTWISE_FUNCTIONS = _functions(
    "add", "sub", "mul", "div", "neg", "abs", "exp", "square", "sqrt", "clamp", "clip", "maximum", "minimum",
    "relu", "relu_", "relu6", "silu", "gelu", "hardswish", "hardsigmoid", "sigmoid", "tanh", "leaky_relu", "elu",
    "selu", "celu", "mish", "softplus", "hardtanh",
) | {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pos,
     operator.iadd, operator.isub, operator.imul, operator.itruediv}
_ELEMENTWISE_METHODS = frozenset((
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "abs", "exp", "square", "sqrt",
    "clamp", "clamp_", "clip", "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clone", "contiguous",
))
# The identity when called with training=False (how fx records them from an eval-mode model).
_TRAINING_FLAG_FUNCTIONS = frozenset({
    F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout, F.feature_alpha_dropout,
    *_optional("torchvision.ops.stochastic_depth", ("stochastic_depth",)),
    *_optional("timm.layers.drop", ("drop_path",)),
})
_LAYER_NORM_FUNCTIONS = _functions("layer_norm")
_BATCH_NORM_FUNCTIONS = _functions("batch_norm")
_LINEAR_FUNCTIONS = _functions("linear")
_PERMUTE_FUNCTIONS = _functions("permute")
_RESHAPE_FUNCTIONS = _functions("reshape")
_FLATTEN_FUNCTIONS = _functions("flatten")
_MEAN_FUNCTIONS = _functions("mean")
_ADAPTIVE_AVG_FUNCTIONS = _functions("adaptive_avg_pool2d")


# ------------------------------------------------------------------------------- the proof


def _prove(gm: fx.GraphModule) -> HeadPattern:
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    act = placeholders[0]
    reads_act = descendants(act)  # every node the activation reaches, metadata reads included
    layouts = _Layouts(act)  # the body: values that are position-wise (or local) functions of the activation
    convs = set()  # the body's spatial convolutions
    pool = None
    for node in graph.nodes:
        if node not in reads_act or node is act:
            continue
        if node.op == "output":
            raise NotProven("the activation reaches the output without a global or local pool")
        pool = _pool_of(node, gm)
        if pool is not None:
            break
        rule = _rule(node, gm)
        layouts[node] = _body_layout(node, rule, gm, layouts)
        if rule == LOCAL:
            convs.add(node.name)
    if pool is None:
        raise NotProven("the head's output does not depend on the activation")
    pool_input = _single_input(pool.start, layouts)
    layouts.require(pool_input, pool.layout,
                    lambda layout: f"{pool.start.name} pools a {layout} value over {pool.layout} positions")
    for value in layouts:
        for user in value.users:
            if user not in layouts and user is not pool.start:
                raise NotProven(f"{user.name} reads {value.name}, a value before the pool {pool.start.name}, after "
                                "it (a global op such as squeeze-and-excitation mixes every position)")

    if convs and pool.kind != "global":
        raise NotProven(f"{pool.start.name} is a local pool after spatial convolutions ({', '.join(sorted(convs))})")
    end, linear, adaptive = _front_chain(pool, gm)
    if pool.kind == "local" and linear is None:
        raise NotProven(f"{pool.start.name} (a local pool) is not followed by flatten and a Linear layer")

    chain = _chain(pool.start, end)
    static = _static_nodes(graph)
    _check_inputs(chain, pool_input, static)
    tail_nodes = reads_act - set(layouts) - chain
    _check_inputs(tail_nodes, end, static)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    # the walks keep the parts' inputs (the start, the tabulated maps): no part may write into them
    tail = None if output.args[0] is end else protect_inputs(extract(gm, graph, [end], output.args[0]), gm)
    local = gm.get_submodule(pool.start.target) if pool.kind == "local" else None
    return HeadPattern(
        pool=pool.kind, body=protect_inputs(extract(gm, graph, placeholders, pool_input), gm),
        layouts=layouts.resolved(),
        pooling=extract(gm, graph, [pool_input], pool.end) if pool.kind == "global" else None,
        front=protect_inputs(extract(gm, graph, [pool_input], end), gm), tail=tail, linear=linear,
        local_pool=local, window=_pair(local.kernel_size) if local is not None else (1, 1), adaptive=adaptive,
        local=LocalBody(frozenset(convs)) if convs else None,
    )


class _Layouts(dict):
    """The layout of each body value (a node). The activation's is not known until an op reads it,
    or a value computed from it elementwise, in one layout: until then those values are FREE, and
    the first such op fixes it for all of them."""

    FREE = "free"

    def __init__(self, act: fx.Node):
        super().__init__({act: self.FREE})
        self.act = act
        self.bound: Optional[str] = None

    def __getitem__(self, node: fx.Node) -> str:
        layout = super().__getitem__(node)
        return self.bound if layout == self.FREE and self.bound else layout

    def require(self, node: fx.Node, layout: str, why: Callable[[str], str]) -> None:
        """``node``'s value must be in ``layout``; NotProven(why(its layout)) otherwise."""
        current = self[node]
        if current == self.FREE:
            self.bound = layout
        elif current != layout:
            raise NotProven(why(current))

    def common(self, node: fx.Node, inputs: list[fx.Node]) -> str:
        """The one layout of an elementwise op's activation-dependent inputs."""
        kinds = {self[i] for i in inputs}
        fixed = kinds - {self.FREE}
        if len(fixed) > 1:
            raise NotProven(f"{node.name} combines channels-first and channels-last values")
        if not fixed:
            return self.FREE
        layout = fixed.pop()
        if self.FREE in kinds:
            self.bound = layout
        return layout

    def resolved(self) -> dict[str, str]:
        """Every value's layout by name (the pool has fixed the activation's)."""
        return {node.name: self[node] for node in self}


def _check_inputs(nodes: set, source: fx.Node, static: set) -> None:
    """Every input of ``nodes`` must be one of them, ``source`` or a parameter."""
    for node in nodes:
        for value in node.all_input_nodes:
            if value not in nodes and value is not source and value not in static:
                raise NotProven(f"{node.name} reads {value.name}, which is neither {source.name} (or computed from "
                                "it) nor a parameter")


def _static_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes that read no input of the head: parameters, buffers and what is computed from them."""
    static = set()
    for node in graph.nodes:
        if node.op not in ("placeholder", "output") and all(i in static for i in node.all_input_nodes):
            static.add(node)
    return static


def _chain(start: fx.Node, end: fx.Node) -> set[fx.Node]:
    nodes, node = {start}, start
    while node is not end:
        node = next(iter(node.users))
        nodes.add(node)
    return nodes


def _single_input(node: fx.Node, values) -> fx.Node:
    """The one input of ``node`` among ``values``; other inputs must be constants, parameters or held."""
    inputs = [i for i in node.all_input_nodes if i in values]
    if len(inputs) != 1 or node.args[:1] != (inputs[0],):
        raise NotProven(f"{node.name} does not read exactly one activation-dependent value as its first input")
    return inputs[0]


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _is_identity(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Identity, eval-mode dropout or stochastic depth, and copies."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return type(module) is nn.Identity or (type(module) in _DROPOUT_MODULES and not module.training)
    if node.op == "call_function" and node.target in _TRAINING_FLAG_FUNCTIONS:
        arguments = bound_arguments(node)
        return arguments is not None and arguments.get("training") is False
    return node.op == "call_method" and node.target in ("clone", "contiguous")


# ------------------------------------------------------------------------------------ body


def _body_layout(node: fx.Node, rule, gm: fx.GraphModule, layouts: _Layouts) -> str:
    """The layout of ``node``'s value when it is position-wise (or a spatial convolution) in the
    activation; else NotProven. ``rule`` is ``_rule(node, gm)``.

    Every activation-dependent input of ``node`` is already in ``layouts`` (graph order).
    """
    if rule is None:
        raise NotProven(f"{_describe(node, gm)} at {node.name} is not a recognised position-wise op")
    if rule == "elementwise":
        return layouts.common(node, [i for i in node.all_input_nodes if i in layouts])
    source = _single_input(node, layouts)
    if rule == RESHAPE:
        return layouts[source]
    if rule == LOCAL:
        layouts.require(source, NCHW, lambda layout: f"{_describe(node, gm)} at {node.name} convolves a {layout} value")
        return NCHW
    if isinstance(rule, tuple):  # a permute: (from, to)
        layouts.require(source, rule[0], lambda layout: f"{node.name} permutes a {layout} value with {rule[0]} dims")
        return rule[1]
    layouts.require(source, rule, lambda layout: f"{_describe(node, gm)} at {node.name} mixes a non-channel "
                                                 f"dimension of a {layout} value")
    return rule


def _rule(node: fx.Node, gm: fx.GraphModule):
    """How ``node`` treats positions: "elementwise"; NCHW / NHWC (mixes only that layout's channel
    dimension); (from, to) for a permute between the two layouts; RESHAPE; LOCAL for a convolution
    that mixes a bounded neighbourhood; None otherwise."""
    if _is_identity(node, gm):
        return "elementwise"
    if node.op == "call_module":
        return _module_rule(gm.get_submodule(node.target))
    if node.op == "call_method":
        if node.target in _ELEMENTWISE_METHODS:
            return "elementwise"
        if node.target == "permute":
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            return _permute_rule(dims)
        return RESHAPE if node.target in ("reshape", "view") else None
    if node.op != "call_function":
        return None
    if node.target in _ELEMENTWISE_FUNCTIONS:
        return "elementwise"
    if node.target in _PERMUTE_FUNCTIONS:
        return _permute_rule(node.args[1] if len(node.args) > 1 else node.kwargs.get("dims"))
    if node.target in _LINEAR_FUNCTIONS:
        return NHWC
    if node.target in _RESHAPE_FUNCTIONS:
        return RESHAPE
    arguments = bound_arguments(node)
    if arguments is None:
        return None
    if node.target in _LAYER_NORM_FUNCTIONS and len(_pair1(arguments["normalized_shape"])) == 1:
        return NHWC
    if node.target in _BATCH_NORM_FUNCTIONS and arguments["training"] is False:
        return NCHW if arguments["running_mean"] is not None else None
    return None


def _module_rule(module: nn.Module):
    kind = type(module)
    if kind in _ELEMENTWISE_MODULES or kind in _PRELU_MODULES:
        return "elementwise"
    if kind in _DROPOUT_MODULES:
        return None if module.training else "elementwise"
    if kind in _BATCHNORM_MODULES or kind in _BATCHNORM_ACT_MODULES:
        if module.training or getattr(module, "running_mean", None) is None:
            return None  # batch statistics mix positions
        if kind in _BATCHNORM_ACT_MODULES and not all(
                _module_rule(getattr(module, part)) == "elementwise" for part in ("drop", "act")):
            return None
        return NCHW
    if kind is nn.Conv2d or kind in _SAME_CONV_MODULES:
        if module.padding_mode != "zeros":
            return None  # reflect/replicate/circular padding reads positions across the map
        pointwise = kind is nn.Conv2d and module.kernel_size == (1, 1) and module.stride == (1, 1)
        return NCHW if pointwise and module.padding in ((0, 0), "valid", "same") else LOCAL
    if kind is nn.Linear:
        return NHWC
    if kind in _LAYERNORM_NCHW_MODULES and len(module.normalized_shape) == 1:
        return NCHW
    if kind in _LAYERNORM_NHWC_MODULES and len(module.normalized_shape) == 1:
        return NHWC
    if kind in _PERMUTE_MODULES:
        return _permute_rule(module.dims)
    return None


def _permute_rule(dims):
    dims = tuple(d % 4 for d in dims) if isinstance(dims, (tuple, list)) and len(dims) == 4 else None
    return {_TO_NHWC: (NCHW, NHWC), _TO_NCHW: (NHWC, NCHW)}.get(dims)


def _pair1(shape) -> tuple:
    return tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else (shape,)


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return getattr(node.target, "__name__", str(node.target))


# ------------------------------------------------------------------------------------ pools


@dataclass(frozen=True)
class _Pool:
    """A pool found in the head: its kind ("global" or "local"), the layout of the value it reads,
    its first and last node (a slice of the tokens, then their mean), and the dimensions of its
    output (2: (B, C); 4: the pooled dimensions kept)."""

    kind: str
    layout: str
    start: fx.Node
    end: fx.Node
    ndim: int


def _pool_of(node: fx.Node, gm: fx.GraphModule) -> Optional[_Pool]:
    """The pool that starts at ``node``, or None.

    Global: an adaptive average pool to 1 x 1, a mean over position dimensions, one token picked
    (``x[:, i]``) or a slice of the tokens averaged (``x[:, a:b].mean(1)``), the last two of a
    channels-last value. Which dimensions are positions depends on the value's rank, known only
    at run time, where :func:`pool_weights` checks it. Local: a small non-overlapping pool.
    """
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) is nn.AdaptiveAvgPool2d and _pair(module.output_size) == (1, 1):
            return _Pool("global", NCHW, node, node, 4)
        if type(module) in (nn.MaxPool2d, nn.AvgPool2d) and _non_overlapping(module):
            return _Pool("local", NCHW, node, node, 4)
        return None
    if node.op == "call_function" and node.target in _ADAPTIVE_AVG_FUNCTIONS:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return _Pool("global", NCHW, node, node, 4) if _pair(size) == (1, 1) else None
    mean = _mean_dims(node)
    if mean is not None:
        dims, keepdim = mean
        layout = _mean_layout(dims)
        return None if layout is None else _Pool("global", layout, node, node, 4 if keepdim else 2)
    index = _token_index(node)
    if isinstance(index, int):
        return _Pool("global", NHWC, node, node, 2)
    if isinstance(index, slice) and len(node.users) == 1:
        user = next(iter(node.users))
        if _mean_dims(user) == ((1,), False):
            return _Pool("global", NHWC, node, user, 2)
    return None


def _mean_dims(node: fx.Node) -> Optional[tuple[tuple[int, ...], bool]]:
    """(dims, keepdim) of a mean over given dimensions, or None."""
    if not _is_mean(node) or not set(node.kwargs) <= {"dim", "keepdim"}:
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    dims = (dims,) if isinstance(dims, int) else dims
    if not isinstance(dims, (tuple, list)) or not dims or not all(isinstance(d, int) for d in dims):
        return None
    return tuple(dims), bool(keepdim)


def _mean_layout(dims: tuple[int, ...]) -> Optional[str]:
    """The layout in which a mean over ``dims`` can be one over positions: never over the batch
    (0); dimension 1 is a channel dimension first, -1 one last."""
    if 0 in dims or (1 in dims and -1 in dims):
        return None
    if 1 in dims:
        return NHWC
    return NCHW if -1 in dims or min(dims) >= 2 else NHWC


def _token_index(node: fx.Node):
    """``i`` or ``a:b`` for ``x[:, i]`` or ``x[:, a:b]`` (a step of 1), else None."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return None
    index = node.args[1]
    if not isinstance(index, tuple) or len(index) != 2 or index[0] != slice(None):
        return None
    token = index[1]
    if isinstance(token, int) or (isinstance(token, slice) and token.step in (None, 1) and all(
            isinstance(v, (int, type(None))) for v in (token.start, token.stop))):
        return token
    return None


def _non_overlapping(pool: nn.Module) -> bool:
    kernel, stride = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size)
    simple = kernel == stride and _pair(pool.padding) == (0, 0) and not pool.ceil_mode
    if isinstance(pool, nn.MaxPool2d):
        simple = simple and _pair(pool.dilation) == (1, 1) and not pool.return_indices
    else:
        simple = simple and pool.divisor_override is None
    return simple and kernel[0] * kernel[1] <= MAX_WINDOW


def _is_mean(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target in _MEAN_FUNCTIONS)


# ------------------------------------------------------------------------------------ front


def _front_chain(pool: _Pool, gm: fx.GraphModule):
    """Walks the chain after the pool: (its last node, its Linear or None, the adaptive pool or None)."""
    end, ndim, linear, adaptive = pool.end, pool.ndim, None, None
    while len(end.users) == 1:
        node = next(iter(end.users))
        if node.op == "output" or node.args[:1] != (end,) or any(i is not end for i in node.all_input_nodes):
            break
        if _is_identity(node, gm):
            pass
        elif linear is not None:
            break  # only identities after the Linear
        elif _is_flatten(node, gm):
            ndim = 2
        elif pool.kind == "local" and adaptive is None and ndim == 4 and (pool_fn := _adaptive_pool(node, gm)):
            adaptive = pool_fn
        elif ndim == 2 and node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Linear:
            linear = gm.get_submodule(node.target)
        else:
            break
        end = node
    return end, linear, adaptive


def _is_flatten(node: fx.Node, gm: fx.GraphModule) -> bool:
    """flatten from dim 1 to the last, of a (N, C, h, w) or (N, C) value."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return type(module) in _FLATTEN_MODULES and module.start_dim == 1 and module.end_dim == -1
    if node.op == "call_method" and node.target == "flatten" or (
            node.op == "call_function" and node.target in _FLATTEN_FUNCTIONS):
        args = list(node.args[1:]) + [None, None]
        start = node.kwargs.get("start_dim", args[0] if args[0] is not None else 0)
        end = node.kwargs.get("end_dim", args[1] if args[1] is not None else -1)
        return start == 1 and end == -1
    return False


def _adaptive_pool(node: fx.Node, gm: fx.GraphModule) -> Optional[Callable]:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return module if type(module) is nn.AdaptiveAvgPool2d else None
    if node.op == "call_function" and node.target in _ADAPTIVE_AVG_FUNCTIONS:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        if not isinstance(size, fx.Node):
            return lambda x: F.adaptive_avg_pool2d(x, size)
    return None


# ------------------------------------------------------------------ what only run time can check


def body_positions(pattern: HeadPattern, values: Mapping[fx.Node, Any], batch: int) -> Optional[int]:
    """The number of positions of the activation when every value of the body, as recorded in
    ``values`` (a run of ``pattern.body`` on ``batch`` images), holds as many in the layout the
    proof gave it; else None.

    The graph shows each op to be position-wise; this shows that the positions line up at this
    rank: a reshape that keeps the batch, the channels and the count of positions keeps their
    row-major order, and no broadcast spread a value over more positions.
    """
    counts = set()
    for node, value in values.items():
        layout = pattern.layouts.get(node.name)
        if layout is None:
            continue  # the output, held values and what the body computes from them
        if not isinstance(value, torch.Tensor) or value.dim() < 3 or value.shape[0] != batch:
            return None
        counts.add(value[0].numel() // value.shape[_CHANNEL_DIM[layout]])
    return counts.pop() if len(counts) == 1 else None


def by_position(value: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, N, C): a value in ``layout`` with its N positions flattened in row-major order."""
    return value.flatten(1, -2) if layout == NHWC else value.flatten(2).transpose(1, 2)


def pool_weights(pattern: HeadPattern, g: torch.Tensor) -> Optional[torch.Tensor]:
    """(N,) the weight of each of the N positions of the pool's input ``g`` (B, ...) in the pooled
    vector; None unless the pool takes every channel to one weighted sum over the positions.

    Measured by pooling one-hot channels: two images whose channel j is 1 at position j only, and
    an extra channel of zeros so that the channels cannot be mistaken for the positions. A mean
    that misses a position dimension or covers a channel (or batch) one changes the output's size.
    """
    layout = pattern.pooled_layout
    channel = _CHANNEL_DIM[layout] % g.dim()
    n = g[0].numel() // g.shape[channel]
    one_hot = torch.eye(n, n + 1, dtype=g.dtype, device=g.device)
    shape = list(g.shape)
    shape[0], shape[channel] = 2, n + 1
    probe = (one_hot if layout == NHWC else one_hot.T).reshape(shape[1:]).expand(shape)
    out = pattern.pooling(probe.contiguous())
    if out.shape[0] != 2 or out[0].numel() != n + 1:
        return None
    return out[0].flatten()[:n]
