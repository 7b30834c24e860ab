"""The pooled walks: heads that pool a position-wise body, walked without running them on masked maps.

Along a permutation every coalition's head input is the previous one plus a tabulated change:

* global pool: player p adds ``w_q (g_keep - g_base)[:, q]`` to the pooled vector, whatever the
  coalition, q being the position p fills (a token of a transformer) and w_q its weight in the
  pool (1 / N for an average over N positions); projected through the Linear that follows, when
  there is one;
* local pool of small windows: p changes only its window's pooled cell, by an amount that
  depends on which of its window-mates are already in. Every (cell, window state, entering
  slot) change is tabulated once and projected through the first Linear layer.

The vectors of every prefix are running sums of those changes; only the rest of the head
(the tail) runs per coalition, on vectors instead of C x h x w maps. When nothing follows a
pooled Linear and the target is a class score, ``ops.linear_walk_`` walks the logits itself.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F

from shapcam_ext import ops
from shapcam_ext.game import Game
from shapcam_ext.memory import cost_per_unit
from shapcam_ext.ops import permutation_ranks
from shapcam_ext.paths import differentiable
from shapcam_ext.paths.pattern import NHWC, HeadPattern, body_positions, by_position, pool_weights
from shapcam_ext.paths.receptive import NodeRunner
from shapcam_ext.paths.running import RunningWalk, TableSteps, tail_bytes_per_row
from shapcam_ext.statistics import RunningEstimate
from shapcam_ext.targets import class_targets


class LinearWalk(RunningWalk):
    """Pooled head ending in its Linear, class targets: ``ops.linear_walk_`` walks the logits.

    ``values`` (the running sums in Python) serves the checks; the run accumulates with the op.
    A differentiable map walks twice per round: the in-place walk for the standard errors and the
    stop checks, and the differentiable walk (:mod:`.differentiable`), a function of ``start`` and
    ``table``, which are functions of the activation, the baseline, the body and the Linear.
    With logit targets the game is additive: each position adds its own row of the table to the
    logits whatever the coalition, so that row is its Shapley value, in one pass
    (:meth:`exact_values`, path "additive"); the self-check still walks it against the head.
    """

    def __init__(self, game: Game, start: torch.Tensor, table: torch.Tensor):
        classes = class_targets(game.targets)
        b, n, m = table.shape
        self.softmax = classes[0].softmax
        super().__init__("pooled-linear" if self.softmax else "additive", game, start,
                         TableSteps(table, _identity_rows), None, ops.linear_walk_bytes(b, 1, n, m))
        self.table = table
        self.classes = torch.tensor([t.category for t in classes], device=start.device)
        if game.planner.differentiable:  # the differentiable walk runs beside the in-place one
            orders = torch.arange(n, device=start.device).expand(2, n)
            with torch.no_grad():
                walked = cost_per_unit(lambda k: partial(self._sums, orders[:k]))[1]
            self.bytes_per_permutation = max(self.bytes_per_permutation, walked)

    def accumulate(self, perms: torch.Tensor, estimate: RunningEstimate) -> None:
        if estimate.differentiable:
            estimate.add_sums(self._sums(perms))
        ops.linear_walk_(self.start.detach(), self.table.detach(), perms, self.classes, self.softmax, estimate.total,
                         estimate.total_sq, estimate.unit_size)

    def exact_values(self) -> Optional[torch.Tensor]:
        if self.softmax:
            return None
        n = self.table.shape[1]
        return self.table.gather(2, self.classes.view(-1, 1, 1).expand(-1, n, 1)).squeeze(2).double()

    def _sums(self, perms: torch.Tensor) -> torch.Tensor:
        return differentiable.linear_walk(self.start, self.table, perms, self.classes, self.softmax, torch.float64)


def _identity_rows(perms: torch.Tensor) -> torch.Tensor:
    return perms


def pooled_walk(game: Game, pattern: HeadPattern) -> Optional[RunningWalk]:
    """The walk of a position-wise body before a global or local pool, or None if it does not fit."""
    b, held = game.batch, game.held
    runner = NodeRunner(pattern.body, keep_values=True)
    keep = runner.record(game.head_input(game.players), *held)
    base = runner.record(game.head_input(game.base_map()), *held)
    output = next(n for n in reversed(pattern.body.graph.nodes) if n.op == "output")
    g_keep, g_base = keep[output], base[output]
    start = pattern.front(g_base)
    if body_positions(pattern, keep, b) is None or start.shape[0] != b:
        return None
    channels_last = pattern.activation_layout == NHWC
    if pattern.pool == "global":
        table, step_rows = _pooled_table(pattern, g_keep, g_base, start, game.grid.player_positions(channels_last))
    elif game.grid.positions_are_players(channels_last):
        table, step_rows = _window_table(pattern, g_keep, g_base, start, game.planner.budget)
    else:
        return None
    if table is None:
        return None
    n = game.n
    if pattern.pool == "global" and pattern.tail is None and pattern.linear is not None \
            and class_targets(game.targets) is not None:
        return LinearWalk(game, start, table)
    per_row = tail_bytes_per_row(pattern.tail, start, game) + 3 * table.shape[-1] * 4
    path = "pooled" if pattern.pool == "global" else "local-pool-linear"
    return RunningWalk(path, game, start, TableSteps(table, step_rows), pattern.tail, b * (n + 1) * per_row)


def _pooled_table(pattern: HeadPattern, g_keep, g_base, start, positions: Optional[torch.Tensor]):
    """(B, n, D) change of the front output when each player joins, and the step-row map; (None,
    None) when the players or the pool do not fit.

    A player changes its own position of the pool's input, and the pooled vector by that change
    times the position's weight in the pool (1 / N in an average; 0 for a token the pool leaves
    out: a class token, or every patch token when the pool picks the class token).
    """
    weights = pool_weights(pattern, g_keep)
    if positions is None or weights is None:
        return None, None
    change = by_position(g_keep - g_base, pattern.pooled_layout)[:, positions]  # (B, n, C)
    change = (change * weights[positions, None]).contiguous()  # the pooled vector's change
    c = change.shape[-1]
    if pattern.linear is not None:
        if pattern.linear.in_features != c or start.dim() != 2:
            return None, None
        change = F.linear(change, pattern.linear.weight)
    elif math.prod(start.shape[1:]) != c:
        return None, None
    return change, _identity_rows


def _window_table(pattern: HeadPattern, g_keep, g_base, start, memory_budget: int):
    """Changes of the first Linear's pre-activation for every (cell, window state, entering slot).

    Row ``q * P + pair[m, i]`` holds the change when slot i of cell q joins while the slots in
    bitmask m are in; the last row, zero, serves positions outside every window.
    """
    kh, kw = pattern.window
    slots = kh * kw
    b, c, h, w = g_keep.shape
    hp, wp = h // kh, w // kw
    cells = hp * wp
    linear = pattern.linear
    pairs = [(m, i) for m in range(2 ** slots) for i in range(slots) if not m >> i & 1]
    rows = cells * len(pairs) + 1
    if hp == 0 or wp == 0 or b * rows * linear.out_features * g_keep.element_size() > memory_budget:
        return None, None
    slot_bit = 2 ** ((torch.arange(h) % kh)[:, None] * kw + torch.arange(w) % kw).to(g_keep.device)
    pooled = torch.stack([  # (B, 2**slots, C, hp, wp): each cell's pooled value in every window state
        pattern.local_pool(torch.where(slot_bit & m != 0, g_keep, g_base)) for m in range(2 ** slots)], 1)
    if pooled.shape[-2:] != (hp, wp):
        return None, None
    # Each cell's share of the Linear's output in each window state; a step's change is a difference.
    shares = _through_linear(pooled.flatten(3), linear.weight, _adaptive_mixing(pattern, linear.weight, hp, wp))
    if shares is None or start.dim() != 2:
        return None, None
    grown = torch.tensor([m | 1 << i for m, i in pairs], device=g_keep.device)
    before = torch.tensor([m for m, _ in pairs], device=g_keep.device)
    change = (shares[:, :, grown] - shares[:, :, before]).reshape(b, cells * len(pairs), -1)
    table = torch.cat([change, change.new_zeros(b, 1, change.shape[-1])], 1)
    pair_index = torch.full((2 ** slots, slots), -1, dtype=torch.long)
    for k, (m, i) in enumerate(pairs):
        pair_index[m, i] = k
    return table, _WindowSteps(h, w, kh, kw, pair_index.to(g_keep.device), len(pairs))


def _adaptive_mixing(pattern: HeadPattern, weight: torch.Tensor, hp: int, wp: int) -> Optional[torch.Tensor]:
    """(S, cells): how much each pooled cell feeds each output of the adaptive pool; None when
    there is none, or it is the identity at this size."""
    if pattern.adaptive is None:
        return None
    cells = hp * wp
    eye = torch.eye(cells, dtype=weight.dtype, device=weight.device)
    mixing = pattern.adaptive(eye.view(cells, 1, hp, wp)).flatten(1).T
    return None if torch.equal(mixing, eye) else mixing


def _through_linear(pooled: torch.Tensor, weight: torch.Tensor, mixing: Optional[torch.Tensor]):
    """(B, M, C, cells) pooled grids -> (B, cells, M, O): each cell's term of the Linear's output
    (bias excluded), or None if the Linear does not fit the pooled grid.

    The weight's input index is (channel, cell) with the cell fastest, so each cell's (O, C) block
    is strided; it is re-laid out a few MB of rows at a time, which keeps the copy in cache.
    """
    b, m, c, cells = pooled.shape
    size = cells if mixing is None else mixing.shape[0]
    if weight.shape[1] != c * size:
        return None
    out = weight.shape[0]
    x = pooled.permute(3, 0, 1, 2).reshape(cells, b * m, c).contiguous()  # strided operands are slow
    result = pooled.new_empty(cells, b * m, out)
    rows = max(1, (16 << 20) // (c * size * weight.element_size()))
    for o0 in range(0, out, rows):
        part = weight[o0:o0 + rows].view(-1, c, size)
        if mixing is not None:
            part = (part.reshape(-1, size) @ mixing).view(-1, c, cells)
        result[:, :, o0:o0 + rows] = torch.bmm(x, part.permute(2, 1, 0).contiguous())
    return result.view(cells, b, m, out).permute(1, 0, 2, 3)


class _WindowSteps:
    """Maps permutations to the table rows of their steps (see ``_window_table``)."""

    def __init__(self, h: int, w: int, kh: int, kw: int, pair_index: torch.Tensor, pairs: int):
        device = pair_index.device
        y, x = torch.arange(h, device=device).repeat_interleave(w), torch.arange(w, device=device).repeat(h)
        hp, wp = h // kh, w // kw
        covered = (y < hp * kh) & (x < wp * kw)
        cell = (y // kh) * wp + x // kw
        self.slot = (y % kh) * kw + x % kw
        # mates[p, j]: the position in slot j of p's window (p itself outside every window)
        dy, dx = torch.arange(kh * kw, device=device) // kw, torch.arange(kh * kw, device=device) % kw
        mates = ((y - y % kh)[:, None] + dy) * w + (x - x % kw)[:, None] + dx
        self.mates = torch.where(covered[:, None], mates, torch.arange(h * w, device=device)[:, None])
        self.base_row = torch.where(covered, cell * pairs, -1)
        self.zero_row = hp * wp * pairs
        self.pair_index, self.bits = pair_index, 2 ** torch.arange(kh * kw, device=device)

    def __call__(self, perms: torch.Tensor) -> torch.Tensor:
        ranks = permutation_ranks(perms)  # (K, n)
        state = ((ranks[:, self.mates] < ranks[:, :, None]) * self.bits).sum(-1)  # mates already in
        rows = torch.where(self.base_row >= 0, self.base_row + self.pair_index[state, self.slot], self.zero_row)
        return rows.gather(1, perms)
