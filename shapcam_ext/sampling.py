"""Streams of permutations for the Castro et al. (2009) Shapley estimator.

A stream hands out permutations of the n players as they are needed, on the device where they are
used, never all at once, so memory does not grow with the number of permutations. Draws happen
in blocks of a fixed size that depends only on n: the sequence is the same however it is
consumed (in one chunk or many, with or without a tolerance), so a seed fixes the maps.

Each stream has a ``unit_size``: its permutations come in independent units of that many
consecutive rows (an order and its reverse for antithetic sampling). Standard errors are
computed over units, never over the correlated rows inside one.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch

MAX_EXACT_PLAYERS = 8  # 8! = 40320 orders
_DRAW_ELEMENTS = 1 << 20  # elements per block of draws: bounds the stream's own memory


class PermutationStream:
    """Uniformly random orders of ``n`` players, optionally each followed by its reverse.

    Args:
        n: number of players.
        antithetic: follow each order by its reverse (a unit of two rows): a player that enters
            early in one enters late in the other, which cancels much of the estimator's variance.
        seed: seeds the draws; None draws a fresh seed.
        device: where the permutations are made and returned.
    """

    exhaustive = False

    def __init__(self, n: int, antithetic: bool, seed: Optional[int], device: torch.device):
        self.n = n
        self.unit_size = 2 if antithetic else 1
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self._units_per_draw = max(1, min(64, _DRAW_ELEMENTS // (n * self.unit_size)))
        self._buffer = torch.empty(0, n, dtype=torch.int64, device=self.device)

    def take(self, count: int) -> torch.Tensor:
        """The next ``count`` permutations, (count, n) int64; ``count`` is a multiple of unit_size."""
        if count % self.unit_size:
            raise ValueError(f"take {count} permutations: not a multiple of the unit size {self.unit_size}")
        parts, have = [self._buffer], self._buffer.shape[0]
        while have < count:
            block = self._draw()
            parts.append(block)
            have += block.shape[0]
        rows = torch.cat(parts) if len(parts) > 1 else parts[0]
        self._buffer = rows[count:]
        return rows[:count]

    def _draw(self) -> torch.Tensor:
        # argsort of i.i.d. uniforms is a uniform permutation, drawn for a block of rows at once.
        orders = torch.rand(self._units_per_draw, self.n, generator=self.generator, device=self.device).argsort(1)
        if self.unit_size == 2:
            orders = torch.stack([orders, orders.flip(1)], dim=1).reshape(-1, self.n)
        return orders


class ExhaustiveStream:
    """All n! orders of ``n <= 8`` players, in lexicographic order: averaging over them gives the
    exact Shapley values, with no sampling error (so its standard errors are zero)."""

    exhaustive = True

    def __init__(self, n: int, device: torch.device):
        if n > MAX_EXACT_PLAYERS:
            raise ValueError(
                f"exact enumeration of {n}! orders is too large; use exact=False, or group_size so that "
                f"n <= {MAX_EXACT_PLAYERS} players"
            )
        self.n = n
        self.total = math.factorial(n)
        self.unit_size = 1
        self.device = torch.device(device)
        self._orders = itertools.permutations(range(n))

    def take(self, count: int) -> torch.Tensor:
        rows = list(itertools.islice(self._orders, count))
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, self.n).to(self.device)
