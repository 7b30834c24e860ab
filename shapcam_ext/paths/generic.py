"""The generic path: the head on the masked prefixes of every permutation, for any head and target."""
from __future__ import annotations

import torch

from shapcam_ext import ops
from shapcam_ext.game import Game, fresh_rows
from shapcam_ext.memory import cost_per_unit, recomputed
from shapcam_ext.paths.protocol import Evaluator


class GenericPath(Evaluator):
    """Runs the head on masked player grids made by ``ops.masked_prefixes``, in chunks under the budget.

    Whole permutations of several images go together when they fit; otherwise fewer images, then
    fewer permutations, then a range of prefix lengths per chunk. A round's prefix worths,
    (B, K, n+1) in float64, are what its size is planned by.

    Differentiable (the head runs under autograd): each chunk is recomputed in the backward, so
    the graph keeps only the chunk's inputs (the players, the baseline and the held values, which
    the game holds anyway, and the permutations: its masked maps are rebuilt from them) and the
    worths; the backward holds one chunk's head activations and their gradients at a time.
    """

    path = "generic"

    def __init__(self, game: Game):
        super().__init__(game, (game.batch * (game.n + 1) + game.n) * 8)
        players = game.players

        def run(rows: int):
            masked = fresh_rows(players[:1], rows)
            return lambda: game.worth(masked, slice(0, 1))

        if game.planner.batch_size is not None:
            self.rows = game.planner.batch_size
        else:
            fixed, per_row = cost_per_unit(run)
            self.rows = game.planner.head_rows(per_row + players[:1].numel() * players.element_size(), fixed)

    def permutations_per_round(self, unit: int) -> int:
        # batch_size sizes the head's chunks, not the rounds: the prefix worths are small
        return self.game.planner.units(self.bytes_per_permutation * unit,
                                       what="the prefix values of one unit of permutations") * unit

    def values(self, perms: torch.Tensor) -> torch.Tensor:
        g = self.game
        b, n, k = g.batch, g.n, perms.shape[0]
        values = torch.empty(b, k, n + 1, dtype=torch.float64, device=g.device)
        ranks = ops.permutation_ranks(perms)
        per_group = max(1, min(b, self.rows // (n + 1)))
        for i0 in range(0, b, per_group):
            sub = slice(i0, min(b, i0 + per_group))
            images = sub.stop - sub.start
            prefixes = max(1, min(n + 1, self.rows // images))
            per_chunk = max(1, self.rows // (images * (n + 1)))
            for k0 in range(0, k, per_chunk):
                k1 = min(k, k0 + per_chunk)
                for t0 in range(0, n + 1, prefixes):
                    t1 = min(n + 1, t0 + prefixes)
                    worths = recomputed(self._worths, sub, ranks, (k0, k1), (t0, t1))
                    values[sub, k0:k1, t0:t1] = worths.view(images, k1 - k0, t1 - t0)
        return values

    def graph_values(self, perms: torch.Tensor) -> torch.Tensor:
        return self.values(perms)  # recomputed chunk by chunk: a round's head activations may not fit

    def _worths(self, sub: slice, ranks: torch.Tensor, perm_range: tuple[int, int],
                prefix_range: tuple[int, int]) -> torch.Tensor:
        g = self.game
        return g.worth(ops.masked_prefixes(g.players[sub], g.baseline_of(sub), ranks, perm_range, prefix_range), sub)


__all__ = ["GenericPath"]
