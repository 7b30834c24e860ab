"""Typed Python API of the compiled ops, their fake kernels and autograd.

The ops live in the ``shapcam`` namespace (schemas in csrc/shapcam.cpp); the wrappers take their
arguments in schema order. When the compiled library is absent, the same functions run the
pure-PyTorch references (shapcam_ext.reference), with the same checks.

A round of sampling validates its permutations once: :func:`permutation_ranks` checks that every
row is a permutation and inverts it. The ops that read positions by step (:func:`masked_prefixes`,
:func:`scatter_marginals`) take those ranks; the walks take the permutations. None checks the
permutation property again: each checks the bounds of the indices it reads memory with. Bad
values raise ValueError on the CPU and with the reference. The CUDA kernels never read device data
back to the host (so they can run inside CUDA graphs): they check values with device-side
asserts, which end the CUDA context. The engine's permutations are argsorts of random numbers
(shapcam_ext.sampling), permutations by construction.

Differentiable: :func:`masked_prefixes` (in activations and baseline), :func:`scatter_marginals`
(in values) and :func:`linear_walk` (in start_logits and deltas), on every device; each backward
computes only the gradients autograd asks for. The in-place accumulators
:func:`scatter_marginals_` and :func:`linear_walk_` are for sums that need no gradient, and
refuse an accumulator that requires one.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from shapcam_ext import reference
from shapcam_ext._backend import COMPILED
from shapcam_ext.numerics import opmath

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SUM_DTYPES = (torch.float32, torch.float64)
NOT_PERMUTATION = "perms: every row must be a permutation of 0..n-1"
RANK_OUT_OF_RANGE = "ranks must lie in [0, n), the steps of a permutation: compute them with permutation_ranks(perms)"
PERM_OUT_OF_RANGE = "perms must lie in [0, n), the positions of the map"


# ---- checks shared by the reference path and the fake kernels ----------------------------------


def _check_defined(t, name: str, fix: str = "pass a tensor") -> None:
    if t is None:
        raise ValueError(f"{name} is None; {fix}")


def _check_order_table(table, name: str, n) -> None:
    """perms or ranks: (K, n) int64, K >= 1."""
    _check_defined(table, name)
    torch._check(table.dtype == torch.int64,
                 lambda: f"{name} must be int64, got {table.dtype}; convert it with {name}.long()")
    torch._check(
        table.dim() == 2 and table.shape[1] == n and table.shape[0] >= 1,
        lambda: f"{name} must be (K, n) with K >= 1 and n = h*w = {n}, got shape {tuple(table.shape)}",
    )


def _check_range(name: str, start, end, size, what: str) -> None:
    # One condition per check: each may be symbolic under torch.compile.
    for ok in (0 <= start, start < end, end <= size):
        torch._check(ok, lambda: f"{name} [{start}, {end}) must satisfy 0 <= start < end <= {what} = {size}")


def check_masked_prefixes_args(activations, baseline, ranks, perm_start, perm_end, prefix_start, prefix_end):
    _check_defined(activations, "activations")
    _check_defined(baseline, "baseline", "pass a tensor (activations.new_zeros(()) for zeros)")
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
    n = activations.shape[-1] * activations.shape[-2]
    _check_order_table(ranks, "ranks", n)
    torch._check(
        baseline.device == activations.device and ranks.device == activations.device,
        lambda: "activations, baseline and ranks must be on one device, got "
        f"{activations.device}, {baseline.device}, {ranks.device}",
    )
    torch._check(
        baseline.dim() <= activations.dim()
        and all(s in (1, a) for s, a in zip(reversed(baseline.shape), reversed(activations.shape))),
        lambda: f"baseline of shape {tuple(baseline.shape)} does not broadcast to activations {tuple(activations.shape)}",
    )
    _check_range("perm_range", perm_start, perm_end, ranks.shape[0], "K")
    _check_range("prefix_range", prefix_start, prefix_end, n + 1, "n+1")


def check_scatter_marginals_args(values, ranks):
    _check_defined(values, "values")
    torch._check(values.dim() in (2, 3), lambda: f"values must be (K, n+1) or (B, K, n+1), got {tuple(values.shape)}")
    torch._check(values.dtype in FLOAT_DTYPES, lambda: f"values must be floating, got {values.dtype}")
    _check_order_table(ranks, "ranks", values.shape[-1] - 1)
    torch._check(
        values.shape[-2] == ranks.shape[0],
        lambda: f"values has {values.shape[-2]} permutations but ranks has {ranks.shape[0]}",
    )
    torch._check(ranks.device == values.device,
                 lambda: f"values and ranks must be on one device, got {values.device}, {ranks.device}")


def check_linear_walk_args(start_logits, deltas, perms, classes):
    for name, t in (("start_logits", start_logits), ("deltas", deltas), ("classes", classes)):
        _check_defined(t, name)
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
    _check_order_table(perms, "perms", deltas.shape[1])
    torch._check(
        deltas.device == start_logits.device and classes.device == start_logits.device
        and perms.device == start_logits.device,
        lambda: "start_logits, deltas, perms and classes must be on one device, got "
        f"{start_logits.device}, {deltas.device}, {perms.device}, {classes.device}",
    )


def check_linear_walk_backward_args(grad_phi, start_logits, deltas, perms, classes):
    check_linear_walk_args(start_logits, deltas, perms, classes)
    _check_defined(grad_phi, "grad_phi")
    b, n = deltas.shape[0], deltas.shape[1]
    torch._check(grad_phi.dim() == 2 and tuple(grad_phi.shape) == (b, n),
                 lambda: f"grad_phi must be (B, n) = ({b}, {n}), got {tuple(grad_phi.shape)}")
    torch._check(grad_phi.dtype in SUM_DTYPES, lambda: f"grad_phi must be float32 or float64, got {grad_phi.dtype}")
    torch._check(grad_phi.device == start_logits.device,
                 lambda: f"grad_phi and start_logits must be on one device, got {grad_phi.device}, {start_logits.device}")


def _check_accumulators(batch: tuple, n, k, phi, phi_sq, device, unit_size) -> None:
    """Shape, dtype and device of in-place accumulators for values with batch dims ``batch``."""
    torch._check(
        unit_size >= 1 and k % unit_size == 0,
        lambda: f"unit_size must be a positive divisor of K = {k}, got {unit_size}",
    )
    expected = tuple(batch) + (n,)
    for name, acc in (("phi", phi), ("phi_sq", phi_sq)):
        _check_defined(acc, name)
        torch._check(
            tuple(acc.shape) == expected,
            lambda: f"{name} must have shape {expected} to match values, got {tuple(acc.shape)}",
        )
        torch._check(
            acc.dtype in SUM_DTYPES and acc.dtype == phi.dtype,
            lambda: f"{name} must be float32 or float64 (and phi_sq like phi), got {acc.dtype}",
        )
        torch._check(acc.device == device,
                     lambda: f"the inputs and {name} must be on one device, got {device}, {acc.device}")


def _sum_dtype(dtype: Optional[torch.dtype], inputs: torch.dtype) -> torch.dtype:
    out = dtype if dtype is not None else opmath(inputs)
    torch._check(out in SUM_DTYPES, lambda: f"dtype must be float32 or float64, got {out}")
    return out


# ---- checks of values and memory: eager, on the reference path only (the kernels make them) -----


def _check_is_permutation(perms: torch.Tensor) -> None:
    expected = torch.arange(perms.shape[1], device=perms.device)
    if not torch.equal(perms.sort(dim=1).values, expected.expand_as(perms)):
        raise ValueError(NOT_PERMUTATION)


def _check_in_range(table: torch.Tensor, size: int, message: str) -> None:
    if table.numel() and not bool(((table >= 0) & (table < size)).all()):
        raise ValueError(message)


def _check_classes_in_range(classes: torch.Tensor, num_classes: int) -> None:
    _check_in_range(classes, num_classes,
                    f"classes must lie in [0, M) = [0, {num_classes}), the columns of start_logits")


def _element_offsets(t: torch.Tensor) -> set:
    offsets = torch.tensor(t.storage_offset())
    for size, stride in zip(t.shape, t.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size) * stride
    return set(offsets.flatten().tolist())


def _check_writable(op: str, phi: torch.Tensor, phi_sq: torch.Tensor) -> None:
    """What the kernels refuse of in-place accumulators, beyond shapes (csrc/checks.h)."""
    for name, acc in (("phi", phi), ("phi_sq", phi_sq)):
        if acc.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"{name} requires grad, and {op} has no derivative: accumulate under "
                               f"torch.no_grad() or into {name}.detach(), or use the differentiable {op[:-1]}")
    if (phi.numel() and phi_sq.numel() and phi.untyped_storage().data_ptr() == phi_sq.untyped_storage().data_ptr()
            and _element_offsets(phi) & _element_offsets(phi_sq)):
        raise RuntimeError("phi and phi_sq share memory (phi would get the squares too); pass separate tensors, "
                           "e.g. phi_sq = torch.zeros_like(phi)")


def _pair(value, name: str, default: Tuple[int, int]) -> Tuple[int, int]:
    if value is None:
        return default
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a (start, end) pair, got {value!r}")
    return value[0], value[1]


# ---- the ops ------------------------------------------------------------------------------------


def permutation_ranks(perms: torch.Tensor) -> torch.Tensor:
    """The inverse of each permutation, after checking that it is one.

    Compute them once per round of sampling and pass them to :func:`masked_prefixes` and
    :func:`scatter_marginals` / :func:`scatter_marginals_`, which do not check again.

    Args:
        perms: (K, n) int64; row k is an order of the n positions.

    Returns:
        (K, n) int64 ``ranks``: ``ranks[k, p]`` is the step (0..n-1) at which permutation k adds p.

    Raises:
        ValueError when a row is not a permutation of 0..n-1 (on CUDA: a device-side assert);
        RuntimeError for a perms that is not a 2-D int64 tensor.
    """
    if COMPILED:
        return torch.ops.shapcam.permutation_ranks(perms)
    _check_defined(perms, "perms")
    torch._check(perms.dtype == torch.int64 and perms.dim() == 2,
                 lambda: f"perms must be a (K, n) int64 tensor, got {perms.dtype} of shape {tuple(perms.shape)}")
    _check_is_permutation(perms)
    return reference.permutation_ranks(perms)


def masked_prefixes(
    activations: torch.Tensor,
    baseline: Optional[torch.Tensor],
    ranks: torch.Tensor,
    perm_range: Optional[Tuple[int, int]] = None,
    prefix_range: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """Feature maps of every requested prefix of every requested permutation.

    Args:
        activations: (C, h, w) or (B, C, h, w) feature map, any float dtype and strides.
        baseline: value of removed positions, broadcastable to ``activations``; None means 0.
        ranks: (K, n) int64 from :func:`permutation_ranks`: position p is kept in the first
            ``ranks[k, p] + 1`` and later prefixes of permutation k (n = h*w).
        perm_range: (start, end) of permutations to produce; default all K.
        prefix_range: (start, end) of prefix lengths t in 0..n; default 0..n (n+1 maps).

    Returns:
        (B*Kc*Tc, C, h, w) in ``torch.channels_last`` layout, ordered image, permutation,
        prefix length (a 3-D input counts as B = 1). Row (b, k, t) keeps ``activations[b, :, p]``
        where ``ranks[k, p] < t`` and holds the baseline elsewhere. It is the batch a head
        consumes directly; ranges let callers stream it in chunks. Differentiable in activations
        and baseline.

    Raises:
        ValueError / RuntimeError naming the argument for wrong ranks, dtypes, devices, ranges
        that are not (start, end) pairs and out-of-range bounds.
    """
    _check_defined(activations, "activations")
    _check_defined(ranks, "ranks")
    if baseline is None:
        baseline = activations.new_zeros(())
    n = activations.shape[-1] * activations.shape[-2]
    perm_start, perm_end = _pair(perm_range, "perm_range", (0, ranks.shape[0]))
    prefix_start, prefix_end = _pair(prefix_range, "prefix_range", (0, n + 1))
    args = (activations, baseline, ranks, perm_start, perm_end, prefix_start, prefix_end)
    if COMPILED:
        return torch.ops.shapcam.masked_prefixes(*args)
    check_masked_prefixes_args(*args)
    return reference.masked_prefixes(*args)


def scatter_marginals(values: torch.Tensor, ranks: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Each position's marginal contributions summed over the permutations, out of place.

    ``out[..., p] = sum_k values[..., k, r+1] - values[..., k, r]`` with ``r = ranks[k, p]``, in
    ``dtype``. Differentiable in ``values`` (twice: the formula is linear); deterministic.

    Args:
        values: (K, n+1) or (B, K, n+1) worth of each prefix, any float dtype.
        ranks: (K, n) int64 from :func:`permutation_ranks`.
        dtype: float32 or float64; default the opmath type of ``values`` (float64 for float64
            values, else float32).

    Returns:
        (n,) or (B, n) sums.

    Raises:
        ValueError for a rank outside [0, n) (on CUDA: a device-side assert); RuntimeError naming
        the argument for wrong shapes, dtypes and devices.
    """
    if COMPILED:
        return torch.ops.shapcam.scatter_marginals(values, ranks, dtype)
    check_scatter_marginals_args(values, ranks)
    _check_in_range(ranks, values.shape[-1] - 1, RANK_OUT_OF_RANGE)
    return reference.scatter_marginals(values, ranks, _sum_dtype(dtype, values.dtype))


