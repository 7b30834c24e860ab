"""Pure-PyTorch references of the compiled ops.

They define the ops' semantics, serve as the fallback backend when the compiled library is
missing (or ``SHAPCAM_BACKEND=reference``), and are what the tests compare the kernels to. They
are differentiable by autograd, which is what the compiled ops' backward formulas are tested
against. Argument checking lives in :mod:`shapcam_ext.ops`, shared by both backends.
"""
from __future__ import annotations

from typing import Sequence

import torch

from shapcam_ext.numerics import opmath


def permutation_ranks(perms: torch.Tensor) -> torch.Tensor:
    """rank[k, p] = the step at which permutation k adds position p (inverse permutation)."""
    steps = torch.arange(perms.shape[1], device=perms.device).expand_as(perms)
    return torch.empty_like(perms).scatter_(1, perms, steps)


def masked_prefixes(
    activations: torch.Tensor,
    baseline: torch.Tensor,
    ranks: torch.Tensor,
    perm_start: int,
    perm_end: int,
    prefix_start: int,
    prefix_end: int,
) -> torch.Tensor:
    """Masked feature maps for prefixes ``prefix_start..prefix_end-1`` of permutations
    ``perm_start..perm_end-1``, given their ``ranks`` (K, n).

    Output shape (B*Kc*Tc, C, h, w) in channels-last layout, ordered image-major, then
    permutation, then prefix length; a 3-D input counts as B = 1.
    """
    batched = activations.dim() == 4
    acts = activations if batched else activations.unsqueeze(0)
    b, c, h, w = acts.shape
    kc, tc = perm_end - perm_start, prefix_end - prefix_start
    base = baseline.expand(acts.shape)
    steps = ranks[perm_start:perm_end].view(kc, 1, h * w)
    lengths = torch.arange(prefix_start, prefix_end, device=ranks.device).view(1, tc, 1)
    keep = (steps < lengths).view(1, kc, tc, 1, h, w)
    out = torch.where(keep, acts[:, None, None], base[:, None, None]).reshape(b * kc * tc, c, h, w)
    return out.contiguous(memory_format=torch.channels_last)


def _marginals_by_rank(values: torch.Tensor, ranks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., K, n): the marginal of each position in each permutation, in ``dtype``."""
    vals = values.to(dtype)
    steps = vals[..., 1:] - vals[..., :-1]  # (..., K, n): step t adds the position of rank t
    return steps.gather(-1, ranks.expand(steps.shape))


def _accumulate(per_position: torch.Tensor, phi: torch.Tensor, phi_sq: torch.Tensor, unit_size: int) -> None:
    """phi += the sums of ``per_position`` (..., K, n) over K; phi_sq += the squares of its sums
    over units of ``unit_size`` consecutive permutations."""
    units = per_position.unflatten(-2, (per_position.shape[-2] // unit_size, unit_size)).sum(-2)
    phi.add_(units.sum(-2))
    phi_sq.add_(units.square().sum(-2))


def scatter_marginals(values: torch.Tensor, ranks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n,) or (B, n) in ``dtype``: the sum over permutations of each position's marginal.

    values: (K, n+1) or (B, K, n+1), the worth of every prefix of every permutation.
    """
    return _marginals_by_rank(values, ranks, dtype).sum(-2)


def scatter_marginals_(
    values: torch.Tensor, ranks: torch.Tensor, phi: torch.Tensor, phi_sq: torch.Tensor, unit_size: int = 1
) -> None:
    """Add the marginal contributions along each permutation to ``phi``, and the square of each
    unit's sum of them to ``phi_sq``, in place. A unit is ``unit_size`` consecutive permutations.

    values: (K, n+1) or (B, K, n+1), the worth of every prefix of every permutation.
    phi, phi_sq: (n,) or (B, n), float32 or float64.
    """
    _accumulate(_marginals_by_rank(values, ranks, phi.dtype), phi, phi_sq, unit_size)


def walk_values(
    start_logits: torch.Tensor,
    deltas: torch.Tensor,
    perms: torch.Tensor,
    classes: torch.Tensor,
    softmax: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(B, K, n+1) worth of every prefix of every permutation, the logits walked in ``dtype`` (the
    ops walk them in the opmath type of the inputs, shapcam_ext.numerics.opmath).

    The logits of coalition S are ``start_logits[b] + sum(deltas[b, p] for p in S)``; the worth
    is the softmax probability (``softmax=True``) or the logit of ``classes[b]``.
    """
    steps = deltas.to(dtype)[:, perms]  # (B, K, n, M): the delta added at each step
    logits = torch.cat([torch.zeros_like(steps[:, :, :1]), steps.cumsum(2)], dim=2)
    logits = logits + start_logits.to(dtype)[:, None, None, :]
    scores = logits.softmax(-1) if softmax else logits
    index = classes.view(-1, 1, 1, 1).expand(*logits.shape[:3], 1)
    return scores.gather(-1, index).squeeze(-1)


def _marginals_by_position(values: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """(B, K, n): each step's marginal added at the position the step adds (as the walks do)."""
    steps = values[..., 1:] - values[..., :-1]
    return torch.zeros_like(steps).scatter_add(-1, perms.expand(steps.shape), steps)


def linear_walk(
    start_logits: torch.Tensor,
    deltas: torch.Tensor,
    perms: torch.Tensor,
    classes: torch.Tensor,
    softmax: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(B, n) in ``dtype``: Shapley sums for a head whose logits are additive in the players.

    Walks every permutation in the opmath type of the inputs (:func:`walk_values`), stores each worth in ``dtype`` and sums each
    position's marginals over the permutations. start_logits: (B, M); deltas: (B, n, M);
    perms: (K, n); classes: (B,) int64.
    """
    values = walk_values(start_logits, deltas, perms, classes, softmax, opmath(deltas.dtype)).to(dtype)
    return _marginals_by_position(values, perms).sum(-2)


def linear_walk_(
    start_logits: torch.Tensor,
    deltas: torch.Tensor,
    perms: torch.Tensor,
    classes: torch.Tensor,
    softmax: bool,
    phi: torch.Tensor,
    phi_sq: torch.Tensor,
    unit_size: int = 1,
) -> None:
    """:func:`linear_walk` accumulated into ``phi`` / ``phi_sq`` (B, n), in their dtype, like
    :func:`scatter_marginals_`."""
    values = walk_values(start_logits, deltas, perms, classes, softmax, opmath(deltas.dtype)).to(phi.dtype)
    _accumulate(_marginals_by_position(values, perms), phi, phi_sq, unit_size)


def linear_walk_backward(
    grad_phi: torch.Tensor,
    start_logits: torch.Tensor,
    deltas: torch.Tensor,
    perms: torch.Tensor,
    classes: torch.Tensor,
    softmax: bool,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of :func:`linear_walk`'s output (in ``grad_phi``'s dtype) with respect to
    start_logits and deltas, by autograd through it. A gradient whose ``output_mask`` entry is
    False comes back empty, with a leading dimension of 0."""
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(bool(wanted)) for t, wanted in zip((start_logits, deltas), output_mask)]
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(())
        if wanted:
            phi = linear_walk(*inputs, perms, classes, softmax, grad_phi.dtype)
            grads = iter(torch.autograd.grad(phi, wanted, grad_phi, allow_unused=True, materialize_grads=True))
    return tuple(next(grads) if t.requires_grad else t.new_zeros((0, *t.shape[1:])) for t in inputs)
