"""Recomputing the changed boxes: exact steps for any locally mixing body.

All K permutations add their t-th position at step t. For every image and permutation (a row),
the walk keeps the current map of each value that some op reads beyond the box it changes in
(a convolution's input, the narrower input of a residual add, the pool's input). At each step it
recomputes every other value of the body on its box only (see :mod:`.receptive`): a convolution
from the box of its input that it reads, a position-wise op from its inputs on the same box.
Values position-wise in the activation are read from their kept and baseline maps, by whether
each position is in. The front and the tail then run on the pool's input, once per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from shapcam_ext.game import Game
from shapcam_ext.ops import permutation_ranks
from shapcam_ext.paths.pattern import NHWC
from shapcam_ext.paths.protocol import Evaluator
from shapcam_ext.paths.receptive import BodyPlan, Value

PRE, STATE, FRESH, MAP, ROWS = "pre", "state", "fresh", "map", "rows"


@dataclass(frozen=True)
class _Read:
    """How a recomputed node reads one input at a step.

    kind: PRE (kept/baseline maps of a position-wise value), STATE (a kept map), FRESH (the
        input's box, just recomputed, is the node's box), MAP (a held map per image), ROWS (a held
        value per image without positions).
    index: (n, L) flat indices of the box read in the source's (padded) map, per entering
        position; None when the whole map is read.
    size: the box's (height, width).
    layout: the source's layout.
    """

    kind: str
    index: Optional[Tensor] = None
    size: tuple[int, int] = (0, 0)
    layout: str = "nchw"


class RecomputeWalk(Evaluator):
    """Walks a locally mixing body by recomputing, at each step, the boxes that can change.

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
        self.kept = {plan.output}
        self.reads: dict[fx.Node, dict[fx.Node, _Read]] = {}
        y, x = torch.arange(h * w, device=device) // w, torch.arange(h * w, device=device) % w
        self.starts = {node: (v.axes[0].starts(h, device)[y], v.axes[1].starts(w, device)[x])
                       for node, v in plan.values.items()}
        for node in self.order:
            self.reads[node] = self._reads(node, plan.values[node])
            self.kept |= {u for u, read in self.reads[node].items() if read.kind == STATE}
        self.writes = {node: self._unless_whole(self._box(node, node, (0, 0), _box_size(plan.values[node])), node)
                       for node in self.kept}
        self.margins = sorted({plan.values[u].margin for reads in self.reads.values()
                               for u, read in reads.items() if read.kind == PRE})
        # a position-wise value's kept maps of the B images, then its baseline maps
        self.padded = {u: torch.cat([_position_major(m[u], read.layout, plan.values[u].margin)
                                     for m in (plan.keep, plan.base)])
                       for reads in self.reads.values() for u, read in reads.items() if read.kind == PRE}
        self.maps = {u: _position_major(plan.keep[u], read.layout)
                     for reads in self.reads.values() for u, read in reads.items() if read.kind == MAP}
        self.empty = game.scorer(game.targets, start if tail is None else tail(start), 1).double()  # (B, 1)
        element = start.element_size()
        state = sum(_padded_numel(plan.values[u]) for u in self.kept)
        step = sum(self._channels(u, node) * r.index.shape[1] * (3 if r.kind == PRE else 1)
                   for node, reads in self.reads.items() for u, r in reads.items() if r.index is not None)
        step += sum(v.channels * _box_size(v)[0] * _box_size(v)[1] for v in map(plan.values.get, self.order))
        per_step = step * element + tail_row_bytes + start[0].numel() * element
        if game.planner.differentiable:
            # The backward recomputes the round and keeps every step's values until it runs back
            # through them: the boxes, the tail, and the kept maps a convolution reads whole (a
            # step then writes a new one rather than into the one kept).
            whole = sum(_padded_numel(plan.values[u]) for reads in self.reads.values() for u, r in reads.items()
                        if r.kind == STATE and r.index is None)
            per_step = h * w * (per_step + whole * element)
        super().__init__(game, b * (state * element + per_step) + b * (h * w + 1) * 8)

    def _channels(self, source: fx.Node, node: fx.Node) -> int:
        """Channels of an input that ``node`` reads on a box (a held map has ``node``'s size)."""
        value = self.plan.values.get(source)
        return value.channels if value is not None else self.plan.keep[source][0].numel() // self.plan.values[node].area

    def _reads(self, node: fx.Node, value: Value) -> dict[fx.Node, _Read]:
        """How ``node`` reads each of its inputs that is not a constant."""
        plan = self.plan
        size = _box_size(value)
        if value.conv is not None:
            source = node.args[0]
            conv = value.conv
            shift = tuple(-conv.pad[a] for a in (0, 1))
            span = (conv.span(0, size[0]), conv.span(1, size[1]))
            index = self._box(node, source, shift, span, conv.stride)
            if plan.values[source].pre:
                return {source: _Read(PRE, index, span, plan.values[source].layout)}
            return {source: _Read(STATE, self._unless_whole(index, source), span, plan.values[source].layout)}
        reads = {}
        for source in node.all_input_nodes:
            other = plan.values.get(source)
            if other is None:
                kind = value.statics[source]
                if kind == MAP:
                    reads[source] = _Read(MAP, self._box(node, None, (0, 0), size), size, value.layout)
                elif kind == ROWS:
                    reads[source] = _Read(ROWS)
            elif other.pre:
                reads[source] = _Read(PRE, self._box(node, source, (0, 0), size), size, other.layout)
            elif other.axes != value.axes:
                index = self._unless_whole(self._box(node, source, (0, 0), size), source)
                reads[source] = _Read(STATE, index, size, other.layout)
            else:
                reads[source] = _Read(FRESH)
        return reads

    def _box(self, node: fx.Node, source: Optional[fx.Node], shift: tuple[int, int], size: tuple[int, int],
             stride: tuple[int, int] = (1, 1)) -> Tensor:
        """(n, L) flat indices into ``source``'s padded map (its unpadded map for None: a held map of
        ``node``'s size) of the box that starts at ``node``'s box start * stride + shift."""
        value = self.plan.values[node if source is None else source]
        margin = 0 if source is None else value.margin
        width = value.axes[1].length + 2 * margin
        first_y, first_x = self.starts[node]
        ys = (first_y * stride[0] + shift[0] + margin)[:, None] + torch.arange(size[0], device=first_y.device)
        xs = (first_x * stride[1] + shift[1] + margin)[:, None] + torch.arange(size[1], device=first_y.device)
        return (ys[:, :, None] * width + xs[:, None, :]).flatten(1)

    def _unless_whole(self, index: Tensor, source: fx.Node) -> Optional[Tensor]:
        """None when ``index`` reads (or writes) the whole of ``source``'s kept map at every step:
        the map itself is then the box."""
        value = self.plan.values[source]
        whole = torch.arange(_padded_numel(value) // value.channels, device=index.device)
        return None if index.shape[1] == len(whole) and bool((index == whole).all()) else index

    def values(self, perms: Tensor) -> Tensor:
        plan = self.plan
        k, n = perms.shape
        h, w = plan.size
        ranks = permutation_ranks(perms).view(k, 1, h, w)
        padded_ranks = {m: F.pad(ranks, (m, m, m, m), value=n).flatten(1) for m in self.margins}
        states = {u: _position_major(plan.base[u], plan.values[u].layout, plan.values[u].margin).repeat_interleave(k, 0)
                  for u in self.kept}
        rows = {u: plan.keep[u].repeat_interleave(k, 0) for reads in self.reads.values()
                for u, read in reads.items() if read.kind == ROWS}
        out = torch.empty(self.game.batch, k, n + 1, dtype=torch.float64, device=perms.device)
        out[:, :, 0] = self.empty
        output, margin = plan.output, plan.values[plan.output].margin
        for t in range(n):
            step = _Step(self, perms[:, t], t, k, states, padded_ranks, rows)
            for node in self.order:
                patch = step.patch(node)
                if node in self.kept:
                    step.write(node, patch)
            g = states[output]
            if margin:
                g = g[:, margin:g.shape[1] - margin, margin:g.shape[2] - margin]
            front = self.front(_in_layout(g, plan.values[output].layout))
            out[:, :, t + 1] = self.game.scorer(self.game.targets, front if self.tail is None else self.tail(front), k)
        return out


class _Step:
    """One step of a RecomputeWalk: the entering positions, and the boxes recomputed so far."""

    def __init__(self, walk: RecomputeWalk, positions: Tensor, t: int, k: int, states: dict, padded_ranks: dict,
                 rows: dict):
        self.walk, self.positions, self.t, self.k = walk, positions, t, k
        self.states, self.padded_ranks, self.rows = states, padded_ranks, rows
        self.fresh: dict[fx.Node, Tensor] = {}

    def patch(self, node: fx.Node) -> Tensor:
        """``node``'s value on its box, for every row."""
        plan, walk = self.walk.plan, self.walk
        value = plan.values[node]
        reads = walk.reads[node]
        if value.conv is not None:
            (source, read), = reads.items()
            patch = value.conv(self._read(source, read))
        else:
            inputs = {source: self._read(source, read) for source, read in reads.items()}
            args, kwargs = fx.map_arg((node.args, node.kwargs), lambda u: inputs[u] if u in inputs else plan.keep[u])
            patch = plan.runner.call(node, args, kwargs)
        self.fresh[node] = patch
        return patch

    def write(self, node: fx.Node, patch: Tensor) -> None:
        """Stores ``node``'s box into its kept map."""
        index = self.walk.writes[node]
        rows = _position_major(patch, self.walk.plan.values[node].layout)
        if index is None:
            self.states[node] = rows
            return
        state = self.states[node]
        flat = _flat_index(index[self.positions], state, per_row=True)
        target, source = state.view(-1, state.shape[-1]), rows.view(-1, rows.shape[-1])
        if torch.is_grad_enabled():  # a convolution may have kept this map for its backward: write a new one
            self.states[node] = target.index_copy(0, flat, source).view_as(state)
        else:
            target.index_copy_(0, flat, source)

    def _read(self, source: fx.Node, read: _Read) -> Any:
        if read.kind == FRESH:
            return self.fresh[source]
        if read.kind == ROWS:
            return self.rows[source]
        if read.kind == STATE:
            state = self.states[source]
            rows = state if read.index is None else _gather(state, read.index[self.positions], read.size, True)
            return _in_layout(rows, read.layout)
        if read.kind == MAP:
            return _in_layout(_gather(self.walk.maps[source], read.index[self.positions], read.size, False),
                              read.layout)
        maps = self.walk.padded[source]  # PRE: each position's kept or baseline value, by whether it is in
        index = read.index[self.positions]
        out = self.padded_ranks[self.walk.plan.values[source].margin].gather(1, index) > self.t  # (K, L)
        images = maps.shape[0] // 2
        flat = _flat_index(index, maps[:images], False).view(images, self.k, -1) + out * (maps[:images].numel()
                                                                                     // maps.shape[-1])
        rows = maps.view(-1, maps.shape[-1]).index_select(0, flat.flatten())
        return _in_layout(rows.view(-1, *read.size, maps.shape[-1]), read.layout)


def _box_size(value: Value) -> tuple[int, int]:
    return value.axes[0].box, value.axes[1].box


def _padded_numel(value: Value) -> int:
    return value.channels * (value.axes[0].length + 2 * value.margin) * (value.axes[1].length + 2 * value.margin)


def _position_major(tensor: Tensor, layout: str, margin: int = 0) -> Tensor:
    """(N, H + 2m, W + 2m, C), contiguous: a map in ``layout`` position by position (channels last,
    so that a box is a gather of whole rows, and convolutions get their fastest layout), with a
    margin of m zeros."""
    rows = tensor if layout == NHWC else tensor.permute(0, 2, 3, 1)
    return (F.pad(rows, (0, 0, margin, margin, margin, margin)) if margin else rows).contiguous()


def _in_layout(rows: Tensor, layout: str) -> Tensor:
    """A position-major (N, h, w, C) box as its node reads it: NCHW (channels-last strides) or NHWC."""
    return rows if layout == NHWC else rows.permute(0, 3, 1, 2)


def _flat_index(index: Tensor, maps: Tensor, per_row: bool) -> Tensor:
    """Row indices into ``maps`` (N, Hp, Wp, C) viewed as (N * Hp * Wp, C) of the (K, L) box
    positions ``index``, for every row of the walk (image-major): rows have their own maps
    (``per_row``: N = B * K) or share their image's (N = B)."""
    k = index.shape[0]
    positions = maps.shape[1] * maps.shape[2]
    first = torch.arange(maps.shape[0], device=index.device).view(-1, k if per_row else 1, 1) * positions
    return (first + index.view(1, k, -1)).flatten()


def _gather(maps: Tensor, index: Tensor, size: tuple[int, int], per_row: bool) -> Tensor:
    """(B * K, h, w, C): the (K, L) box positions ``index`` of every row (see ``_flat_index``)."""
    rows = maps.view(-1, maps.shape[-1]).index_select(0, _flat_index(index, maps, per_row))
    return rows.view(-1, *size, maps.shape[-1])
