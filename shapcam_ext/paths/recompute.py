"""Recomputing what each step changes: exact steps for any locally mixing body.

All K permutations add their t-th position at step t. The entering position p changes index o of
a value only when o's footprint holds p (see :mod:`.receptive`): along each axis a range of
indices cut by the map's edge, and the product of the two ranges is the value's *sites* for p.
For every image and permutation (a row), the walk keeps the current map of each value that some
op reads beyond its own sites (a convolution's input, the narrower input of a residual add, the
pool's input). At each step it computes every other value at its sites only, the sites of every
row in one batch of single positions: a convolution as the product of the gathered k x k input
patches with its weight, a position-wise op from its inputs at the same sites. Values
position-wise in the activation are read from their kept and baseline maps, by whether each
position is in. A grouped (depthwise) convolution whose patches would hold more values than its
input's map instead runs on the whole kept map and its sites are picked from the result: with
few flops per byte, gathering k x k patches (k * k copies of the input) is slower than convolving
every position (about 10x for a 5 x 5 depthwise conv of 1152 channels on a 7 x 7 map). Where a
step's sites are the whole map, kept maps are read and written whole. The front and the tail then
run on the pool's input, once per step.

Sites rather than one box per value (the box that holds every step's changes): an entering
position at the map's edge, or at an index a stride-2 convolution skips, changes a fraction of
the box, and a box recomputes all of it at every step. Cut after ResNet-50's layer3 the sites
are 238 MFLOP per step against 428 for boxes (the whole head: 1620); after EfficientNet-Lite0's
blocks.4, 192 against 223 (282); bench/bench_breakdown.py has the breakdown by layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from shapcam_ext.game import Game
from shapcam_ext.ops import permutation_ranks
from shapcam_ext.paths.pattern import _BATCHNORM_ACT_MODULES, _BATCHNORM_MODULES, NHWC
from shapcam_ext.paths.protocol import Evaluator
from shapcam_ext.paths.receptive import Axis, BodyPlan, Conv, Value

PRE, STATE, WHOLE, FRESH, MAP, ROWS = "pre", "state", "whole", "fresh", "map", "rows"


@dataclass(frozen=True)
class _Read:
    """How a recomputed node reads one input at its sites.

    kind: PRE (kept/baseline maps of a position-wise value), STATE (a kept map), WHOLE (all of a
        kept map, which a grouped convolution reads), FRESH (the input's sites, just computed, are
        the node's), MAP (a held map per image), ROWS (a held value per image without positions).
    taps: (positions of the node, T) flat indices into the source's (padded) map of what the node
        reads at each of its positions: the k x k patch of a convolution (T = k * k), the position
        itself otherwise (T = 1).
    """

    kind: str
    taps: Optional[Tensor] = None


class Sites:
    """Where each entering position changes a value: for every activation position p, the flat
    indices of the value's map inside its two axes' ranges of change (see :meth:`Axis.changed`),
    padded with -1 to the largest count (``most``); ``mean``: their average count."""

    def __init__(self, axes: tuple[Axis, Axis], size: tuple[int, int], device: torch.device):
        (h, w), width = size, axes[1].length
        (y0, y1), (x0, x1) = axes[0].changed(h, device), axes[1].changed(w, device)
        rows, cols = (y1 - y0 + 1).clamp(min=0), (x1 - x0 + 1).clamp(min=0)
        ry, rx = rows.max().item(), cols.max().item()
        dy, dx = torch.arange(ry, device=device), torch.arange(rx, device=device)
        ys, xs = y0[:, None] + dy, x0[:, None] + dx  # (h, ry), (w, rx)
        inside = (dy < rows[:, None])[:, None, :, None] & (dx < cols[:, None])[None, :, None, :]  # (h, w, ry, rx)
        flat = ys[:, None, :, None] * width + xs[None, :, None, :]
        self.index = torch.where(inside, flat, -1).view(h * w, ry * rx)
        counts = (rows[:, None] * cols[None, :]).flatten()
        self.most, self.mean = int(counts.max()), float(counts.double().mean())

    def of(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(row, index) of every site of the rows whose entering positions are ``positions`` (K,)."""
        index = self.index[positions]
        row, column = (index >= 0).nonzero(as_tuple=True)
        return row, index[row, column]


class RecomputeWalk(Evaluator):
    """Walks a locally mixing body by recomputing, at each step, the sites that can change.

    plan: the body's plan. front, tail: the head after the body (tail None when the front's
    output is the output). start: (B, *S) the front output of the empty coalition.
    tail_row_bytes: bytes the tail and the target allocate per row.
    """

    path = "incremental-recompute"

    def __init__(self, game: Game, plan: BodyPlan, front: Callable, tail: Optional[Callable], start: Tensor,
                 tail_row_bytes: int):
        h, w = plan.size
        b = start.shape[0]
        self.plan, self.front, self.tail = plan, front, tail
        device = start.device
        self.order = [node for node, value in plan.values.items() if not value.pre]
        self.sites = {axes: Sites(axes, plan.size, device) for axes in {plan.values[node].axes for node in self.order}}
        self.kept = {plan.output}
        self.reads: dict[fx.Node, dict[fx.Node, _Read]] = {}
        for node in self.order:
            self.reads[node] = self._reads(node, plan.values[node])
            self.kept |= {u for u, read in self.reads[node].items() if read.kind in (STATE, WHOLE)}
        self.writes = {node: self._taps(node, node) for node in self.kept}
        self.entering = [u for u in self.kept if plan.values[u].pre]  # kept maps that change at the entering position
        # every convolution's weight and bias (a batch norm that only it feeds folded in), and what
        # is left of those batch norms: their activation
        self.weights = {node: _conv_weight(plan, node) for node in self.order
                        if plan.values[node].conv is not None or _pointwise(plan, node)}
        self.folded = {}
        for node in self.order:
            source = next((u for u in self.reads[node] if u in self.weights), None)
            if source is not None and len(source.users) == 1 and source not in self.kept and \
                    self.reads[node][source].kind == FRESH and (folded := _fold(plan, node)) is not None:
                scale, shift, self.folded[node] = folded
                weight, bias = self.weights[source]
                self.weights[source] = (weight * scale.view(-1, *[1] * (weight.dim() - 1)),
                                        shift if bias is None else bias * scale + shift)
        self.patches = {node: weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
                        for node, (weight, _) in self.weights.items() if _ungrouped(plan, node)}
        self.margins = sorted({plan.values[u].margin for reads in self.reads.values()
                               for u, read in reads.items() if read.kind == PRE})
        # a position-wise value's kept maps of the B images, then its baseline maps
        self.padded = {u: torch.cat([_position_major(m[u], plan.values[u].layout, plan.values[u].margin)
                                     for m in (plan.keep, plan.base)])
                       for u in {u for reads in self.reads.values() for u in reads} if u in plan.values and
                       plan.values[u].pre}
        self.maps = {u: _position_major(plan.keep[u], plan.values[node].layout)
                     for node, reads in self.reads.items() for u, read in reads.items() if read.kind == MAP}
        self.empty = game.scorer(game.targets, start if tail is None else tail(start), 1).double()  # (B, 1)
        element = start.element_size()
        state = sum(_padded_numel(plan.values[u]) for u in self.kept)
        step = 0
        for node in self.order:
            value, most = plan.values[node], self._sites(node).most
            step += most * value.channels + (
                value.channels * value.area if any(r.kind == WHOLE for r in self.reads[node].values()) else 0)
            step += sum(most * r.taps.shape[1] * self._channels(u, node) * (3 if r.kind == PRE else 1)
                        for u, r in self.reads[node].items() if r.taps is not None)
        per_step = step * element + tail_row_bytes + start[0].numel() * element
        if game.planner.differentiable:
            # The backward recomputes the round and keeps every step's values until it runs back
            # through them: the sites, the tail, and the kept maps an op may have saved (a step then
            # writes a new one rather than into the one kept).
            read = {u for reads in self.reads.values() for u, r in reads.items() if r.kind in (STATE, WHOLE)}
            per_step = h * w * (per_step + sum(_padded_numel(plan.values[u]) for u in read) * element)
        super().__init__(game, b * (state * element + per_step) + b * (h * w + 1) * 8)

    def _sites(self, node: fx.Node) -> Sites:
        return self.sites[self.plan.values[node].axes]

    def _channels(self, source: fx.Node, node: fx.Node) -> int:
        """Channels of an input that ``node`` reads at its sites (a held map has ``node``'s size)."""
        value = self.plan.values.get(source)
        return value.channels if value is not None else self.plan.keep[source][0].numel() // self.plan.values[node].area

    def _reads(self, node: fx.Node, value: Value) -> dict[fx.Node, _Read]:
        """How ``node`` reads each of its inputs that is not a constant."""
        plan = self.plan
        if value.conv is not None:
            source = node.args[0]
            if _on_whole_map(plan, node, self._sites(node)):
                return {source: _Read(WHOLE)}
            kind = PRE if plan.values[source].pre else STATE
            return {source: _Read(kind, self._taps(node, source, value.conv))}
        reads = {}
        for source in node.all_input_nodes:
            other = plan.values.get(source)
            if other is None:
                kind = value.statics[source]
                if kind == MAP:
                    reads[source] = _Read(MAP, self._taps(node, None))
                elif kind == ROWS:
                    reads[source] = _Read(ROWS)
            elif other.pre:
                reads[source] = _Read(PRE, self._taps(node, source))
            elif other.axes != value.axes:
                reads[source] = _Read(STATE, self._taps(node, source))
            else:
                reads[source] = _Read(FRESH)
        return reads

    def _taps(self, node: fx.Node, source: Optional[fx.Node], conv: Optional[Conv] = None) -> Tensor:
        """(positions of ``node``, T) flat indices into ``source``'s padded map (its unpadded map for
        None: a held map of ``node``'s size) of what ``node`` reads at each of its positions: the
        patch of ``conv`` (T = kh * kw), else the position itself (T = 1)."""
        value = self.plan.values[node]
        source_value = value if source is None else self.plan.values[source]
        margin = 0 if source is None else source_value.margin
        width = source_value.axes[1].length + 2 * margin
        device = self.plan.keep[self.plan.output].device
        first, reach = [], []
        for a in (0, 1):
            o = torch.arange(value.axes[a].length, device=device)
            if conv is None:
                first.append(o + margin)
                reach.append(torch.zeros(1, dtype=torch.long, device=device))
            else:
                first.append(o * conv.stride[a] - conv.pad[a] + margin)
                reach.append(torch.arange(conv.kernel[a], device=device) * conv.dilation[a])
        ys, xs = first[0][:, None] + reach[0], first[1][:, None] + reach[1]  # (h, T_y), (w, T_x)
        return (ys[:, None, :, None] * width + xs[None, :, None, :]).flatten(2).flatten(0, 1)

    def values(self, perms: Tensor) -> Tensor:
        plan = self.plan
        k, n = perms.shape
        h, w = plan.size
        ranks = permutation_ranks(perms).view(k, 1, h, w)
        padded_ranks = {m: F.pad(ranks, (m, m, m, m), value=n).flatten(1) for m in self.margins}
        states = {u: _position_major(plan.base[u], plan.values[u].layout, plan.values[u].margin).repeat_interleave(k, 0)
                  for u in self.kept}
        out = torch.empty(self.game.batch, k, n + 1, dtype=torch.float64, device=perms.device)
        out[:, :, 0] = self.empty
        output, margin = plan.output, plan.values[plan.output].margin
        for t in range(n):
            step = _Step(self, perms[:, t], t, k, states, padded_ranks)
            for node in self.order:
                step.compute(node)
            g = states[output]
            if margin:
                g = g[:, margin:g.shape[1] - margin, margin:g.shape[2] - margin]
            front = self.front(_in_layout(g, plan.values[output].layout))
            out[:, :, t + 1] = self.game.scorer(self.game.targets, front if self.tail is None else self.tail(front), k)
        return out


@dataclass(frozen=True)
class _Where:
    """The sites of one step for values of one geometry: ``row`` (M,) the row of the K permutations
    and ``index`` (M,) the position of each site; ``rows`` (B * M,) its row among all images' (image-
    major); ``whole``: every row's sites are its whole map, in order (its kept map is then the result)."""

    row: Tensor
    index: Tensor
    rows: Tensor
    whole: bool


class _Step:
    """One step of a RecomputeWalk: the entering positions, each value's sites, and the values
    computed at them so far, (B * M, C) for the M sites of every image's rows."""

    def __init__(self, walk: RecomputeWalk, positions: Tensor, t: int, k: int, states: dict, padded_ranks: dict):
        self.walk, self.t, self.k = walk, t, k
        self.states, self.padded_ranks = states, padded_ranks
        self.images = images = walk.game.batch
        self.where = {}
        for axes, sites in walk.sites.items():
            row, index = sites.of(positions)
            rows = (torch.arange(images, device=row.device)[:, None] * k + row).flatten()
            self.where[axes] = _Where(row, index, rows, len(row) == k * axes[0].length * axes[1].length)
        self.fresh: dict[fx.Node, Tensor] = {}
        rows = torch.arange(images * k, device=positions.device)
        for u in walk.entering:  # a kept position-wise value: its kept value enters at the entering position
            where = walk.writes[u][positions].repeat(images, 1).flatten()
            kept = walk.padded[u]
            per_map = kept[0].numel() // kept.shape[-1]
            self._write(u, rows * per_map + where, kept.view(-1, kept.shape[-1])[rows // k * per_map + where])

    def compute(self, node: fx.Node) -> None:
        """``node``'s value at its sites, for every row; written into its kept map if it has one."""
        walk, plan = self.walk, self.walk.plan
        value = plan.values[node]
        where = self.where[value.axes]
        if not len(where.row):
            return  # no row changes this value: nor any value computed from it at the same sites
        reads = walk.reads[node]
        if value.conv is not None and WHOLE in {read.kind for read in reads.values()}:
            (source,) = reads
            result = _grouped(value, self.states[source], plan.values[source].margin, *walk.weights[node])
            result = result.view(-1, value.channels)
            if not where.whole:
                result = result.index_select(0, where.rows * value.area + where.index.repeat(self.images))
        elif node in walk.weights:  # patches (B * M, kh * kw * C), convolved
            (source, read), = reads.items()
            patches = self._read(source, read, where)
            if node in walk.patches:
                result = F.linear(patches, walk.patches[node], walk.weights[node][1])
            else:
                result = _grouped_patches(value, patches, *walk.weights[node])
        elif node in walk.folded:  # a batch norm folded into the convolution before it
            (source,) = reads
            result = walk.folded[node](self.fresh[source])
        else:
            inputs = {source: self._positions(node, source, read, where) for source, read in reads.items()}
            args, kwargs = fx.map_arg((node.args, node.kwargs), lambda u: inputs[u] if u in inputs else plan.keep[u])
            result = plan.runner.call(node, args, kwargs).flatten(1)
        self.fresh[node] = result
        if node in walk.kept and where.whole:
            state = self.states[node]
            maps = result.view(state.shape[0], value.axes[0].length, value.axes[1].length, -1)
            if torch.is_grad_enabled():  # an op may have saved the kept map for its backward: a new one
                self.states[node] = F.pad(maps, (0, 0) + (value.margin,) * 4)
            else:
                _interior(state, value.margin).copy_(maps)
        elif node in walk.kept:
            per_map = self.states[node][0].numel() // value.channels
            self._write(node, (where.rows[:, None] * per_map + walk.writes[node][where.index.repeat(self.images)])
                        .flatten(), result)

    def _write(self, node: fx.Node, flat: Tensor, rows: Tensor) -> None:
        """Puts ``rows`` at the flat positions ``flat`` of ``node``'s kept maps."""
        state = self.states[node]
        target = state.view(-1, state.shape[-1])
        if torch.is_grad_enabled():  # an op may have saved the kept map for its backward: write a new one
            self.states[node] = target.index_copy(0, flat, rows).view_as(state)
        else:
            target.index_copy_(0, flat, rows)

    def _positions(self, node: fx.Node, source: fx.Node, read: _Read, where: _Where) -> Tensor:
        """An input of the position-wise ``node`` at its sites, as maps of one position in the input's
        layout (a held map's is its reader's)."""
        values = self._read(source, read, where)
        if read.kind == ROWS:
            return values
        values_of = self.walk.plan.values
        layout = values_of[source if source in values_of else node].layout
        return values.view(-1, 1, 1, values.shape[-1]) if layout == NHWC else values.view(*values.shape, 1, 1)

    def _read(self, source: fx.Node, read: _Read, where: _Where) -> Tensor:
        """(B * M, T * C): what the node reads of ``source`` at its M sites per image (T taps each)."""
        if read.kind == FRESH:
            return self.fresh[source]
        if read.kind == ROWS:  # as held: (B * M, C, 1, 1)
            return self.walk.plan.keep[source].index_select(0, where.rows // self.k)
        if read.kind == STATE and where.whole and read.taps.shape[1] == 1:
            state = self.states[source]
            return _interior(state, self.walk.plan.values[source].margin).reshape(-1, state.shape[-1])
        taps = read.taps[where.index].repeat(self.images, 1)  # (B * M, T) in the source's padded map
        if read.kind == STATE:
            return _gather(self.states[source], where.rows[:, None], taps)
        if read.kind == MAP:
            return _gather(self.walk.maps[source], (where.rows // self.k)[:, None], taps)
        # PRE: each position's kept or baseline value, by whether it is in (the baseline maps follow the kept ones)
        ranks = self.padded_ranks[self.walk.plan.values[source].margin]
        late = ranks[where.row.repeat(self.images)[:, None], taps] > self.t
        return _gather(self.walk.padded[source], (where.rows // self.k)[:, None] + late * self.images, taps)


def step_flops(plan: BodyPlan) -> float:
    """Flops per image of one step of the walk, averaged over the entering positions: each value at
    its sites, a grouped convolution over its whole map."""
    sites: dict[tuple[Axis, Axis], Sites] = {}
    total = 0.0
    for node, value in plan.values.items():
        if value.pre:
            continue
        where = sites.setdefault(value.axes, Sites(value.axes, plan.size, torch.device("cpu")))
        total += value.flops * (value.area if value.conv and _on_whole_map(plan, node, where) else where.mean)
    return total


def _on_whole_map(plan: BodyPlan, node: fx.Node, sites: Sites) -> bool:
    """Whether the convolution ``node`` runs on the whole kept map of its input: a grouped one whose
    patches at its sites would hold more values than that map (see the module's docstring)."""
    value, source = plan.values[node], plan.values[node.args[0]]
    padded = (source.axes[0].length + 2 * source.margin) * (source.axes[1].length + 2 * source.margin)
    return value.conv.module.groups > 1 and sites.mean * value.conv.kernel[0] * value.conv.kernel[1] > padded


def _gather(maps: Tensor, which: Tensor, taps: Tensor) -> Tensor:
    """(N, T * C): positions ``taps`` (N, T) of the maps ``which`` (N, 1 or T) of ``maps`` (R, H', W', C)."""
    flat = which * (maps[0].numel() // maps.shape[-1]) + taps
    return maps.view(-1, maps.shape[-1]).index_select(0, flat.flatten()).view(taps.shape[0], -1)


def _interior(state: Tensor, margin: int) -> Tensor:
    """The map inside a kept map's margin of zeros."""
    return state[:, margin:state.shape[1] - margin, margin:state.shape[2] - margin] if margin else state


def _pointwise(plan: BodyPlan, node: fx.Node) -> bool:
    """Whether ``node`` is an ungrouped position-wise (1 x 1) convolution: at single positions a
    matrix product, and run as one twice as fast (a convolution of (N, C, 1, 1) maps does not take
    the GEMM path)."""
    module = plan.module.get_submodule(node.target) if node.op == "call_module" else None
    return isinstance(module, nn.Conv2d) and module.groups == 1


def _conv_weight(plan: BodyPlan, node: fx.Node) -> tuple[Tensor, Optional[Tensor]]:
    module = plan.module.get_submodule(node.target)
    return module.weight, module.bias


def _ungrouped(plan: BodyPlan, node: fx.Node) -> bool:
    """Whether the convolution ``node`` is one matrix product of its patches with its weight."""
    return plan.module.get_submodule(node.target).groups == 1


def _fold(plan: BodyPlan, node: fx.Node) -> Optional[tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]]:
    """(scale, shift, what is left) of ``node`` when it is an eval-mode batch norm, which the
    convolution before it can take in: x * scale + shift, then its activation (timm's BatchNormAct2d)
    or nothing. Folded, the walk skips a pass over the values: the product rounds once more."""
    module = plan.module.get_submodule(node.target) if node.op == "call_module" else None
    kind = type(module)
    if kind not in _BATCHNORM_MODULES and kind not in _BATCHNORM_ACT_MODULES or module.weight is None:
        return None
    scale = module.weight * (module.running_var + module.eps).rsqrt()
    shift = module.bias - module.running_mean * scale
    rest = (lambda x: module.act(module.drop(x))) if kind in _BATCHNORM_ACT_MODULES else (lambda x: x)
    return scale, shift, rest


def _grouped_patches(value: Value, patches: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """(N, C_out): a grouped convolution at N positions from their gathered (N, kh * kw * C_in)
    patches, as kh x kw maps."""
    conv = value.conv
    maps = patches.view(-1, *conv.kernel, conv.module.in_channels).permute(0, 3, 1, 2)
    return F.conv2d(maps, weight, bias, groups=conv.module.groups).flatten(1)


def _grouped(value: Value, state: Tensor, margin: int, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """(N, h, w, C_out): a grouped convolution of the kept maps ``state`` (N, h + 2m, w + 2m, C_in), whose
    margin m of zeros holds its padding."""
    conv = value.conv
    h, w = value.axes[0].length, value.axes[1].length
    maps = state[:, margin - conv.pad[0]:, margin - conv.pad[1]:].permute(0, 3, 1, 2)
    out = F.conv2d(maps, weight, bias, conv.stride, 0, conv.dilation, conv.module.groups)
    return out[:, :, :h, :w].permute(0, 2, 3, 1).contiguous()


def _padded_numel(value: Value) -> int:
    return value.channels * (value.axes[0].length + 2 * value.margin) * (value.axes[1].length + 2 * value.margin)


def _position_major(tensor: Tensor, layout: str, margin: int = 0) -> Tensor:
    """(N, H + 2m, W + 2m, C), contiguous: a map in ``layout`` position by position (channels last,
    so that a position is a row to gather), with a margin of m zeros."""
    rows = tensor if layout == NHWC else tensor.permute(0, 2, 3, 1)
    return (F.pad(rows, (0, 0, margin, margin, margin, margin)) if margin else rows).contiguous()


def _in_layout(rows: Tensor, layout: str) -> Tensor:
    """A position-major (N, h, w, C) map as its node reads it: NCHW (channels-last strides) or NHWC."""
    return rows if layout == NHWC else rows.permute(0, 3, 1, 2)
