"""Exact incremental walks for heads that mix positions locally before a global average pool.

There are two exact ways to walk such a head, and the generic path is a third; their costs differ
by orders of magnitude with the body, the map and the number of permutations K, so
:func:`incremental_walk` estimates each in flops per image and takes the cheapest:

* generic: the whole head on every prefix, K (n+1) full evaluations of the body;
* recompute (:mod:`.recompute`): at each of the K n steps, the body on the boxes that the
  entering position can change only (3 x 3 of 7 x 7 behind one 3 x 3 convolution), nothing up
  front; the boxes grow with every convolution stacked, up to the whole map;
* table (:mod:`.table`): the body once on each of the 2^(Py Px) maps that show every index of the
  pool's input each state of its Py x Px footprint, up front; then per step only 2 J rows of the
  front output, for the J footprints that hold the entering position.

Recomputing wins for few permutations, the table for many: on EfficientNet-Lite0 cut after
``blocks.5`` (7 x 7, one 3 x 3 depthwise conv, then 1280 channels into 1000 classes) the table's
512 maps and projection cost the flops of about 80 permutations recomputed, after which a step costs
18 rows of 1000 logits instead of 9 positions of the block and conv_head and a 1280 x 1000 product.
A table grows as 2^(Py Px): beyond :data:`~.table.MAX_BITS` it is not considered.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from shapcam_ext.game import Game
from shapcam_ext.paths.pattern import HeadPattern
from shapcam_ext.paths.protocol import Evaluator
from shapcam_ext.paths.receptive import BodyPlan, plan_body
from shapcam_ext.paths.recompute import RecomputeWalk
from shapcam_ext.paths.running import RunningWalk, tail_bytes_per_row
from shapcam_ext.paths.table import MAX_BITS, FootprintStates, FootprintSteps, footprint_bits

GENERIC, RECOMPUTE, TABLE = "generic", "recompute", "table"
# The recompute walk gathers and scatters its boxes and runs each layer once per step on K rows
# rather than once on K (n + 1) rows: on ConvNeXt-T's last block at 7 x 7 (boxes of the whole map,
# 2% fewer flops than the generic path) it ran 0.92-1.1x as fast as the generic path; so it must
# promise 10% more to be chosen. (On Lite0 blocks.4 it beat its flops: 1.9x against 1.3x.)
RECOMPUTE_OVERHEAD = 1.1


@dataclass
class Estimate:
    """The walks' costs for a run, before any is built.

    plan: the body's plan. start: the front output of the empty coalition.
    costs: flops per image of each walk available (GENERIC, RECOMPUTE, TABLE).
    states: the table's layout, when TABLE is among the costs.
    """

    plan: BodyPlan
    start: Tensor
    costs: dict[str, float]
    states: Optional[FootprintStates]


def estimate(pattern: HeadPattern, players: Tensor, base_map: Tensor, held: tuple, permutations: int,
             memory_budget: int) -> Optional[Estimate]:
    """What each walk would cost for ``permutations`` permutations of these images, or None when a
    runtime shape does not fit the pattern. A table larger than ``memory_budget`` is not costed."""
    plan = plan_body(pattern, players, base_map, held)
    if plan is None:
        return None
    start = pattern.front(plan.base[plan.output])
    output = plan.values[plan.output]
    width = math.prod(start.shape[1:])
    linear = pattern.linear
    if start.shape[0] != players.shape[0] or (
            linear.in_features != output.channels or start.dim() != 2 if linear is not None
            else width != output.channels):
        return None
    costs = _costs(plan, width, linear is not None, permutations)
    states = None
    if TABLE in costs:
        states = FootprintStates(output.axes, plan.size, players.device)
        costs[TABLE] += states.build_flops(plan.body_flops(pre=False), output.channels, width, linear is not None)
        if states.table_bytes(players.shape[0], output.channels, width, players.element_size()) > memory_budget:
            del costs[TABLE]
    return Estimate(plan, start, costs, states)


def incremental_walk(game: Game, pattern: HeadPattern) -> Optional[Evaluator]:
    """The cheapest exact walk for the game's permutations, or None when the generic path is
    cheaper or a runtime shape does not fit."""
    found = estimate(pattern, game.players, game.base_map(), game.held, game.permutations, game.planner.budget)
    if found is None:
        return None
    choice = choose(found.costs)
    if choice == GENERIC:
        return None
    plan, start, states = found.plan, found.start, found.states
    tail_row = tail_bytes_per_row(pattern.tail, start, game)
    if choice == RECOMPUTE:
        return RecomputeWalk(game, plan, pattern.front, pattern.tail, start, tail_row)
    table = states.build(plan, pattern.linear, game.planner)
    b, n, width = game.batch, game.n, table.shape[-1]
    per_permutation = b * (n + 1) * (tail_row + 3 * width * table.element_size()) + b * n * states.reach * 6 * 8
    return RunningWalk("incremental-table", game, start, FootprintSteps(states, table), pattern.tail, per_permutation)


def choose(costs: dict[str, float]) -> str:
    """The cheapest of the walks costed (flops per image)."""
    return min(costs, key=costs.get)


def _costs(plan: BodyPlan, width: int, projected: bool, permutations: int) -> dict[str, float]:
    """Flops per image of walking ``permutations`` permutations each way; the table's without its
    build, which needs its layout (and only when its footprints are small enough)."""
    output = plan.values[plan.output]
    n = plan.size[0] * plan.size[1]
    front = output.channels * output.area + (2 * output.channels * width if projected else 0)
    boxes = sum(v.flops * v.axes[0].box * v.axes[1].box for v in plan.values.values() if not v.pre)
    # the walks also pay for the plan (two bodies) and their check on one probe permutation
    walked = permutations + 1
    costs = {GENERIC: permutations * (n + 1) * (plan.body_flops() + front),
             RECOMPUTE: 2 * plan.body_flops() + walked * n * (boxes + front) * RECOMPUTE_OVERHEAD}
    if footprint_bits(output.axes, plan.size) <= MAX_BITS:
        # a step adds and removes one row per footprint that holds the entering position
        costs[TABLE] = 2 * plan.body_flops() + walked * n * 2 * output.axes[0].box * output.axes[1].box * width
    return costs
