"""Rounding-error bounds: every tolerance of the test suite comes from here (the primitives, from
shapcam_ext.numerics, which the engine's self-check uses too).

Two computations that are equal in exact arithmetic (a kernel and its reference, the CPU and
the GPU, a fast path and the generic path, one chunking and another) differ by at most the sum
of their bounds against the exact result. The bounds follow the standard model of floating-point
arithmetic, fl(a op b) = (a op b)(1 + d) with |d| <= u, and are written out below; each test says
which of them it uses. They do not depend on the CPU's SIMD width, on MKL's code path
(MKL_CBWR), on ATen's kernels (ATEN_CPU_CAPABILITY) or on the thread count: those change the
order of the roundings, not their number.

Precision policy (csrc/shapcam_math.h): linear_walk(_) walks the logits in the opmath type of its
inputs (float for float32/float16/bfloat16, double for float64) on both devices and in the
reference, stores each prefix's worth in phi's dtype, and differences and sums the worths there;
its backward sums in the dtype of phi's gradient.

References: N. J. Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed. (SIAM 2002),
Lemma 3.1 and section 4.2 (sums), section 3.1 (dot products); N. J. Higham and T. Mary, A New
Approach to Probabilistic Rounding Error Analysis, SIAM J. Sci. Comput. 41 (2019) A2815.
"""
from __future__ import annotations

import math
from typing import Iterable, Union

import torch
import torch.nn.functional as F
from torch import nn

from shapcam_ext.head import split_model
# The analysis itself lives in the package, whose self-check uses it too; re-exported here.
from shapcam_ext.numerics import (  # noqa: F401
    EXP_ROUNDINGS, LIKELY_LAMBDA, LogitScale, gamma, gamma_likely, head_sums, opmath, softmax_rounding,
    softmax_sensitivity, unit_roundoff)
from shapcam_ext.reference import permutation_ranks, walk_values

# ---- from worths to maps ----------------------------------------------------------------------


def map_error(value_error: float) -> float:
    """A Shapley estimate (a mean of marginals, or the exact sum with weights summing to 1) is
    within 2 * value_error of its exact value when every worth is within value_error: each
    marginal is a difference of two worths."""
    return 2 * value_error


def assert_within(got: torch.Tensor, expected: torch.Tensor, bound, what: str) -> None:
    """|got - expected| <= bound elementwise (bound: a number or a broadcastable tensor)."""
    got, expected = torch.as_tensor(got).double().cpu(), torch.as_tensor(expected).double().cpu()
    bound = torch.as_tensor(bound, dtype=torch.float64).cpu()
    excess = (got - expected).abs() - bound
    worst = int(excess.flatten().argmax()) if excess.numel() else 0
    assert got.shape == expected.shape and bool((excess <= 0).all()), (
        f"{what}: |got - expected| exceeds its rounding bound at flat index {worst}: got "
        f"{got.flatten()[worst].item():.10g}, expected {expected.flatten()[worst].item():.10g}, "
        f"bound {bound.expand_as(got).flatten()[worst].item():.3g}"
    )


# ---- the ops: scatter_marginals(_), linear_walk(_) and their gradients ------------------------


