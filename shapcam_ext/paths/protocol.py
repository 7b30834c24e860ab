"""The one protocol every evaluation path implements.

An evaluator plays one :class:`~shapcam_ext.game.Game` along batches of permutations: it knows
the worth of every prefix (``values``) and adds the marginal contributions to a running
estimate (``accumulate``), in rounds whose size the memory planner sets; one whose game gives
the Shapley values in closed form also returns them (``exact_values``), and nothing is sampled. The generic path, the
pooled walks, the incremental walks and any new path are subclasses; the engine only ever talks
to this interface, and :func:`shapcam_ext.paths.evaluator_for` is the one place that picks one.

For a differentiable map the same rounds run under autograd, and ``accumulate`` also adds the
sums of the marginals with their graph (:mod:`.differentiable`): from the round's worths
(:meth:`Evaluator.graph_values`, recomputed in the backward), or for a compiled walk from the
walk's differentiable variant.
"""
from __future__ import annotations

import abc
from typing import Optional

import torch

from shapcam_ext import ops
from shapcam_ext.game import Game
from shapcam_ext.memory import recomputed
from shapcam_ext.paths import differentiable
from shapcam_ext.statistics import RunningEstimate


class Evaluator(abc.ABC):
    """Plays ``game`` along permutations.

    Subclasses set ``path`` (the name results report) and implement :meth:`values`; those whose
    accumulation skips the per-prefix worths (a compiled walk) override :meth:`accumulate`.
    ``bytes_per_permutation``: what one permutation of a round allocates, all images together.
    """

    path: str = ""

    def __init__(self, game: Game, bytes_per_permutation: int):
        self.game = game
        self.bytes_per_permutation = bytes_per_permutation

    @property
    def coalitions_per_permutation(self) -> int:
        """Coalitions one permutation scores, all images together (for cost reports)."""
        return self.game.coalitions_per_permutation

    def permutations_per_round(self, unit: int) -> int:
        """Permutations per round: whole units whose work fits the memory budget (at least one),
        or the user's ``batch_size`` in head evaluations."""
        planner = self.game.planner
        if planner.batch_size is not None:
            return max(unit, planner.batch_size // self.coalitions_per_permutation // unit * unit)
        return planner.units(self.bytes_per_permutation * unit, what=f"one unit of the {self.path} path") * unit

    @abc.abstractmethod
    def values(self, perms: torch.Tensor) -> torch.Tensor:
        """(B, K, n+1) worth of every prefix of the (K, n) permutations ``perms``."""

    def graph_values(self, perms: torch.Tensor) -> torch.Tensor:
        """:meth:`values` for a differentiable map: the backward recomputes the round rather than
        keeping what it computed in between (the planner sized the round for that). Paths whose
        chunks are smaller than a round recompute chunk by chunk instead."""
        return recomputed(self.values, perms)

    def accumulate(self, perms: torch.Tensor, estimate: RunningEstimate) -> None:
        """Adds the marginal contributions along ``perms`` (whole units) to ``estimate``, and for a
        differentiable estimate their sums with their graph (which keeps the worths and ranks)."""
        ranks = ops.permutation_ranks(perms)
        if estimate.differentiable:
            values = self.graph_values(perms)
            estimate.add_sums(differentiable.scatter_marginals(values, ranks, torch.float64))
            values = values.detach()
        else:
            values = self.values(perms)
        ops.scatter_marginals_(values, ranks, estimate.total, estimate.total_sq, estimate.unit_size)

    def exact_values(self) -> Optional[torch.Tensor]:
        """(B, n) the Shapley values in closed form, for a game whose structure gives them in one
        pass (an additive game); None when they must be sampled (the engine then walks permutations)."""
        return None


__all__ = ["Evaluator"]
