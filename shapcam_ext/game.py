"""The game one run of images plays at one target layer: who the players are and what a
coalition is worth.

Every evaluation path (:mod:`shapcam_ext.paths`) reads the same frozen :class:`Game`: the
generic path scores masked player grids with :meth:`Game.worth`, the fast paths take the players,
the baseline and the held values apart by the structure their proof found.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from shapcam_ext.memory import MemoryPlanner
from shapcam_ext.players import PlayerGrid
from shapcam_ext.targets import Scorer, Target


@dataclass(frozen=True)
class Game:
    """The Shapley game of ``batch`` images that are explained together (they share permutations).

    layer: the target layer's name. head: ``head(activation, *held) -> output``.
    grid: maps the prepared batch's activation to player grids and back.
    players: (B, C, H, W) the player grids of these images.
    baseline: a scalar, or (B, C, H, W), the value of removed players.
    held: these images' held values (the head's other inputs); ``batched`` says which are per image.
    targets: one per image. images: these images' rows in the prepared batch.
    scorer: scores head outputs with the targets. planner: sizes chunks under the memory budget.
    permutations: the most permutations the run walks (the paths weigh their costs with it).
    """

    layer: str
    head: Callable[..., Any]
    grid: PlayerGrid
    players: Tensor
    baseline: Tensor
    held: tuple
    batched: tuple[bool, ...]
    targets: tuple[Target, ...]
    images: slice
    scorer: Scorer
    planner: MemoryPlanner
    permutations: int

    @property
    def batch(self) -> int:
        return self.players.shape[0]

    @property
    def n(self) -> int:
        """The number of players."""
        return self.players.shape[-1] * self.players.shape[-2]

    @property
    def device(self) -> torch.device:
        return self.players.device

    @property
    def coalitions_per_permutation(self) -> int:
        """Coalitions one permutation scores for all images: its n + 1 prefixes each."""
        return self.batch * (self.n + 1)

    def base_map(self) -> Tensor:
        """The baseline as (B, C, H, W) player grids."""
        return self.baseline.expand_as(self.players).contiguous()

    def baseline_of(self, sub: slice) -> Tensor:
        """The baseline of images ``sub`` (a scalar stays a scalar)."""
        return self.baseline[sub] if self.baseline.dim() else self.baseline

    def held_of(self, sub: slice) -> tuple:
        """Held values of images ``sub``: the batched ones sliced, the others as they are."""
        return tuple(h[sub] if batched else h for h, batched in zip(self.held, self.batched))

    def worth(self, masked: Tensor, sub: Optional[slice] = None) -> Tensor:
        """(images, rows per image) scores of masked player grids of images ``sub`` (all by default),
        image-major. The head never writes into ``masked``'s storage."""
        sub = sub if sub is not None else slice(0, self.batch)
        absolute = slice(self.images.start + sub.start, self.images.start + sub.stop)
        images = sub.stop - sub.start
        out = self.head(self.grid.head_input(masked, absolute), *self.held_of(sub))
        return self.scorer(self.targets[sub], out, masked.shape[0] // images)


def fresh_rows(row: Tensor, rows: int) -> Tensor:
    """``rows`` copies of a one-row tensor in new storage. ``expand(...).contiguous()`` returns the
    row itself when ``rows`` is 1, and a head working in place (``ReLU(inplace=True)``) would
    then overwrite a tensor that is kept."""
    return row.repeat((rows,) + (1,) * (row.dim() - 1))


__all__ = ["Game", "fresh_rows"]