def scatter_marginals_(values: torch.Tensor, ranks: torch.Tensor, phi: torch.Tensor, phi_sq: torch.Tensor,
                       unit_size: int = 1) -> None:
    """Accumulate marginal contributions along permutations, in place, with no gradient.

    Adds :func:`scatter_marginals`'s sums to ``phi``. ``phi_sq`` gets the square of each unit's
    sum of marginals: a unit is ``unit_size`` consecutive permutations (an antithetic pair is one
    unit of 2), so that standard errors can be computed over independent units. Deterministic on
    every device.

    Args:
        values: (K, n+1) or (B, K, n+1) worth of each prefix, any float dtype.
        ranks: (K, n) int64 from :func:`permutation_ranks`.
        phi, phi_sq: (n,) or (B, n) float32/float64 accumulators, modified in place: separate
            memory, and no gradient required while grad mode is on.
        unit_size: permutations per unit; divides K.

    Raises:
        as :func:`scatter_marginals`, and RuntimeError for accumulators that share memory or
        require grad.
    """
    if COMPILED:
        torch.ops.shapcam.scatter_marginals_(values, ranks, phi, phi_sq, unit_size)
        return
    check_scatter_marginals_args(values, ranks)
    n, k = values.shape[-1] - 1, ranks.shape[0]
    _check_accumulators(tuple(values.shape[:-2]), n, k, phi, phi_sq, values.device, unit_size)
    _check_writable("scatter_marginals_", phi, phi_sq)
    _check_in_range(ranks, n, RANK_OUT_OF_RANGE)
    reference.scatter_marginals_(values, ranks, phi, phi_sq, unit_size)


