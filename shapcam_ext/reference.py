"""Pure-PyTorch references of the compiled ops.

They define the ops' semantics, serve as the fallback backend when the compiled library is
missing (or ``SHAPCAM_BACKEND=reference``), and are what the tests compare the kernels to.
Argument checking lives in :mod:`shapcam_ext.ops`, shared by both backends.
"""
from __future__ import annotations

import torch


def permutation_ranks(perms: torch.Tensor) -> torch.Tensor:
    """rank[k, p] = the step at which permutation k adds position p (inverse permutation)."""
    steps = torch.arange(perms.shape[1], device=perms.device).expand_as(perms)
    return torch.empty_like(perms).scatter_(1, perms, steps)


def masked_prefixes(
    activations: torch.Tensor,
    baseline: torch.Tensor,
    perms: torch.Tensor,
    perm_start: int,
    perm_end: int,
    prefix_start: int,
    prefix_end: int,
) -> torch.Tensor:
    """Masked feature maps for prefixes ``prefix_start..prefix_end-1`` of permutations
    ``perm_start..perm_end-1``.

    Output shape (B*Kc*Tc, C, h, w) in channels-last layout, ordered image-major, then
    permutation, then prefix length; a 3-D input counts as B = 1.
    """
    batched = activations.dim() == 4
    acts = activations if batched else activations.unsqueeze(0)
    b, c, h, w = acts.shape
    base = baseline.expand(acts.shape)
    ranks = permutation_ranks(perms[perm_start:perm_end]).view(-1, 1, h * w)  # (Kc, 1, n)
    lengths = torch.arange(prefix_start, prefix_end, device=perms.device).view(1, -1, 1)
    keep = (ranks < lengths).view(1, ranks.shape[0], lengths.shape[1], 1, h, w)
    out = torch.where(keep, acts.unsqueeze(1).unsqueeze(1), base.unsqueeze(1).unsqueeze(1))
    out = out.reshape(-1, c, h, w)
    return out.contiguous(memory_format=torch.channels_last)


def scatter_marginals_(
    values: torch.Tensor, perms: torch.Tensor, phi: torch.Tensor, phi_sq: torch.Tensor, unit_size: int = 1
) -> None:
    """Add the marginal contributions along each permutation to ``phi``, and the square of each
    unit's sum of them to ``phi_sq``, in place. A unit is ``unit_size`` consecutive permutations.

    values: (K, n+1) or (B, K, n+1), the worth of every prefix of every permutation.
    phi, phi_sq: (n,) or (B, n), float32 or float64.
    """
    vals = values.to(phi.dtype)
    deltas = vals[..., 1:] - vals[..., :-1]  # (..., K, n): step t adds position perms[k, t]
    ranks = permutation_ranks(perms)
    if deltas.dim() == 3:
        ranks = ranks.expand_as(deltas)
    # Gathering by rank gives every position its contribution from each permutation.
    per_position = deltas.gather(-1, ranks)
    units = per_position.unflatten(-2, (-1, unit_size)).sum(-2)
    phi.add_(units.sum(-2))
    phi_sq.add_(units.square().sum(-2))


def walk_values(
    start_logits: torch.Tensor,
    deltas: torch.Tensor,
    perms: torch.Tensor,
    classes: torch.Tensor,
    softmax: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(B, K, n+1) worth of every prefix of every permutation, the logits walked in ``dtype``.

    The logits of coalition S are ``start_logits[b] + sum(deltas[b, p] for p in S)``; the worth
    is the softmax probability (``softmax=True``) or the logit of ``classes[b]``.
    """
    steps = deltas.to(dtype)[:, perms]  # (B, K, n, M): the delta added at each step
    logits = torch.cat([torch.zeros_like(steps[:, :, :1]), steps.cumsum(2)], dim=2)
    logits = logits + start_logits.to(dtype)[:, None, None, :]
    scores = logits.softmax(-1) if softmax else logits
    index = classes.view(-1, 1, 1, 1).expand(*logits.shape[:3], 1)
    return scores.gather(-1, index).squeeze(-1)


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
    """Shapley sampling for a head whose logits are additive in the players.

    Walks every permutation with running logits in phi's dtype (:func:`walk_values`) and
    accumulates like :func:`scatter_marginals_`.

    start_logits: (B, M); deltas: (B, n, M); perms: (K, n); classes: (B,) int64;
    phi, phi_sq: (B, n) float32/float64.
    """
    values = walk_values(start_logits, deltas, perms, classes, softmax, phi.dtype)
    scatter_marginals_(values, perms, phi, phi_sq, unit_size)
