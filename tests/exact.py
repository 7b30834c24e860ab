"""Exact Shapley values by enumerating all 2^n coalitions (equation 3 of the paper).

Independent of the permutation machinery, so the tests can hold the estimator to it. Only the
tests use it, so it lives with them.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

MAX_EXACT_PLAYERS = 16


def exact_shapley(worth: Callable[[torch.Tensor], torch.Tensor], n: int) -> torch.Tensor:
    """Shapley values of an ``n``-player game, in float64.

    Args:
        worth: maps a (2^n, n) bool tensor of coalitions (True = player present) to 2^n worths.
        n: number of players, at most 16.
    """
    if not 1 <= n <= MAX_EXACT_PLAYERS:
        raise ValueError(f"exact enumeration needs 1 <= n <= {MAX_EXACT_PLAYERS} players, got {n}")
    codes = torch.arange(2**n)
    bits = 1 << torch.arange(n)
    members = (codes[:, None] & bits) != 0  # coalition `code` contains player i
    values = worth(members).to(torch.float64).cpu()
    sizes = members.sum(1)
    # weight(|S|) = |S|! (n-|S|-1)! / n! for coalitions S without player i
    weight = torch.tensor([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)],
                          dtype=torch.float64)
    phi = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        without = ~members[:, i]
        gain = values[codes[without] | (1 << i)] - values[without]
        phi[i] = (weight[sizes[without]] * gain).sum()
    return phi