def accumulated_error(values: torch.Tensor, value_error, ranks: torch.Tensor, phi0: torch.Tensor,
                      phi_sq0: torch.Tensor, unit_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds on phi and phi_sq after one scatter_marginals_ of ``values`` onto phi0, phi_sq0, in
    their dtype, when each worth is within ``value_error`` (a number, or one per worth) of the
    exact ``values`` (..., K, n+1).

    A marginal d = v[t+1] - v[t] is computed within e_d = (e[t+1] + e[t])(1 + u) + u |d|, the
    last terms its own rounding. phi adds K marginals to phi0, K roundings in any order (units
    first or not): sum_k e_d + gamma_K (|phi0| + sum_k |d^|), |d^| <= |d| + e_d. A unit's sum S of
    U marginals is within e_S = sum e_d + gamma_{U-1} sum |d^|; its square within
    e_S (2|S| + e_S) + u |S^|^2; phi_sq adds K/U of them to phi_sq0: gamma_{K/U} (|phi_sq0| +
    sum |S^|^2) more.
    """
    acc = phi0.dtype
    u = unit_roundoff(acc)
    values = values.double().cpu()
    error = torch.as_tensor(value_error, dtype=torch.float64).expand_as(values)
    signed = values[..., 1:] - values[..., :-1]
    e_d = (error[..., 1:] + error[..., :-1]) * (1 + u) + u * signed.abs()
    # Each position's marginal from each permutation, like the reference gathers them.
    ranks = ranks.cpu().expand_as(signed)
    signed, e_d = signed.gather(-1, ranks), e_d.gather(-1, ranks)
    rounded = signed.abs() + e_d
    k = values.shape[-2]
    phi = e_d.sum(-2) + gamma(k, acc) * (phi0.double().cpu().abs() + rounded.sum(-2))

    def by_unit(x):
        return x.unflatten(-2, (k // unit_size, unit_size)).sum(-2)

    unit_sum = by_unit(signed).abs()
    e_s = by_unit(e_d) + gamma(unit_size - 1, acc) * by_unit(rounded)
    squares = (unit_sum + e_s) ** 2
    phi_sq = (e_s * (2 * unit_sum + e_s) + u * squares).sum(-2) + gamma(k // unit_size, acc) * (
        phi_sq0.double().cpu().abs() + squares.sum(-2))
    return phi, phi_sq


def scatter_error(values: torch.Tensor, ranks: torch.Tensor, phi0: torch.Tensor, phi_sq0: torch.Tensor,
                  unit_size: int = 1) -> tuple:
    """Bounds on one implementation of scatter_marginals_: the worths are given exactly, except
    that float64 worths round once to float32 accumulators."""
    wider = torch.finfo(values.dtype).eps < torch.finfo(phi0.dtype).eps
    value_error = unit_roundoff(phi0.dtype) * values.double().abs() if wider else 0.0
    return accumulated_error(values, value_error, ranks, phi0, phi_sq0, unit_size)


def logit_scale(start: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Z = max_j (|z_0j| + sum_p |d_pj|) per image, (B, 1, 1): no running logit exceeds it."""
    return (start.double().abs() + deltas.double().abs().sum(1)).amax(-1).cpu().view(-1, 1, 1)


def walk_error(start: torch.Tensor, deltas: torch.Tensor, perms: torch.Tensor, classes: torch.Tensor,
               softmax: bool, phi0: torch.Tensor, phi_sq0: torch.Tensor, unit_size: int = 1) -> tuple:
    """Bounds on one implementation of linear_walk_ (a kernel or the reference) that walks the
    logits in the opmath type of the inputs and stores each worth in phi's dtype.

    The running logits z_t = z_0 + d_1 + ... + d_t are recursive sums: within gamma_n Z of exact
    (Higham, eq. 4.4; the inputs are exact in opmath). A logit worth is within that. A softmax
    worth p is within softmax_sensitivity(p) times it plus the max-subtraction's 2 u Z, plus its
    own rounding softmax_rounding * p. Storing the worth rounds once more. The exact worths come
    from the reference walk in float64.
    """
    n, m = deltas.shape[1], deltas.shape[2]
    walk = opmath(deltas.dtype)
    exact = walk_values(start.double().cpu(), deltas.double().cpu(), perms.cpu(), classes.cpu(), softmax,
                        torch.float64)
    z = logit_scale(start, deltas)
    logit_error = gamma(n, walk) * z
    if softmax:
        logit_error = logit_error + 2 * unit_roundoff(walk) * z
        error = softmax_sensitivity(exact, logit_error) * logit_error + softmax_rounding(m, walk) * exact
    else:
        error = logit_error.expand_as(exact)
    error = error + unit_roundoff(phi0.dtype) * (exact.abs() + error)
    return accumulated_error(exact, error, permutation_ranks(perms.cpu()), phi0, phi_sq0, unit_size)


def narrower(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether converting from b to a rounds."""
    return torch.finfo(a).eps > torch.finfo(b).eps


def conversion_error(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bound on rounding x (its magnitude bound) to ``dtype``: u |x|, plus half the spacing of
    the subnormals, where a value below the smallest normal loses relative accuracy (the standard
    model with underflow, Higham section 2.1). That spacing matters for float16 gradients, whose
    normals stop at 6.1e-5."""
    info = torch.finfo(dtype)
    return unit_roundoff(dtype) * x.abs() + info.tiny * info.eps / 2


def walk_gradient(grad_phi: torch.Tensor, start: torch.Tensor, deltas: torch.Tensor, perms: torch.Tensor,
                  classes: torch.Tensor, softmax: bool, acc: torch.dtype) -> tuple:
    """The gradients of linear_walk's output with respect to start (B, M) and deltas (B, n, M) in
    float64, and bounds on one implementation of them that walks the logits in the inputs' opmath
    type, sums in ``acc`` and returns the inputs' dtype: (exact_start, exact_deltas, bound_start,
    bound_deltas).

    Along permutation k the worth after t steps, v_t, has the cotangent a_t = g[p_t] - g[p_{t+1}]
    (shapcam_math.h), and w_t = a_t dv_t/dz_t = a_t v_t (e_c - q_t), q_t the softmax of z_t (a
    logit worth: a_t e_c). The start's gradient sums w_t over k and t; a delta's, over k and the
    steps from the one at which it enters.

    One w_t: the logits are within e = (gamma_n + 2u) Z (walk_error), which moves every q_j by a
    factor within exp(+-2e); with q's own rounding, |q^ - q| <= r q, r = e^{2e} (1 +
    softmax_rounding) - 1, and so |v^ - v| <= r v. Then a (one subtraction), a v, e_c - q and the
    product round once each in acc, and v and q once more when acc is narrower than the walk:
    gamma_6. So |w^ - w| <= |a| v [r (|e_c - q| + (1 + r) q)(1 + gamma_6) + gamma_6 |e_c - q|]; a
    logit's w only rounds a: u |a|.

    The sums: a kernel sums each permutation's w_t (its total), subtracts the partial sum before
    each step, sums over permutations and over its chunks of them; autograd through the reference
    sums the same terms in other orders (a reversed cumsum, K scattered additions, a sum over K
    (n+1) broadcast terms). Either way each entry is a sum of at most N = K (n+1) + n + 2K + 3
    terms, each w counted at most twice: gamma_N times twice the sum of |w^| over its
    permutations. Returning a dtype narrower than acc rounds once more (conversion_error).
    """
    out = deltas.dtype
    walk = opmath(out)
    s, d, g = start.double().cpu(), deltas.double().cpu(), grad_phi.double().cpu()
    perms, classes = perms.cpu(), classes.cpu()
    b, n, m = d.shape
    k = perms.shape[0]
    logits = torch.cat([torch.zeros(b, k, 1, m, dtype=torch.float64), d[:, perms].cumsum(2)], 2) + s[:, None, None]
    entering = g[:, perms]  # (B, K, n): the cotangent of the position that enters at step t+1
    zero = torch.zeros(b, k, 1, dtype=torch.float64)
    a = (torch.cat([zero, entering], -1) - torch.cat([entering, zero], -1)).unsqueeze(-1)  # (B, K, n+1, 1)
    onehot = F.one_hot(classes, m).double().view(b, 1, 1, m)
    g6 = gamma(6, acc)
    if softmax:
        q = logits.softmax(-1)
        v = (q * onehot).sum(-1, keepdim=True)
        e = (gamma(n, walk) + 2 * unit_roundoff(walk)) * logit_scale(start, deltas).unsqueeze(-1)
        r = torch.exp(2 * e) * (1 + softmax_rounding(m, walk)) - 1
        w = a * v * (onehot - q)
        w_error = a.abs() * v * (r * ((onehot - q).abs() + (1 + r) * q) * (1 + g6) + g6 * (onehot - q).abs())
    else:
        w = a * onehot
        w_error = unit_roundoff(acc) * w.abs()
    summed = gamma(k * (n + 1) + n + 2 * k + 3, acc) * 2 * (w.abs() + w_error).sum((1, 2))  # (B, M)

    def from_entry(x):
        """(B, n, M): per position, the sum over permutations of x from its entering step on."""
        suffix = x.flip(2).cumsum(2).flip(2)[:, :, 1:]  # [.., t, ..]: steps t+1..n, entered by perms[k, t]
        return torch.zeros_like(suffix).scatter_add(2, perms.view(1, k, n, 1).expand(suffix.shape), suffix).sum(1)

    exact_start, exact_deltas = w.sum((1, 2)), from_entry(w)
    bound_start, bound_deltas = w_error.sum((1, 2)) + summed, from_entry(w_error) + summed[:, None]
    if narrower(out, acc):
        bound_start = bound_start + conversion_error(exact_start.abs() + bound_start, out)
        bound_deltas = bound_deltas + conversion_error(exact_deltas.abs() + bound_deltas, out)
    return exact_start, exact_deltas, bound_start, bound_deltas


def scatter_gradient_error(exact: torch.Tensor, acc: torch.dtype, out: torch.dtype) -> torch.Tensor:
    """A bound on one implementation of scatter_marginals' gradient with respect to values whose
    exact value (float64) is ``exact``: each entry is the difference of two entries of the
    cotangent (one subtraction in acc), returned in ``out`` (conversion_error)."""
    bound = unit_roundoff(acc) * exact.abs()
    if narrower(out, acc):
        bound = bound + conversion_error(exact.abs() + bound, out)
    return bound


# ---- heads of real models ---------------------------------------------------------------------


def model_value_error(scale: "LogitScale", model: nn.Module, layer, positions: int,
                      target: Union[str, float] = "softmax") -> float:
    """LogitScale.value_error for the head of ``model`` cut after ``layer``, with ``positions``
    players: the layers of its fx graph."""
    return scale.value_error(head_sums(split_model(model, layer).graph_module, positions), target)


def final_linear(model: nn.Module) -> nn.Linear:
    """The last Linear layer registered in a classifier: the one producing the logits."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


# ---- Shapley properties and post-processing ---------------------------------------------------


def efficiency_gap(value_error: float, k: int, n: int, worth_scale: float = 1.0) -> float:
    """A bound on |sum_p phi_p - (v(N) - v(empty))| for an estimate from K permutations of n
    players whose worths are within value_error and at most worth_scale in magnitude.

    The marginals telescope to mean_k (v_k(N) - v_k(empty)): two worths within value_error each,
    and value_full / value_empty are evaluated apart, two more. The float64 accumulators add K
    marginals per player, then n players: gamma_{K+n} times 2 n worth_scale.
    """
    return 4 * value_error + gamma(k + n, torch.float64) * 2 * n * worth_scale


def postprocess_rounding() -> float:
    """The rounding of one float32 post-processing of a map into [0, 1]: subtraction, division
    and a bilinear interpolation (4 products, 3 sums, rounded weights): gamma_10."""
    return gamma(10, torch.float32)


def rescaled_error(input_error: float, maps: torch.Tensor, implementations: int = 2) -> float:
    """A bound on the difference of ``implementations`` post-processings (pytorch-grad-cam's: ReLU,
    per-image min-max to [0, 1], bilinear resize) of (B, h, w) maps within input_error of one
    another.

    ReLU is 1-Lipschitz; y = (x - min) / (max - min + 1e-7) moves by at most
    4 input_error / (max - min + 1e-7) to first order (the numerator by 2 input_error, and y <= 1
    times the denominator's change, 2 input_error, over the denominator); the interpolation is a
    convex combination, which does not amplify. Each implementation adds its own rounding
    (postprocess_rounding).
    """
    cams = maps.double().clamp_min(0).flatten(1)
    spread = float((cams.amax(1) - cams.amin(1)).min())
    return 4 * input_error / (spread + 1e-7) + implementations * postprocess_rounding()


# ---- gradients of maps ------------------------------------------------------------------------


def pooled_softmax_map_gradient_error(activation: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                      perms: torch.Tensor, classes: torch.Tensor, cotangent: torch.Tensor,
                                      dtype: torch.dtype) -> torch.Tensor:
    """A bound, (B, C, h, w), on how far one implementation computing in ``dtype`` is from the
    exact gradient of L = sum(cotangent * phi) with respect to the activation (B, C, h, w), for a
    head that averages the n positions (baseline 0) and applies a Linear (weight (M, C), bias
    (M,)), the worth the softmax probability of ``classes`` (B,), and phi (B, n) the mean of the
    marginals along ``perms`` (K, n); cotangent: (B, n).

    The exact gradient: the worth v_kt of prefix t of permutation k (coalition S_kt) has the
    cotangent a_kt = (w[p_k,t-1] [t >= 1] - w[p_kt] [t < n]) / K, dv/dz = s = p_c (e_c - p), and
    dL/dA[:, q] = sum over (k, t) with q in S_kt of a_kt W^T s_kt / n. Every implementation (the
    walk, the reference's masked maps) sums these K (n+1) M terms per entry, in its own order.

    One term's error: the logits are within e = gamma_{2n+C+2} Z of exact, Z = max_j (|b_j| +
    sum_q |W_j| |A_q| / n) (a walk's running sums: n roundings after each change's dot product of
    C + 2; the reference's pool and dot product: n + C + 1), which moves every p_j by a factor
    within exp(+-2e); with the softmax's own rounding |p^ - p| <= r p, r = e^{2e} (1 +
    softmax_rounding) - 1 (as walk_error). Then |s^_j - s_j| <= r (1 + r) sigma_j, sigma_j = p_c
    (|e_cj - p_j| + p_j) >= |s_j|. The sums and products on the way (the softmax's backward and the
    Linear's, over M classes each; a walk's cumulative sums over n steps and its scatter over K
    permutations, or the reference's sum over K (n+1) masked maps; a few products and
    conversions) are at most N = 2M + K (n+1) + n + K + 10 roundings. So |g^ - g| <= ((1 + r (1 +
    r)) (1 + gamma_N) - 1) times the sum of the terms' bounds |a_kt| sigma_kt |W| / n.
    """
    a_map = activation.double().cpu().flatten(2).transpose(1, 2)  # (B, n, C)
    w, b = weight.double().cpu(), bias.double().cpu()
    perms, classes, cot = perms.cpu(), classes.cpu(), cotangent.double().cpu()
    (k, n), m, c = perms.shape, w.shape[0], w.shape[1]
    keep = (permutation_ranks(perms)[:, None, :] < torch.arange(n + 1)[None, :, None]).double()  # (K, n+1, n)
    logits = torch.einsum("ktq,bqc->bktc", keep, a_map) / n @ w.T + b
    p = logits.softmax(-1)
    onehot = F.one_hot(classes, m).double().view(-1, 1, 1, m)
    sigma = (p * onehot).sum(-1, keepdim=True) * ((onehot - p).abs() + p)
    entering = cot[:, perms]  # (B, K, n): the cotangent of the position each step adds
    zero = torch.zeros(*entering.shape[:2], 1, dtype=torch.float64)
    a = (torch.cat([zero, entering], -1) - torch.cat([entering, zero], -1)).abs() / k  # (B, K, n+1)
    terms = torch.einsum("bkt,bktm,mc,ktq->bcq", a, sigma, w.abs(), keep) / n
    z = (a_map.abs().sum(1) / n @ w.abs().T + b.abs()).amax(-1)  # (B,)
    e = gamma(2 * n + c + 2, dtype) * z
    r = (torch.exp(2 * e) * (1 + softmax_rounding(m, dtype)) - 1).view(-1, 1, 1)
    relative = (1 + r * (1 + r)) * (1 + gamma(2 * m + k * (n + 1) + n + k + 10, dtype)) - 1
    return (relative * terms).view(activation.shape)


def reordered_gradient_error(per_output: torch.Tensor, cotangents: torch.Tensor, roundings: int,
                             dtype: torch.dtype) -> torch.Tensor:
    """A bound on the difference of two implementations of the gradient sum_i c_i do_i/dtheta that
    run the same arithmetic with the roundings in other orders (an eager and a compiled training
    step): per_output (I, ...) the gradients of the I outputs o_i, cotangents (I,) the c_i, and
    ``roundings`` the longest chain of roundings from the parameters to the loss.

    Modelled, as LogitScale.value_errors: each rounding reaches the gradient at most at the scale
    of sum_i |c_i| |do_i/dtheta| (the same terms with their signs dropped), so each implementation
    is within gamma_roundings of it, and two within twice that.
    """
    magnitude = (cotangents.double().abs().view(-1, *[1] * (per_output.dim() - 1)) * per_output.double().abs()).sum(0)
    return 2 * gamma(roundings, dtype) * magnitude
