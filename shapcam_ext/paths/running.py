"""The walk the tabulated paths share: running sums of the front output along each permutation.

The tabulated paths walk running sums: along a permutation, the front output of each prefix (the
pooled vector, or the logits of the Linear after the pool) is the empty coalition's plus the
changes of the steps so far. Such a path says how a step changes it; :class:`RunningWalk` sums,
runs the rest of the head (the tail) on the vectors and scores them.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from shapcam_ext.game import Game, fresh_rows
from shapcam_ext.memory import cost_per_unit
from shapcam_ext.paths.protocol import Evaluator


class RunningWalk(Evaluator):
    """Worth of every prefix of every permutation from running sums of the front output's changes.

    path: the name results report. start: (B, *S) front output of the empty coalition (the
    tail's input shape is (rows, *S)).
    steps: maps (K, n) permutations to a new (B, K, n + 1, D) tensor whose [:, :, t] is the change
        of the flattened front output at step t (D = prod(S)); the walk overwrites [:, :, 0] with
        the start and sums in place.
    tail: the rest of the head on (rows, *S) inputs, or None when the front output is the output.
    bytes_per_permutation: what one permutation of the walk allocates, all images together.
    """

    def __init__(self, path: str, game: Game, start: torch.Tensor, steps: Callable[[torch.Tensor], torch.Tensor],
                 tail: Optional[Callable], bytes_per_permutation: int):
        super().__init__(game, bytes_per_permutation)
        self.path, self.start, self.steps, self.tail = path, start, steps, tail

    def values(self, perms: torch.Tensor) -> torch.Tensor:
        running = self.steps(perms)
        b, k, steps, d = running.shape
        running = running.to(torch.promote_types(running.dtype, torch.float32))
        running[:, :, 0] = self.start.reshape(b, 1, d)
        if torch.is_grad_enabled():  # autograd through n in-place slice additions would copy the sums n times
            running = running.cumsum(2)
        else:
            for t in range(1, steps):  # in place, step by step: cumsum along a middle dimension is several times slower
                running[:, :, t] += running[:, :, t - 1]
        # one batch for every prefix: a row's worth must not depend on the batch it is scored in
        inputs = running.to(self.start.dtype).reshape((-1,) + tuple(self.start.shape[1:]))
        out = inputs if self.tail is None else self.tail(inputs)
        return self.game.scorer(self.game.targets, out, k * steps).view(b, k, steps)


class TableSteps:
    """Steps that each add one row of a table: ``table[:, step_rows(perms)[k, t]]`` at step t + 1.

    table: (B, R, D) changes. step_rows: maps (K, n) permutations to (K, n) rows of the table.
    """

    def __init__(self, table: torch.Tensor, step_rows: Callable[[torch.Tensor], torch.Tensor]):
        self.table, self.step_rows = table, step_rows

    def __call__(self, perms: torch.Tensor) -> torch.Tensor:
        rows = self.step_rows(perms)
        return self.table[:, torch.cat([rows[:, :1], rows], 1)]  # any row for [:, :, 0]


def tail_bytes_per_row(tail: Optional[Callable], start: torch.Tensor, game: Game) -> int:
    """Bytes the tail and the target allocate per row of front output."""
    def run(rows: int) -> Callable[[], object]:
        x = fresh_rows(start[:1], rows)
        return lambda: game.scorer(game.targets[:1], x if tail is None else tail(x), rows)

    return cost_per_unit(run)[1]
