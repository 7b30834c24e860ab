"""Permutation sampling for the Castro et al. (2009) Shapley estimator."""
from __future__ import annotations

import itertools
import math

import torch


def sample_permutations(n: int, count: int, generator: torch.Generator, antithetic: bool = True) -> torch.Tensor:
    """``count`` random orders of ``n`` players as an int64 (count, n) tensor on the CPU.

    With ``antithetic``, rows come in pairs (order, reversed order): a player that enters early
    in one enters late in the other, which cancels much of the estimator's variance. An odd
    ``count`` ends with one unpaired order.
    """
    if count < 1:
        raise ValueError(f"n_permutations must be >= 1, got {count}")
    drawn = math.ceil(count / 2) if antithetic else count
    # argsort of i.i.d. uniforms is a uniform permutation, drawn for all rows at once.
    perms = torch.rand(drawn, n, generator=generator).argsort(dim=1)
    if antithetic:
        perms = torch.stack([perms, perms.flip(1)], dim=1).reshape(-1, n)[:count]
    return perms


def all_permutations(n: int) -> torch.Tensor:
    """Every order of ``n`` players, (n!, n); averaging over it gives exact Shapley values."""
    if n > 8:
        raise ValueError(f"exact enumeration of {n}! orders is too large; use n <= 8 or sampling")
    return torch.tensor(list(itertools.permutations(range(n))), dtype=torch.int64).reshape(-1, n)
