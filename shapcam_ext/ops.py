"""Typed Python API of the compiled ops, their fake kernels and autograd.

The ops live in the ``shapcam`` namespace (schemas in csrc/shapcam.cpp); the wrappers take their
arguments in schema order. When the compiled library is absent, the same functions run the
pure-PyTorch references.

Bad permutations and class indices raise ValueError on the CPU and with the reference. The
CUDA kernels never read device data back to the host (so they can run inside CUDA graphs):
they check those values with device-side asserts, which end the CUDA context. The engine's
permutations are argsorts of random numbers (shapcam_ext.sampling), permutations by construction.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from shapcam_ext import reference
from shapcam_ext._backend import COMPILED

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_masked_prefixes_args(activations, baseline, perms, perm_start, perm_end, prefix_start, prefix_end):
    """Shape, dtype and range checks shared by the reference path and the fake kernel."""
    torch._check(
        activations.dim() in (3, 4),
        lambda: f"activations must be (C, h, w) or (B, C, h, w), got shape {tuple(activations.shape)}",
    )
    torch._check(
        activations.dtype in FLOAT_DTYPES,
        lambda: f"activations must be a floating tensor (float32/64, float16, bfloat16), got {activations.dtype}",
    )
    torch._check(
        baseline.dtype == activations.dtype,
        lambda: f"baseline dtype {baseline.dtype} differs from activations dtype {activations.dtype}; cast it",
    )
    torch._check(
        baseline.device == activations.device and perms.device == activations.device,
        lambda: "activations, baseline and perms must be on one device, got "
        f"{activations.device}, {baseline.device}, {perms.device}",
    )
    torch._check(
        baseline.dim() <= activations.dim()
        and all(s in (1, a) for s, a in zip(reversed(baseline.shape), reversed(activations.shape))),
        lambda: f"baseline of shape {tuple(baseline.shape)} does not broadcast to activations {tuple(activations.shape)}",
    )
    n = activations.shape[-1] * activations.shape[-2]
    _check_perms(perms, n)
    k = perms.shape[0]
    torch._check(
        0 <= perm_start < perm_end <= k,
        lambda: f"perm_range [{perm_start}, {perm_end}) must satisfy 0 <= start < end <= K = {k}",
    )
    torch._check(
        0 <= prefix_start < prefix_end <= n + 1,
        lambda: f"prefix_range [{prefix_start}, {prefix_end}) must satisfy 0 <= start < end <= n+1 = {n + 1}",
    )


def _check_perms(perms, n):
    torch._check(perms.dtype == torch.int64, lambda: f"perms must be int64, got {perms.dtype}")
    torch._check(
        perms.dim() == 2 and perms.shape[1] == n and perms.shape[0] >= 1,
        lambda: f"perms must be (K, n) with K >= 1 and n = h*w = {n}, got shape {tuple(perms.shape)}",
    )


def _check_is_permutation(perms):
    # Data-dependent, so only on real tensors (the kernels check the same).
    expected = torch.arange(perms.shape[1], device=perms.device)
    if not torch.equal(perms.sort(dim=1).values, expected.expand_as(perms)):
        raise ValueError("perms: every row must be a permutation of 0..n-1")


def _check_classes_in_range(classes, num_classes):
    # Data-dependent, like _check_is_permutation.
    if classes.numel() and not bool(((classes >= 0) & (classes < num_classes)).all()):
        raise ValueError(f"classes must lie in [0, M) = [0, {num_classes}), the columns of start_logits")


def check_scatter_marginals_args(values, perms, phi, phi_sq):
    torch._check(values.dim() in (2, 3), lambda: f"values must be (K, n+1) or (B, K, n+1), got {tuple(values.shape)}")
    torch._check(values.dtype in FLOAT_DTYPES, lambda: f"values must be floating, got {values.dtype}")
    n = values.shape[-1] - 1
    _check_perms(perms, n)
    torch._check(
        values.shape[-2] == perms.shape[0],
        lambda: f"values has {values.shape[-2]} permutations but perms has {perms.shape[0]}",
    )
    expected = tuple(values.shape[:-2]) + (n,)
    for name, acc in (("phi", phi), ("phi_sq", phi_sq)):
        torch._check(
            tuple(acc.shape) == expected,
            lambda: f"{name} must have shape {expected} to match values, got {tuple(acc.shape)}",
        )
        torch._check(
            acc.dtype in (torch.float32, torch.float64) and acc.dtype == phi.dtype,
            lambda: f"{name} must be float32 or float64 (and phi_sq like phi), got {acc.dtype}",
        )
        torch._check(
            acc.device == values.device and perms.device == values.device,
            lambda: f"values, perms and {name} must be on one device",
        )


def masked_prefixes(
    activations: torch.Tensor,
    baseline: Optional[torch.Tensor],
    perms: torch.Tensor,
    perm_range: Optional[Tuple[int, int]] = None,
    prefix_range: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """Feature maps of every requested prefix of every requested permutation.

    Args:
        activations: (C, h, w) or (B, C, h, w) feature map, any float dtype and strides.
        baseline: value of removed positions, broadcastable to ``activations``; None means 0.
        perms: (K, n) int64; row k is an order of the n = h*w positions.
        perm_range: [start, end) of permutations to produce; default all K.
        prefix_range: [start, end) of prefix lengths t in 0..n; default 0..n (n+1 maps).

    Returns:
        (B*Kc*Tc, C, h, w) in ``torch.channels_last`` layout, ordered image, permutation,
        prefix length (a 3-D input counts as B = 1). Row (b, k, t) keeps ``activations[b, :, p]``
        where permutation k adds p within its first t steps and holds the baseline elsewhere.
        It is the batch a head consumes directly; ranges let callers stream it in chunks.

    Raises:
        ValueError / RuntimeError naming the argument for wrong ranks, dtypes, devices,
        non-permutations and out-of-range bounds (non-permutations: a device-side assert on CUDA).
    """
    if baseline is None:
        baseline = activations.new_zeros(())
    n = activations.shape[-1] * activations.shape[-2]
    perm_start, perm_end = perm_range if perm_range is not None else (0, perms.shape[0])
    prefix_start, prefix_end = prefix_range if prefix_range is not None else (0, n + 1)
    args = (activations, baseline, perms, perm_start, perm_end, prefix_start, prefix_end)
    if COMPILED:
        return torch.ops.shapcam.masked_prefixes(*args)
    check_masked_prefixes_args(*args)
    _check_is_permutation(perms)
    return reference.masked_prefixes(*args)


def _check_unit_size(unit_size, k):
    torch._check(
        isinstance(unit_size, int) and unit_size >= 1 and k % unit_size == 0,
        lambda: f"unit_size must be a positive divisor of K = {k}, got {unit_size}",
    )


def scatter_marginals_(values: torch.Tensor, perms: torch.Tensor, phi: torch.Tensor, phi_sq: torch.Tensor,
                       unit_size: int = 1) -> None:
    """Accumulate marginal contributions along permutations, in place.

    For each permutation k and step t, adds ``values[..., k, t+1] - values[..., k, t]`` to
    ``phi[..., perms[k, t]]``. ``phi_sq`` gets the square of each unit's sum of them: a unit is
    ``unit_size`` consecutive permutations (an antithetic pair is one unit of 2), so that standard
    errors can be computed over independent units. Deterministic on every device.

    Args:
        values: (K, n+1) or (B, K, n+1) worth of each prefix, any float dtype.
        perms: (K, n) int64 permutations.
        phi, phi_sq: (n,) or (B, n) float32/float64 accumulators, modified in place.
        unit_size: permutations per unit; divides K.
    """
    if COMPILED:
        torch.ops.shapcam.scatter_marginals_(values, perms, phi, phi_sq, unit_size)
        return
    _check_unit_size(unit_size, perms.shape[0])
    check_scatter_marginals_args(values, perms, phi, phi_sq)
    _check_is_permutation(perms)
    reference.scatter_marginals_(values, perms, phi, phi_sq, unit_size)


def check_linear_walk_args(start_logits, deltas, perms, classes, phi, phi_sq):
    torch._check(
        start_logits.dim() == 2 and deltas.dim() == 3 and deltas.shape[0] == start_logits.shape[0]
        and deltas.shape[2] == start_logits.shape[1],
        lambda: f"start_logits must be (B, M) and deltas (B, n, M), got {tuple(start_logits.shape)} "
        f"and {tuple(deltas.shape)}",
    )
    torch._check(
        start_logits.dtype in FLOAT_DTYPES and deltas.dtype == start_logits.dtype,
        lambda: f"start_logits and deltas must share one float dtype, got {start_logits.dtype}, {deltas.dtype}",
    )
    torch._check(
        classes.dtype == torch.int64 and tuple(classes.shape) == (start_logits.shape[0],),
        lambda: f"classes must be int64 of shape (B,) = ({start_logits.shape[0]},), got {classes.dtype} "
        f"{tuple(classes.shape)}",
    )
    torch._check(
        deltas.device == start_logits.device and classes.device == start_logits.device,
        lambda: "start_logits, deltas and classes must be on one device, got "
        f"{start_logits.device}, {deltas.device}, {classes.device}",
    )
    # The accumulators follow scatter_marginals_'s rules, on per-prefix values (B, K, n+1).
    values = start_logits.new_empty((deltas.shape[0], perms.shape[0], deltas.shape[1] + 1))
    check_scatter_marginals_args(values, perms, phi, phi_sq)


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
    """Shapley sampling for heads whose logits are additive in the players, in place.

    The logits of coalition S are ``start_logits[b] + sum(deltas[b, p] for p in S)``. Along
    each permutation the running logits are updated one position at a time and the worth (the
    softmax probability of ``classes[b]``, or its logit when ``softmax=False``) is differenced
    into ``phi`` / ``phi_sq`` exactly as :func:`scatter_marginals_` would; the (K, n+1, M)
    logits are never materialised by the compiled kernels. Both devices walk the logits in the
    inputs' opmath type (float for float32/float16/bfloat16, double for float64; the error
    analysis is in csrc/shapcam_math.h) and accumulate ``phi`` / ``phi_sq`` in their own dtype.

    Args:
        start_logits: (B, M) logits of the empty coalition.
        deltas: (B, n, M) change of the logits when position p joins.
        perms: (K, n) int64 permutations.
        classes: (B,) int64 class scored per image, in [0, M).
        softmax: score the softmax probability (True) or the logit (False).
        phi, phi_sq: (B, n) float32/float64 accumulators, as for :func:`scatter_marginals_`.
        unit_size: permutations per unit; divides K.
    """
    if COMPILED:
        torch.ops.shapcam.linear_walk_(start_logits, deltas, perms, classes, softmax, phi, phi_sq, unit_size)
        return
    _check_unit_size(unit_size, perms.shape[0])
    check_linear_walk_args(start_logits, deltas, perms, classes, phi, phi_sq)
    _check_is_permutation(perms)
    _check_classes_in_range(classes, start_logits.shape[1])
    reference.linear_walk_(start_logits, deltas, perms, classes, softmax, phi, phi_sq, unit_size)


def linear_walk_bytes(batch: int, permutations: int, n: int, classes: int) -> int:
    """Bytes :func:`linear_walk_` allocates for this work on the active backend: the compiled
    kernels keep only each prefix's worth; the reference materialises every prefix's logits."""
    if COMPILED:
        return batch * permutations * (n + 1) * 8
    return 4 * batch * permutations * (n + 1) * classes * 8


if COMPILED:

    @torch.library.register_fake("shapcam::masked_prefixes")
    def _masked_prefixes_fake(activations, baseline, perms, perm_start, perm_end, prefix_start, prefix_end):
        check_masked_prefixes_args(activations, baseline, perms, perm_start, perm_end, prefix_start, prefix_end)
        b = activations.shape[0] if activations.dim() == 4 else 1
        c, h, w = activations.shape[-3:]
        rows = b * (perm_end - perm_start) * (prefix_end - prefix_start)
        return torch.empty(
            (rows, c, h, w), dtype=activations.dtype, device=activations.device, memory_format=torch.channels_last
        )

    @torch.library.register_fake("shapcam::scatter_marginals_")
    def _scatter_marginals_fake(values, perms, phi, phi_sq, unit_size=1):
        check_scatter_marginals_args(values, perms, phi, phi_sq)
        _check_unit_size(unit_size, perms.shape[0])

    @torch.library.register_fake("shapcam::linear_walk_")
    def _linear_walk_fake(start_logits, deltas, perms, classes, softmax, phi, phi_sq, unit_size=1):
        check_linear_walk_args(start_logits, deltas, perms, classes, phi, phi_sq)
        _check_unit_size(unit_size, perms.shape[0])

    def _masked_prefixes_setup(ctx, inputs, output):
        activations, baseline, perms, perm_start, perm_end, prefix_start, prefix_end = inputs
        ctx.save_for_backward(perms)
        ctx.ranges = (perm_start, perm_end, prefix_start, prefix_end)
        ctx.shapes = (activations.shape, baseline.shape)

    def _masked_prefixes_backward(ctx, grad):
        # Each output element came from exactly one of activations / baseline: route it back.
        (perms,) = ctx.saved_tensors
        perm_start, perm_end, prefix_start, prefix_end = ctx.ranges
        act_shape, base_shape = ctx.shapes
        c, h, w = act_shape[-3:]
        ranks = reference.permutation_ranks(perms[perm_start:perm_end]).view(1, -1, 1, 1, h * w)
        lengths = torch.arange(prefix_start, prefix_end, device=grad.device).view(1, 1, -1, 1, 1)
        keep = ranks < lengths
        g = grad.reshape(-1, perm_end - perm_start, prefix_end - prefix_start, c, h * w)
        grad_act = torch.where(keep, g, 0).sum((1, 2)).reshape(act_shape)
        grad_base = torch.where(keep, 0, g).sum((1, 2)).reshape(act_shape).sum_to_size(base_shape)
        return grad_act, grad_base, None, None, None, None, None

    torch.library.register_autograd(
        "shapcam::masked_prefixes", _masked_prefixes_backward, setup_context=_masked_prefixes_setup
    )


def permutation_ranks(perms: torch.Tensor) -> torch.Tensor:
    """rank[k, p] = the step at which permutation k adds position p (the inverse permutations)."""
    return reference.permutation_ranks(perms)