def linear_walk(
    start_logits: torch.Tensor,
    deltas: torch.Tensor,
    perms: torch.Tensor,
    classes: torch.Tensor,
    softmax: bool,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Shapley sums for heads whose logits are additive in the players, out of place.

    The logits of coalition S are ``start_logits[b] + sum(deltas[b, p] for p in S)``. Along
    each permutation the running logits are updated one position at a time and the worth (the
    softmax probability of ``classes[b]``, or its logit when ``softmax=False``) is stored in
    ``dtype``; each step's marginal goes to the position it adds, and the result is their sum
    over the permutations. The compiled kernels never materialise the (K, n+1, M) logits. Both
    devices and the reference walk the logits in the inputs' opmath type (float for
    float32/float16/bfloat16, double for float64; the error analysis is in csrc/shapcam_math.h)
    and sum in ``dtype``.

    Differentiable in start_logits and deltas, for permutations (rows with repeated positions
    give a gradient that is not the derivative). The backward (:func:`linear_walk_backward`)
    walks every permutation again, O(K n M) like the forward, and keeps the inputs, ``perms``
    and, on CUDA, three opmath numbers per step of every walk (the softmax's max and sum, and the
    worth); it has no derivative of its own (no double backward). The reference backend also
    recomputes its walk in the backward (a checkpoint), and can be differentiated twice.

    Args:
        start_logits: (B, M) logits of the empty coalition.
        deltas: (B, n, M) change of the logits when position p joins.
        perms: (K, n) int64 permutations (checked by :func:`permutation_ranks`; here only their
            bounds).
        classes: (B,) int64 class scored per image, in [0, M).
        softmax: score the softmax probability (True) or the logit (False).
        dtype: float32 or float64 of the sums; default the inputs' opmath type.

    Returns:
        (B, n) sums.

    Raises:
        ValueError for perms or classes out of range (on CUDA: a device-side assert);
        RuntimeError naming the argument for wrong shapes, dtypes and devices.
    """
    if COMPILED:
        return torch.ops.shapcam.linear_walk(start_logits, deltas, perms, classes, softmax, dtype)
    check_linear_walk_args(start_logits, deltas, perms, classes)
    _check_in_range(perms, deltas.shape[1], PERM_OUT_OF_RANGE)
    _check_classes_in_range(classes, start_logits.shape[1])
    # As the compiled backward walks again, the reference's recomputes its walk rather than keep
    # the (B, K, n+1, M) logits.
    return checkpoint(reference.linear_walk, start_logits, deltas, perms, classes, softmax,
                      _sum_dtype(dtype, deltas.dtype), use_reentrant=False)


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
    """:func:`linear_walk`, accumulated in place into ``phi`` / ``phi_sq`` in their own dtype
    exactly as :func:`scatter_marginals_` would, with no gradient.

    Args:
        start_logits, deltas, perms, classes, softmax: as for :func:`linear_walk`.
        phi, phi_sq: (B, n) float32/float64 accumulators, as for :func:`scatter_marginals_`.
        unit_size: permutations per unit; divides K.
    """
    if COMPILED:
        torch.ops.shapcam.linear_walk_(start_logits, deltas, perms, classes, softmax, phi, phi_sq, unit_size)
        return
    check_linear_walk_args(start_logits, deltas, perms, classes)
    n = deltas.shape[1]
    _check_accumulators((deltas.shape[0],), n, perms.shape[0], phi, phi_sq, start_logits.device, unit_size)
    _check_writable("linear_walk_", phi, phi_sq)
    _check_in_range(perms, n, PERM_OUT_OF_RANGE)
    _check_classes_in_range(classes, start_logits.shape[1])
    reference.linear_walk_(start_logits, deltas, perms, classes, softmax, phi, phi_sq, unit_size)


def linear_walk_backward(
    grad_phi: torch.Tensor,
    start_logits: torch.Tensor,
    deltas: torch.Tensor,
    perms: torch.Tensor,
    classes: torch.Tensor,
    softmax: bool,
    output_mask: Sequence[bool] = (True, True),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The gradients of :func:`linear_walk`'s output with respect to start_logits and deltas.

    Autograd calls it through :func:`linear_walk`'s formula; it is public for the tests and for
    callers that need the vector-Jacobian product itself.

    Args:
        grad_phi: (B, n) float32/float64 cotangent of the output; its dtype is the one the
            gradients are summed in.
        start_logits, deltas, perms, classes, softmax: as for :func:`linear_walk`.
        output_mask: which of (start_logits, deltas) to compute a gradient for.

    Returns:
        (grad_start_logits (B, M), grad_deltas (B, n, M)) in the inputs' dtype; a gradient not
        asked for is not computed and comes back with a leading dimension of 0.
    """
    mask = [bool(m) for m in output_mask]
    if COMPILED:
        return torch.ops.shapcam.linear_walk_backward(grad_phi, start_logits, deltas, perms, classes, softmax, mask)
    check_linear_walk_backward_args(grad_phi, start_logits, deltas, perms, classes)
    _check_in_range(perms, deltas.shape[1], PERM_OUT_OF_RANGE)
    _check_classes_in_range(classes, start_logits.shape[1])
    return reference.linear_walk_backward(grad_phi, start_logits, deltas, perms, classes, softmax, mask)


