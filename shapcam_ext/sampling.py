"""Streams of permutations for the Castro et al. (2009) Shapley estimator.

A stream hands out permutations of the n players as they are needed, on the device where they are
used, never all at once, so memory does not grow with the number of permutations. Draws happen
in blocks of a fixed size that depends only on n and the settings: the sequence is the same
however it is consumed (in one chunk or many, with or without a tolerance), so a seed fixes the
maps.

Each stream has a ``unit_size``: its permutations come in independent units of that many
consecutive rows (a Latin block, an order and its reverse for antithetic sampling). Standard
errors are computed over units, never over the correlated rows inside one.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import numpy as np
import torch

from shapcam_ext.statistics import MIN_UNITS_TO_STOP

MAX_EXACT_PLAYERS = 8  # 8! = 40320 orders
_DRAW_ELEMENTS = 1 << 20  # elements per draw: bounds the stream's own memory
DESIGNS = ("latin", "iid")
MAX_BLOCK_ROWS = 64  # keeps a unit (2 x 64 orders) small next to a run, for the stop checks


def latin_block_rows(n: int, rows: int) -> int:
    """Orders per Latin block (m, also its number of strata) in a run of ``rows`` orders (before
    antithetic reverses). At most n, :data:`MAX_BLOCK_ROWS`, and few enough to leave
    :data:`~shapcam_ext.statistics.MIN_UNITS_TO_STOP` blocks, so that standard errors (computed
    over blocks) and the tolerance stop have enough of them. Within that cap, m = ceil(n / g) for
    the fewest groups g: the strata then hold g players, or g - 1 for the g m - n < g strata that
    hold padding, so they stay nearly even."""
    cap = max(1, min(n, MAX_BLOCK_ROWS, rows // MIN_UNITS_TO_STOP))
    return -(-n // -(-n // cap))


# torch's CPU generator state (CPUGeneratorImplState): the Mersenne Twister's 624 state words,
# each stored in 8 bytes, start at byte 24.
_MT_WORDS = slice(24, 24 + 8 * 624)


def seeded_generator(seed: Optional[int], device: torch.device) -> torch.Generator:
    """A generator on ``device`` whose state depends on all 64 bits of ``seed``; None seeds it afresh.

    CUDA's Philox generator takes the 64-bit seed as it is. The CPU's Mersenne Twister keeps only
    the low 32 bits (torch seeds it with init_genrand), so a seed of 2**32 or more sets its state
    with the Twister's reference seeding from a key, init_by_array on the seed's two 32-bit words
    (numpy's legacy MT19937 computes it). Seeds below 2**32 keep torch's own seeding.

    Raises:
        RuntimeError: a seed of 2**32 or more on a torch whose CPU generator state is laid out
            differently (checked against init_genrand of the low word).
    """
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
        return generator
    generator.manual_seed(seed)
    if generator.device.type != "cpu" or seed < 2**32:
        return generator
    low, high = seed & 0xFFFFFFFF, seed >> 32
    state = generator.get_state()
    words = state.numpy()[_MT_WORDS].view(np.uint64)
    if not np.array_equal(words, np.random.RandomState(low).get_state()[1]):
        raise RuntimeError(f"torch {torch.__version__} lays out its CPU generator's state differently; seeds of "
                           "2**32 and above cannot be honoured on the CPU here, pass a seed below 2**32")
    words[:] = np.random.RandomState(np.array([low, high], dtype=np.uint32)).get_state()[1]
    generator.set_state(state)
    return generator


class PermutationStream:
    """Random orders of ``n`` players for the permutation estimator, in independent units.

    Designs:

    * ``"latin"`` (the default): blocks of m orders stratified by position. The positions
      0..n-1 fall into m strata of consecutive positions, and in each block every player enters
      once in each stratum: a randomised Latin square of order m assigns the strata (for m = n,
      each player takes each position exactly once). A player's marginal contribution depends
      most on how many players precede it, so averaging it over every stratum removes most of the
      estimator's variance. Each order alone is still uniformly random, so the estimate stays
      unbiased. A block's orders are dependent, so the block is the unit.
    * ``"iid"``: independent uniform orders; the unit is one order.

    With ``antithetic`` each order is followed by its reverse: a player that enters early in one
    enters late in the other, which cancels much of the remaining variance.

    Args:
        n: number of players.
        antithetic: follow each order by its reverse.
        seed: seeds the draws; None draws a fresh seed.
        device: where the permutations are made and returned.
        design: ``"latin"`` or ``"iid"``.
        total: the most permutations the run takes; sizes Latin blocks (:func:`latin_block_rows`).
    """

    exhaustive = False

    def __init__(self, n: int, antithetic: bool, seed: Optional[int], device: torch.device,
                 design: str = "latin", total: int = 256):
        if design not in DESIGNS:
            raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
        self.n = n
        self.design = design
        reverses = 2 if antithetic else 1
        self.block_rows = latin_block_rows(n, total // reverses) if design == "latin" else 1
        self.unit_size = self.block_rows * reverses
        self.device = torch.device(device)
        self.generator = seeded_generator(seed, self.device)
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
        # a copy: a differentiable map's graph holds each round's permutations until its backward,
        # and a view would hold the whole draw
        return rows[:count].clone()

    def _draw(self) -> torch.Tensor:
        """The next ``_units_per_draw`` units, (units * unit_size, n)."""
        orders = (self._uniform_orders(self._units_per_draw, self.n) if self.design == "iid"
                  else self._stratified_blocks(self._units_per_draw))
        if self.unit_size != self.block_rows:  # antithetic: each order, then its reverse
            orders = torch.stack([orders, orders.flip(1)], dim=1).reshape(-1, self.n)
        return orders

    def _stratified_blocks(self, units: int) -> torch.Tensor:
        """(units * m, n): blocks of m orders in which each player enters once per stratum.

        The n players are padded to g * m slots with g = ceil(n / m) and split at random into g
        groups of m (the padding all in the last). In group i, member k sits in stratum sigma_i[(a_i[k] + r) mod m] in order r
        of the block (a cyclic Latin square with random rows a_i and symbols sigma_i, so the
        strata of two members change independently), which puts one member of each group, g
        players, in every stratum. Shuffled within strata, each order is uniform over all
        orders of the padded players (the construction is invariant under relabelling them), so
        it stays uniform once the padding is dropped.
        """
        n, m = self.n, self.block_rows
        groups = -(-n // m)
        slots = groups * m
        a, sigma = self._uniform_orders(2 * units * groups, m).view(2, units, 1, groups, m)
        step = torch.arange(m, device=self.device).view(1, m, 1, 1)
        strata = sigma.expand(units, m, groups, m).gather(3, (a + step) % m).flatten(2)  # (units, m, slots)
        # Real players fill the first n slots at random; the padding is the last group's tail, so
        # a stratum holds at most one padding slot and the strata stay within one position of even.
        padding = torch.arange(n, slots, device=self.device).expand(units, slots - n)
        players = torch.cat([self._uniform_orders(units, n), padding], 1).view(units, 1, slots).expand(units, m, slots)
        # Sorting by stratum + a uniform in [0, 1) orders the strata and shuffles within each one.
        keys = torch.rand(units, m, slots, generator=self.generator, device=self.device).add_(strata)
        order = players.gather(2, keys.argsort(2)).reshape(-1, slots)
        if slots == n:
            return order
        # drop the padding: a stable sort on "is padding" keeps the players' order, with no boolean
        # indexing (whose output size would be read back from the device)
        real = (order >= n).to(torch.uint8).argsort(dim=1, stable=True)[:, :n]
        return order.gather(1, real)

    def _uniform_orders(self, count: int, size: int) -> torch.Tensor:
        # argsort of i.i.d. uniforms is a uniform permutation, drawn for many rows at once.
        return torch.rand(count, size, generator=self.generator, device=self.device).argsort(1)


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
