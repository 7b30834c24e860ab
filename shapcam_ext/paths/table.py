"""Tabulated footprint states: exact steps for bodies whose footprints are small.

When each index q of the pool's input depends on few activation positions (its footprint: 3 x 3
behind one 3 x 3 convolution), q's value takes one value per state of its footprint, 2^9 at
most there. They are all computed up front, from at most 2^(Py*Px) maps of the whole body, where
(Py, Px) is the footprint's size: in map m, position (y, x) is kept when bit
(y mod Py) * Px + (x mod Px) of m is set, so within any footprint every position has a bit of its
own and every map gives every q one of its states. Each state's share of the front output
(through the Linear after the pool, when there is one) is a table row; at a step, the front
output changes by the new-minus-old rows of the few q whose footprint holds the entering
position, summed without materialising them (``embedding_bag``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shapcam_ext.paths.receptive import Axis, BodyPlan
from shapcam_ext.memory import MemoryPlanner, cost_per_unit, recomputed

MAX_BITS = 16  # 65536 maps of the body; a larger table never pays for itself


class FootprintStates:
    """The table's layout: its rows per index q of the pool's input, the maps of the body that
    fill them, and the q whose footprint each activation position enters.

    Row ``offset[q] + s`` holds q's share when the footprint positions in bitmask s (bit i: the
    i-th footprint position of q in raster order) are in; the last row is zero. Geometry only,
    so that the table's cost is known before it is built.

    Args:
        axes: the (y, x) axes of the pool's input. size: the activation's (H, W).
    """

    def __init__(self, axes: tuple[Axis, Axis], size: tuple[int, int], device: torch.device):
        (ay, ax), (h, w) = axes, size
        periods = _periods(axes, size)
        bit = ((torch.arange(h)[:, None] % periods[0]) * periods[1] + torch.arange(w)[None, :] % periods[1]).flatten()
        footprints = []
        for qy in range(ay.length):
            ys = _inside(ay.footprint(torch.tensor(qy)), h)
            for qx in range(ax.length):
                xs = _inside(ax.footprint(torch.tensor(qx)), w)
                footprints.append([y * w + x for y in ys for x in xs])
        self.cells = len(footprints)
        n = h * w
        offsets, masks, entered = [0], [], [[] for _ in range(n)]
        for q, positions in enumerate(footprints):
            states = torch.arange(2 ** len(positions))[:, None] >> torch.arange(len(positions)) & 1
            masks.append((states << bit[positions]).sum(1))
            offsets.append(offsets[-1] + 2 ** len(positions))
            for i, p in enumerate(positions):
                entered[p].append((q, 2 ** i))
        self.rows = offsets[-1]
        self.reach = max(len(e) for e in entered)  # footprints a position is in, at most
        cell = torch.full((n, self.reach), self.cells, dtype=torch.long)  # self.cells: a cell of zero rows
        added = torch.zeros(n, self.reach, dtype=torch.long)
        for p, pairs in enumerate(entered):
            cell[p, :len(pairs)] = torch.tensor([q for q, _ in pairs], dtype=torch.long)
            added[p, :len(pairs)] = torch.tensor([b for _, b in pairs], dtype=torch.long)
        self.masks, row_map = torch.cat(masks).unique(return_inverse=True)  # the maps to evaluate; row -> map
        self.order = row_map.argsort()  # rows grouped by map
        # where each map's rows start in that order
        self.first_row = torch.searchsorted(row_map[self.order], torch.arange(len(self.masks) + 1)).tolist()
        self.row_map, self.order = row_map.to(device), self.order.to(device)
        self.row_cell = torch.repeat_interleave(torch.arange(self.cells), torch.tensor(offsets).diff()).to(device)
        self.bit = bit.view(h, w).to(device)
        self.cell, self.added = cell.to(device), added.to(device)
        self.offsets = torch.tensor(offsets, device=device)  # offsets[cells] = rows: the zero row

    def build_flops(self, body_flops: int, channels: int, width: int, projected: bool) -> int:
        """Flops of building the table, per image: the body on every map, then the projection."""
        return len(self.masks) * body_flops + (2 * self.rows * channels * width if projected else 0)

    def table_bytes(self, batch: int, channels: int, width: int, element_size: int) -> int:
        return batch * (self.rows + 1) * (channels + width) * element_size

    def build(self, plan: BodyPlan, linear: Optional[nn.Linear], planner: MemoryPlanner) -> Tensor:
        """(B, rows + 1, D) every state's share of the front output; the last row zero.

        The maps are evaluated in chunks under the planner's budget; each chunk fills the rows whose
        states it holds. For a differentiable map the backward recomputes each chunk, so the graph
        keeps the table's rows, not the body's values on every map.
        """
        def run(maps: int):
            keep = self._keep(self.masks[:maps])
            return lambda: plan.evaluate(keep)

        fixed, per_map = cost_per_unit(run)
        chunk = planner.units(per_map, fixed, what="the body on one map of the footprint table")
        shares = None
        for m0 in range(0, len(self.masks), chunk):
            m1 = min(m0 + chunk, len(self.masks))
            g = recomputed(plan.evaluate, self._keep(self.masks[m0:m1]))
            g = g.reshape(-1, m1 - m0, g.shape[1], self.cells).transpose(2, 3)  # (B, maps, cells, C)
            if shares is None:
                shares = g.new_empty(g.shape[0], self.rows + 1, g.shape[-1])
            rows = self.order[self.first_row[m0]:self.first_row[m1]]
            shares[:, rows] = g[:, self.row_map[rows] - m0, self.row_cell[rows]]
        shares[:, -1] = 0
        shares /= self.cells  # the global average pool
        return shares if linear is None else F.linear(shares, linear.weight)

    def _keep(self, masks: Tensor) -> Tensor:
        """(M, H, W): the positions each map keeps."""
        return (masks.to(self.bit.device).view(-1, 1, 1) >> self.bit & 1).bool()


class FootprintSteps:
    """The change of the front output at each step, from a footprint table: (B, K, n + 1, D), with
    step t at [:, :, t + 1] (see :class:`~.running.RunningWalk`)."""

    def __init__(self, states: FootprintStates, table: Tensor):
        self.states, self.table = states, table.flatten(0, 1)
        self.batch, self.width = table.shape[0], table.shape[-1]
        self.image_offset = torch.arange(self.batch, device=table.device) * table.shape[1]
        self.signs = torch.tensor([1.0, -1.0], dtype=table.dtype, device=table.device).repeat(states.reach)

    def __call__(self, perms: Tensor) -> Tensor:
        s = self.states
        k, n = perms.shape
        cell, added = s.cell[perms], s.added[perms]  # (K, n, J): the footprints each step enters, its bit in each
        state = perms.new_zeros(k, s.cells + 1)  # every cell's footprint state (the last: a cell of zero rows)
        before = torch.empty_like(cell)
        for t in range(n):
            before[:, t] = state.gather(1, cell[:, t])
            state.scatter_(1, cell[:, t], before[:, t] | added[:, t])
        old = s.offsets[cell] + before
        new = old + added
        index = torch.stack([new, old], -1)  # (K, n, J, 2)
        index = torch.cat([index[:, :1], index], 1).view(1, k * (n + 1), -1)  # any bag for [:, :, 0]
        index = index + self.image_offset.view(-1, 1, 1)
        weights = self.signs.expand(index.shape).reshape(-1, index.shape[-1])
        out = F.embedding_bag(index.view(-1, index.shape[-1]), self.table, per_sample_weights=weights, mode="sum")
        return out.view(self.batch, k, n + 1, self.width)


def footprint_bits(axes: tuple[Axis, Axis], size: tuple[int, int]) -> int:
    """Bits of the maps that fill the table: 2 ** bits maps at most."""
    periods = _periods(axes, size)
    return periods[0] * periods[1]


def _periods(axes: tuple[Axis, Axis], size: tuple[int, int]) -> list[int]:
    """Per axis, the footprint's extent in activation positions (at most the map's)."""
    return [min(a.before + a.after + 1, length) for a, length in zip(axes, size)]


def _inside(span: tuple[Tensor, Tensor], length: int) -> range:
    first, last = (int(v) for v in span)
    return range(max(first, 0), min(last, length - 1) + 1)