def linear_walk_bytes(batch: int, permutations: int, n: int, classes: int) -> int:
    """Bytes :func:`linear_walk_` allocates for this work on the active backend: the compiled
    kernels keep at most each step's marginal; the reference materialises every prefix's logits."""
    if COMPILED:
        return batch * permutations * (n + 1) * 8
    return 4 * batch * permutations * (n + 1) * classes * 8


# ---- fake kernels and autograd of the compiled ops ----------------------------------------------


def _scatter_marginals_values_grad(grad: torch.Tensor, ranks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient of scatter_marginals with respect to values (..., K, n+1): values[k, t] is
    the worth after step t, which ends the marginal of the position of rank t-1 and starts that of
    rank t. Written in differentiable ops, so that it has a derivative too."""
    k, n = ranks.shape
    per_step = grad.unsqueeze(-2).expand(*grad.shape[:-1], k, n)
    # placed[..., k, r+1] = grad[..., p] for r = ranks[k, p]; placed[..., 0] = placed[..., n+1] = 0.
    placed = grad.new_zeros(*per_step.shape[:-1], n + 2).scatter(-1, (ranks + 1).expand(per_step.shape), per_step)
    return (placed[..., :-1] - placed[..., 1:]).to(dtype)


if COMPILED:

    @torch.library.register_fake("shapcam::permutation_ranks")
    def _permutation_ranks_fake(perms):
        torch._check(perms.dtype == torch.int64 and perms.dim() == 2,
                     lambda: f"perms must be (K, n) int64, got {perms.dtype} of shape {tuple(perms.shape)}")
        return torch.empty_like(perms, memory_format=torch.contiguous_format)

    @torch.library.register_fake("shapcam::masked_prefixes")
    def _masked_prefixes_fake(activations, baseline, ranks, perm_start, perm_end, prefix_start, prefix_end):
        check_masked_prefixes_args(activations, baseline, ranks, perm_start, perm_end, prefix_start, prefix_end)
        b = activations.shape[0] if activations.dim() == 4 else 1
        c, h, w = activations.shape[-3:]
        rows = b * (perm_end - perm_start) * (prefix_end - prefix_start)
        return torch.empty(
            (rows, c, h, w), dtype=activations.dtype, device=activations.device, memory_format=torch.channels_last
        )

    @torch.library.register_fake("shapcam::scatter_marginals")
    def _scatter_marginals_fake(values, ranks, dtype=None):
        check_scatter_marginals_args(values, ranks)
        return values.new_empty((*values.shape[:-2], values.shape[-1] - 1), dtype=_sum_dtype(dtype, values.dtype))

    @torch.library.register_fake("shapcam::scatter_marginals_")
    def _scatter_marginals_inplace_fake(values, ranks, phi, phi_sq, unit_size=1):
        check_scatter_marginals_args(values, ranks)
        _check_accumulators(tuple(values.shape[:-2]), values.shape[-1] - 1, ranks.shape[0], phi, phi_sq,
                            values.device, unit_size)

    @torch.library.register_fake("shapcam::linear_walk")
    def _linear_walk_fake(start_logits, deltas, perms, classes, softmax, dtype=None):
        check_linear_walk_args(start_logits, deltas, perms, classes)
        return deltas.new_empty(deltas.shape[:2], dtype=_sum_dtype(dtype, deltas.dtype))

    @torch.library.register_fake("shapcam::linear_walk_")
    def _linear_walk_inplace_fake(start_logits, deltas, perms, classes, softmax, phi, phi_sq, unit_size=1):
        check_linear_walk_args(start_logits, deltas, perms, classes)
        _check_accumulators((deltas.shape[0],), deltas.shape[1], perms.shape[0], phi, phi_sq, start_logits.device,
                            unit_size)

    @torch.library.register_fake("shapcam::linear_walk_backward")
    def _linear_walk_backward_fake(grad_phi, start_logits, deltas, perms, classes, softmax, output_mask):
        check_linear_walk_backward_args(grad_phi, start_logits, deltas, perms, classes)
        b = start_logits.shape[0]
        return (start_logits.new_empty((b if output_mask[0] else 0, *start_logits.shape[1:])),
                deltas.new_empty((b if output_mask[1] else 0, *deltas.shape[1:])))

    def _masked_prefixes_setup(ctx, inputs, output):
        activations, baseline, ranks, perm_start, perm_end, prefix_start, prefix_end = inputs
        ctx.save_for_backward(ranks)
        ctx.ranges = (perm_start, perm_end, prefix_start, prefix_end)
        ctx.shapes = (activations.shape, baseline.shape)

    def _masked_prefixes_backward(ctx, grad):
        # Each output element came from exactly one of activations / baseline: route it back.
        (ranks,) = ctx.saved_tensors
        perm_start, perm_end, prefix_start, prefix_end = ctx.ranges
        act_shape, base_shape = ctx.shapes
        want_act, want_base = ctx.needs_input_grad[:2]
        if not (want_act or want_base):
            return (None,) * 7
        c, h, w = act_shape[-3:]
        kc, tc = perm_end - perm_start, prefix_end - prefix_start
        steps = ranks[perm_start:perm_end].view(1, kc, 1, 1, h * w)
        lengths = torch.arange(prefix_start, prefix_end, device=grad.device).view(1, 1, tc, 1, 1)
        keep = steps < lengths
        g = grad.reshape(act_shape[0] if len(act_shape) == 4 else 1, kc, tc, c, h * w)
        grad_act = torch.where(keep, g, 0).sum((1, 2)).reshape(act_shape) if want_act else None
        grad_base = torch.where(keep, 0, g).sum((1, 2)).reshape(act_shape).sum_to_size(base_shape) if want_base else None
        return grad_act, grad_base, None, None, None, None, None

    torch.library.register_autograd(
        "shapcam::masked_prefixes", _masked_prefixes_backward, setup_context=_masked_prefixes_setup
    )

    def _scatter_marginals_setup(ctx, inputs, output):
        values, ranks, _ = inputs
        ctx.save_for_backward(ranks)
        ctx.values_dtype = values.dtype

    def _scatter_marginals_backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (ranks,) = ctx.saved_tensors
        return _scatter_marginals_values_grad(grad, ranks, ctx.values_dtype), None, None

    torch.library.register_autograd(
        "shapcam::scatter_marginals", _scatter_marginals_backward, setup_context=_scatter_marginals_setup
    )

    def _linear_walk_setup(ctx, inputs, output):
        start_logits, deltas, perms, classes, softmax, _ = inputs
        ctx.save_for_backward(start_logits, deltas, perms, classes)
        ctx.softmax = softmax

    def _linear_walk_backward(ctx, grad):
        mask = list(ctx.needs_input_grad[:2])
        if not any(mask):
            return (None,) * 6
        start_logits, deltas, perms, classes = ctx.saved_tensors
        grads = torch.ops.shapcam.linear_walk_backward(grad, start_logits, deltas, perms, classes, ctx.softmax, mask)
        return (*(g if wanted else None for g, wanted in zip(grads, mask)), None, None, None, None)

    torch.library.register_autograd("shapcam::linear_walk", _linear_walk_backward, setup_context=_linear_walk_setup)

    def _linear_walk_second_derivative(ctx, *grads):
        # Without this, autograd would warn and return no gradient: wrong, silently.
        raise RuntimeError("linear_walk has no second derivative (linear_walk_backward is not differentiable): "
                           "differentiate the map once, or run the reference backend (SHAPCAM_BACKEND=reference)")

    torch.library.register_autograd("shapcam::linear_walk_backward", _linear_walk_second_derivative,
                                    setup_context=lambda ctx, inputs, output: None)
