"""The geometry of a body that mixes positions locally, recorded on its full maps.

Along each axis, index o of a value of the body depends on activation positions
[S*o - A, S*o + B] at most (its footprint, see :class:`Axis`): a convolution multiplies S by its
stride and widens A and B by its padding and reach, a position-wise op takes the union of its
inputs' footprints. When position p joins a coalition, only the indices whose footprint holds p
change: at most (A + B) // S + 1 of them per axis (a box), fewer where the footprints are cut by
the map's edge or skip p (a stride).

A value with no convolution on its way from the activation is position-wise in it (``pre``): at
each position it holds its value with every position kept or with none kept, so the walks read
it from those two recorded maps instead of recomputing it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import Tensor, nn

from shapcam_ext.paths.pattern import NHWC, HeadPattern
from shapcam_ext.fxutils import descendants, mutates_first_arg
from shapcam_ext.head import expand_held

_SPATIAL_DIMS = {"nchw": (2, 3), NHWC: (1, 2)}


@dataclass(frozen=True)
class Axis:
    """One spatial axis of a value: its length, and the footprint [stride*o - before, stride*o + after]
    of its index o in activation indices (a superset of what o depends on)."""

    length: int
    stride: int = 1
    before: int = 0
    after: int = 0

    @property
    def box(self) -> int:
        """How many consecutive indices one activation index can change (at most)."""
        return min(self.length, (self.before + self.after) // self.stride + 1)

    def changed(self, positions: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(positions,) twice: the first and the last index that each activation index p can change,
        those whose footprint holds p, o in [ceil((p - after) / stride), floor((p + before) / stride)],
        clipped to the axis (the first is past the last where p changes none)."""
        p = torch.arange(positions, device=device)
        first = -((self.after - p) // self.stride)
        return first.clamp(min=0), ((p + self.before) // self.stride).clamp(max=self.length - 1)

    def footprint(self, o: Tensor) -> tuple[Tensor, Tensor]:
        """The first and last activation index that index ``o`` may depend on."""
        return self.stride * o - self.before, self.stride * o + self.after


@dataclass(frozen=True)
class Conv:
    """A spatial convolution and, per axis (y, x), its kernel, stride, dilation and the zero
    padding before index 0 (resolved for the input's size: timm's "same" padding depends on it)."""

    module: nn.Conv2d
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pad: tuple[int, int]

    @classmethod
    def of(cls, module: nn.Conv2d, lengths: tuple[int, int]) -> "Conv":
        """The geometry of ``module`` on an input of spatial size ``lengths``."""
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        if isinstance(module.padding, str):  # torch's "valid" / "same" (stride 1), or timm's Conv2dSame below
            total = [0 if module.padding == "valid" else d * (k - 1) for k, d in zip(kernel, dilation)]
        elif type(module) is nn.Conv2d:
            total = [2 * p for p in module.padding]
        else:  # timm's Conv2dSame: TensorFlow's "same", from the input size (timm.layers.padding.pad_same)
            total = [max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
                     for n, k, s, d in zip(lengths, kernel, stride, dilation)]
        return cls(module, tuple(kernel), tuple(stride), tuple(dilation), tuple(t // 2 for t in total))

    def output_length(self, a: int, length: int) -> int:
        reach = (self.kernel[a] - 1) * self.dilation[a]
        after = self.padding_after(a, length)
        return (length + self.pad[a] + after - reach - 1) // self.stride[a] + 1

    def padding_after(self, a: int, length: int) -> int:
        """The zero padding after the last index along axis ``a`` (torch's is symmetric)."""
        module = self.module
        if type(module) is nn.Conv2d and not isinstance(module.padding, str):
            return module.padding[a]
        if module.padding == "valid":
            return 0
        if isinstance(module.padding, str):
            return (self.kernel[a] - 1) * self.dilation[a] - self.pad[a]
        n, k, s, d = length, self.kernel[a], self.stride[a], self.dilation[a]
        return max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0) - self.pad[a]

    def margin(self, length_in: int, length_out: int, a: int) -> int:
        """Zero indices read outside the input along axis ``a``, before or after it."""
        last = (length_out - 1) * self.stride[a] - self.pad[a] + (self.kernel[a] - 1) * self.dilation[a]
        return max(self.pad[a], last - (length_in - 1), 0)

    def output_axis(self, a: int, inp: Axis, length: int) -> Axis:
        """The axis of the output, from the input's: index o reads inputs [o*s - pad, o*s - pad + reach]."""
        s, reach = self.stride[a], (self.kernel[a] - 1) * self.dilation[a]
        return Axis(length, inp.stride * s, inp.stride * self.pad[a] + inp.before,
                    inp.stride * (reach - self.pad[a]) + inp.after)


@dataclass
class Value:
    """An activation-dependent value of the body.

    layout: NCHW or NHWC. axes: (y, x). channels: its channel count.
    pre: position-wise in the activation (no convolution on its way).
    conv: its geometry, when the node is a spatial convolution.
    flops: per position and image (an estimate that ranks the walks' costs).
    margin: the zero padding its map needs on each side: the most any convolution reading it reads
        outside the map.
    statics: how the node reads each input that does not depend on the activation:
        "constant" (as it is), "rows" (one value per image) or "map" (per image and position).
    """

    layout: str
    axes: tuple[Axis, Axis]
    channels: int
    pre: bool
    conv: Optional[Conv]
    flops: int
    margin: int = 0
    statics: Optional[dict] = None

    @property
    def area(self) -> int:
        return self.axes[0].length * self.axes[1].length


class NodeRunner(fx.Interpreter):
    """Runs a graph's nodes, on copies of the inputs that a node would write into (so that values
    recorded or passed in stay as they were).

    keep_values: keep every value of a run (``record``), rather than freeing each after its last use.
    """

    def __init__(self, module: fx.GraphModule, keep_values: bool):
        super().__init__(module, garbage_collect_values=not keep_values)
        self.mutating = {node for node in module.graph.nodes if mutates_first_arg(node, module)}

    def run_node(self, node: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        return self.call(node, args, kwargs)

    def call(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        """``node``'s op on the given arguments."""
        if node in self.mutating and args and isinstance(args[0], Tensor):
            args = (args[0].clone(), *args[1:])
        return getattr(self, node.op)(node.target, args, kwargs)

    def record(self, *inputs: Any) -> dict[fx.Node, Any]:
        """Every node's value on these inputs."""
        self.run(*inputs)
        values, self.env = self.env, {}
        return values


@dataclass
class BodyPlan:
    """The body's activation-dependent values with their geometry, and their recorded maps.

    module: the body (``body(activation, *held)`` -> the pool's input).
    values: the activation-dependent nodes, in graph order, the activation first.
    output: the pool's input node.
    keep, base: every node's value with every / no position kept, (B, ...).
    runner: runs single nodes.
    """

    module: fx.GraphModule
    values: dict[fx.Node, Value]
    output: fx.Node
    keep: dict[fx.Node, Any]
    base: dict[fx.Node, Any]
    runner: NodeRunner

    def __post_init__(self):
        self.frontier = [node for node, value in self.values.items() if value.pre and any(
            user in self.values and not self.values[user].pre for user in node.users)]
        self.held = [node for node in self.module.graph.nodes if node.op == "placeholder"][1:]
        self.evaluator = NodeRunner(self.module, keep_values=False)

    def masked(self, node: fx.Node, keep: Tensor) -> Tensor:
        """(B * M, ...) the position-wise value ``node`` in M coalitions, keep: (M, H, W) bool."""
        value = self.values[node]
        shape = (1, -1, *keep.shape[1:], 1) if value.layout == NHWC else (1, -1, 1, *keep.shape[1:])
        out = torch.where(keep.view(shape), self.keep[node][:, None], self.base[node][:, None]).flatten(0, 1)
        # channels-last: the layout CPU convolutions run fastest on (1.4x on the depthwise blocks measured)
        return out if value.layout == NHWC else out.contiguous(memory_format=torch.channels_last)

    def evaluate(self, keep: Tensor) -> Tensor:
        """(B * M, ...) the body's output (the pool's input) in M coalitions, keep: (M, H, W) bool.

        Runs from the values that the convolutions read, so the position-wise layers before them
        are not run again.
        """
        rows = self.keep[self.output].shape[0] * keep.shape[0]
        env = {node: None for node, value in self.values.items() if value.pre}  # not needed past the frontier
        env.update({node: self.masked(node, keep) for node in self.frontier})
        env.update(zip(self.held, expand_held(tuple(self.keep[node] for node in self.held), rows)))
        return self.evaluator.run(initial_env=env)

    @property
    def size(self) -> tuple[int, int]:
        """The activation's spatial size."""
        first = self.values[next(iter(self.values))]
        return first.axes[0].length, first.axes[1].length

    def body_flops(self, pre: bool = True) -> int:
        """One evaluation of the body on full maps, per image; without the position-wise layers
        before the convolutions unless ``pre`` (``evaluate`` runs from the frontier)."""
        return sum(v.flops * v.area for v in self.values.values() if pre or not v.pre)


def plan_body(pattern: HeadPattern, players: Tensor, base_map: Tensor, held: tuple) -> Optional[BodyPlan]:
    """The body's plan for these images, or None when a runtime shape does not fit it."""
    gm = pattern.body
    runner = NodeRunner(gm, keep_values=True)
    keep, base = runner.record(players, *held), runner.record(base_map, *held)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    dependent = descendants(placeholders[0])
    batched = {n for n in set().union(*map(descendants, placeholders[1:])) - dependent
               if isinstance(keep[n], Tensor) and keep[n].dim() > 0 and keep[n].shape[0] == players.shape[0]}
    values: dict[fx.Node, Value] = {}
    for node in gm.graph.nodes:
        if node in dependent and node.op != "output":
            value = _value(node, pattern, gm, keep, values, batched, players.shape[0])
            if value is None:
                return None
            values[node] = value
    for node, value in values.items():
        if value.conv is not None:
            source = values[node.args[0]]
            source.margin = max(source.margin, *(
                value.conv.margin(source.axes[a].length, value.axes[a].length, a) for a in (0, 1)))
    return BodyPlan(gm, values, output, keep, base, runner)


def _value(node: fx.Node, pattern: HeadPattern, gm: fx.GraphModule, keep: dict, values: dict, batched: set,
           batch: int) -> Optional[Value]:
    """``node``'s Value from its recorded map and its inputs' Values; None if it does not fit."""
    layout = pattern.layouts.get(node.name)
    tensor = keep[node]
    if layout is None or not isinstance(tensor, Tensor) or tensor.dim() != 4 or tensor.shape[0] != batch:
        return None
    lengths = tuple(tensor.shape[d] for d in _SPATIAL_DIMS[layout])
    channels = tensor.shape[3 if layout == NHWC else 1]
    if not values:  # the activation
        return Value(layout, (Axis(lengths[0]), Axis(lengths[1])), channels, True, None, 0)
    inputs = [values[i] for i in node.all_input_nodes if i in values]
    if node.name in pattern.local.convs:
        source = inputs[0]
        conv = Conv.of(gm.get_submodule(node.target), (source.axes[0].length, source.axes[1].length))
        if any(conv.output_length(a, source.axes[a].length) != lengths[a] for a in (0, 1)):
            return None
        axes = tuple(conv.output_axis(a, source.axes[a], lengths[a]) for a in (0, 1))
        per_position = 2 * channels * source.channels // conv.module.groups * conv.kernel[0] * conv.kernel[1]
        return Value(layout, axes, channels, False, conv, per_position)
    axes = []
    for a in (0, 1):
        if {(v.axes[a].length, v.axes[a].stride) for v in inputs} != {(lengths[a], inputs[0].axes[a].stride)}:
            return None  # inputs of different sizes or strides meet (a broadcast across positions)
        axes.append(Axis(lengths[a], inputs[0].axes[a].stride, max(v.axes[a].before for v in inputs),
                         max(v.axes[a].after for v in inputs)))
    pre = all(v.pre for v in inputs)
    statics = None
    if not pre:
        statics = {i: _static_kind(keep[i], i in batched, layout, lengths)
                   for i in node.all_input_nodes if i not in values}
        if None in statics.values():
            return None
    return Value(layout, tuple(axes), channels, pre, None, _flops(node, gm, channels), statics=statics)


def _static_kind(value: Any, batched: bool, layout: str, lengths: tuple[int, int]) -> Optional[str]:
    """How a recomputed node reads an input that does not depend on the activation (see Value)."""
    if not isinstance(value, Tensor):
        return "constant"
    sizes = tuple(value.shape[d - 4] if value.dim() >= 4 - d else 1 for d in _SPATIAL_DIMS[layout])
    if batched and value.dim() == 4:
        return "map" if sizes == lengths else "rows" if sizes == (1, 1) else None
    return "constant" if sizes == (1, 1) else None


def _flops(node: fx.Node, gm: fx.GraphModule, channels: int) -> int:
    """Per position and image, of a position-wise node: its matrix product if it is a 1x1
    convolution or a Linear module, else one operation per channel."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            return 2 * module.weight.numel()
    return channels
