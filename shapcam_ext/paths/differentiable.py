"""The differentiable sums a map's autograd graph is built from: the one seam between the paths
and the ops' functional variants.

``scatter_marginals`` and ``linear_walk`` have the signatures of the compiled functional ops
that branch ``ops`` adds (out of place, with ``register_autograd`` formulas). Until they are on
main they are written here in pure PyTorch; switching is one line, this module's body becoming
``from shapcam_ext.ops import linear_walk, scatter_marginals``.

What their backward keeps: the scatter, its ranks; the walk, its inputs and permutations (the
walk is recomputed in the backward, as the compiled walk's backward walks again), never the
(B, K, n + 1, M) logits.
"""
from __future__ import annotations

from typing import Optional

import torch

from shapcam_ext.memory import recomputed
from shapcam_ext.numerics import opmath
from shapcam_ext.reference import permutation_ranks, walk_values


def scatter_marginals(values: torch.Tensor, ranks: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(..., n): each position's marginal contributions summed over the permutations, in ``dtype``
    (default: the opmath type of ``values``). values: (..., K, n + 1) worths of every prefix;
    ranks: (K, n), the step at which each permutation adds each position."""
    steps = values.to(dtype or opmath(values.dtype)).diff(dim=-1)  # step t adds the position of rank t
    return steps.gather(-1, ranks.expand(steps.shape)).sum(-2)


def linear_walk(start_logits: torch.Tensor, deltas: torch.Tensor, perms: torch.Tensor, classes: torch.Tensor,
                softmax: bool, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(B, n): the sums of :func:`scatter_marginals` for a head whose logits are additive in the
    players (``ops.linear_walk_``'s arguments), walked in the opmath type of the inputs."""
    values = recomputed(walk_values, start_logits, deltas, perms, classes, softmax, opmath(deltas.dtype))
    return scatter_marginals(values, permutation_ranks(perms), dtype)


__all__ = ["linear_walk", "scatter_marginals"]
