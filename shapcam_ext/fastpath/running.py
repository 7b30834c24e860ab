"""What every fast path gives the engine, and the walk the tabulated paths share.

A walk yields the worth of every prefix of a batch of permutations (``values``) and accumulates
their marginals (``__call__``), in rounds whose size the memory planner sets.

The tabulated paths walk running sums: along a permutation, the front output of each prefix (the
pooled vector, or the logits of the Linear after the pool) is the empty coalition's plus the
changes of the steps so far. Such a path says how a step changes it; :class:`RunningWalk` sums,
runs the rest of the head (the tail) on the vectors and scores them.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from shapcam_ext import ops
from shapcam_ext.memory import MemoryPlanner, cost_per_unit
from shapcam_ext.statistics import RunningEstimate
from shapcam_ext.targets import Scorer, Target


class Walk:
    """A fast path for one run of images.

    path: the name results report. batch: images. n: players.
    per_permutation: bytes one permutation of the walk allocates (all images).
    """

    def __init__(self, path: str, batch: int, n: int, planner: MemoryPlanner, per_permutation: int):
        self.path, self.batch, self.n = path, batch, n
        self.planner, self.per_permutation = planner, per_permutation

    @property
    def coalitions_per_permutation(self) -> int:
        return self.batch * (self.n + 1)

    def permutations_per_round(self, unit: int) -> int:
        if self.planner.batch_size is not None:  # the user's head evaluations per chunk
            return max(1, self.planner.batch_size // self.coalitions_per_permutation)
        return self.planner.units(self.per_permutation * unit, what=f"one unit of the {self.path} walk") * unit

    def __call__(self, perms: torch.Tensor, estimate: RunningEstimate) -> None:
        ops.scatter_marginals_(self.values(perms), ops.permutation_ranks(perms), estimate.total, estimate.total_sq,
                               estimate.unit_size)

    def values(self, perms: torch.Tensor) -> torch.Tensor:
        """(B, K, n+1) worth of every prefix of ``perms``, like the generic path's ``values``."""
        raise NotImplementedError


class RunningWalk(Walk):
    """Worth of every prefix of every permutation from running sums of the front output's changes.

    start: (B, *S) front output of the empty coalition (the tail's input shape is (rows, *S)).
    steps: maps (K, n) permutations to a new (B, K, n + 1, D) tensor whose [:, :, t] is the change
        of the flattened front output at step t (D = prod(S)); the walk overwrites [:, :, 0] with
        the start and sums in place.
    tail: the rest of the head on (rows, *S) inputs, or None when the front output is the output.
    """

    def __init__(self, path: str, start: torch.Tensor, steps: Callable[[torch.Tensor], torch.Tensor],
                 tail: Optional[Callable], targets: list[Target], scorer: Scorer, planner: MemoryPlanner, n: int,
                 per_permutation: int):
        super().__init__(path, start.shape[0], n, planner, per_permutation)
        self.start, self.steps = start, steps
        self.tail, self.targets, self.scorer = tail, targets, scorer

    def values(self, perms: torch.Tensor) -> torch.Tensor:
        running = self.steps(perms)
        b, k, steps, d = running.shape
        running = running.to(torch.promote_types(running.dtype, torch.float32))
        running[:, :, 0] = self.start.reshape(b, 1, d)
        for t in range(1, steps):  # in place, step by step: cumsum along a middle dimension is several times slower
            running[:, :, t] += running[:, :, t - 1]
        # one batch for every prefix: a row's worth must not depend on the batch it is scored in
        inputs = running.to(self.start.dtype).reshape((-1,) + tuple(self.start.shape[1:]))
        out = inputs if self.tail is None else self.tail(inputs)
        return self.scorer(self.targets, out, k * steps).view(b, k, steps)


class TableSteps:
    """Steps that each add one row of a table: ``table[:, step_rows(perms)[k, t]]`` at step t + 1.

    table: (B, R, D) changes. step_rows: maps (K, n) permutations to (K, n) rows of the table.
    """

    def __init__(self, table: torch.Tensor, step_rows: Callable[[torch.Tensor], torch.Tensor]):
        self.table, self.step_rows = table, step_rows

    def __call__(self, perms: torch.Tensor) -> torch.Tensor:
        rows = self.step_rows(perms)
        return self.table[:, torch.cat([rows[:, :1], rows], 1)]  # any row for [:, :, 0]


def tail_bytes_per_row(tail: Optional[Callable], start: torch.Tensor, targets: list[Target], scorer: Scorer) -> int:
    """Bytes the tail and the target allocate per row of front output."""
    def run(rows: int) -> Callable[[], object]:
        x = start[:1].expand((rows,) + tuple(start.shape[1:])).contiguous()
        return lambda: scorer(targets[:1], x if tail is None else tail(x), rows)

    return cost_per_unit(run)[1]
