"""Rounding-error bounds of float computations: the one analysis behind every tolerance.

The engine's self-check (:mod:`shapcam_ext.paths.selfcheck`) holds a fast path to the head within
these bounds, and the test suite (tests/numerics.py) derives every tolerance from them. They follow
the standard model of floating-point arithmetic, fl(a op b) = (a op b)(1 + d) with |d| <= u, and
do not depend on the CPU's SIMD width, MKL's code path (MKL_CBWR), ATen's kernels
(ATEN_CPU_CAPABILITY) or the thread count: those change the order of the roundings, not their
number.

References: N. J. Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed. (SIAM 2002),
Lemma 3.1 and section 4.2 (sums), section 3.1 (dot products); N. J. Higham and T. Mary, A New
Approach to Probabilistic Rounding Error Analysis, SIAM J. Sci. Comput. 41 (2019) A2815.
"""
from __future__ import annotations

import math
from typing import Iterable, Union

import torch
from torch import nn

# exp, as the kernels (Cephes, tests/cpp/test_kernels.cpp checks it) and torch compute it, is
# within 2 ulp = 4u of the exact value: counted as 4 roundings.
EXP_ROUNDINGS = 4
# Higham & Mary's lambda: a product of n roundings exceeds gamma_likely(n) with probability at
# most 2 exp(-lambda^2 / 2) ~ 4e-22, negligible over every dot product the suite computes.
LIKELY_LAMBDA = 10.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """u: the largest relative error of one rounding to ``dtype`` (2^-24 for float32)."""
    return torch.finfo(dtype).eps / 2


def opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype linear_walk_ walks ``dtype`` logits in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gamma(n: int, dtype: torch.dtype) -> float:
    """gamma_n = n u / (1 - n u), the relative error of n roundings (Higham, Lemma 3.1).

    A sum of n + 1 terms in any order, or a dot product of length n, is within gamma_n times the
    sum of the terms' magnitudes of its exact value: a bound that holds for every summation order,
    so for every SIMD width, blocking and thread count.
    """
    nu = n * unit_roundoff(dtype)
    return nu / (1 - nu) if nu < 1 else math.inf


def gamma_likely(n: int, dtype: torch.dtype) -> float:
    """min(gamma_n, gamma~_n): gamma~_n = exp(lambda sqrt(n) u + n u^2 / (1 - u)) - 1 bounds n
    roundings that are independent with mean zero, except with probability <= 2 exp(-lambda^2/2)
    (Higham & Mary, Theorem 2.4). For the long dot products of real heads (n in the thousands),
    where gamma_n grows linearly and no rounding sequence comes near it."""
    u = unit_roundoff(dtype)
    return min(gamma(n, dtype), math.expm1(LIKELY_LAMBDA * math.sqrt(n) * u + n * u * u / (1 - u)))


# ---- a softmax probability --------------------------------------------------------------------


def softmax_sensitivity(p: torch.Tensor, logit_error=0.0) -> torch.Tensor:
    """How far a logit error e (in every logit) moves the softmax probability p_c: by at most
    sum_j |dp_c/dz_j| = 2 q (1 - q) <= 1/2 times e, q the largest p_c along the way. Moving the
    logits by e changes p_c by a factor within exp(+-2e), so q = min(p e^{2e}, 1/2) (2q(1-q) grows
    up to q = 1/2)."""
    q = (p * torch.as_tensor(2 * logit_error, dtype=p.dtype).exp()).clamp(max=0.5)
    return 2 * q * (1 - q)


def softmax_rounding(m: int, dtype: torch.dtype, likely: bool = False) -> float:
    """Relative error of a softmax probability over m classes computed from given logits: exp of
    each max-subtracted logit, their m-term sum in any order, one division (the subtraction's own
    rounding is a logit error). gamma_likely for the many-class heads of real models."""
    n = 2 * EXP_ROUNDINGS + m - 1 + 1
    return gamma_likely(n, dtype) if likely else gamma(n, dtype)


def head_sums(head: nn.Module, positions: int) -> list[int]:
    """The roundings each layer of a head contributes along its longest path: the pool's sum over
    ``positions`` (0: no pool), a Linear's or a convolution's dot product (fan-in + 1 for the
    bias), a layer norm's mean and variance over its channels, and a few (4) for every other
    leaf module with arithmetic (batch norm, activations)."""
    exact = (nn.Dropout, nn.Identity, nn.Flatten, nn.ReLU, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
    pools = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)  # counted by ``positions``
    sums = [positions] if positions else []
    for module in head.modules():
        if isinstance(module, nn.Linear):
            sums.append(module.in_features + 1)
        elif isinstance(module, nn.modules.conv._ConvNd):
            sums.append(module.in_channels // module.groups * math.prod(module.kernel_size) + 1)
        elif isinstance(module, nn.LayerNorm):
            sums.append(2 * math.prod(module.normalized_shape) + 4)
        elif not any(True for _ in module.children()) and not isinstance(module, exact + pools):
            sums.append(EXP_ROUNDINGS)
    return sums


class LogitScale:
    """Records, for every row a layer computes while active, the magnitude of its dot products,
    S = max_c (|W| |h| + |b|)_c, and the row's largest softmax probability: a model's final
    Linear (or the last convolution of a head without one) producing the logits.

    Use as a context manager around the computations whose worths are bounded.
    """

    def __init__(self, linear: nn.Module):
        self.linear = linear
        self.terms: list[torch.Tensor] = []
        self.top_probability: list[torch.Tensor] = []

    def _record(self, module, inputs, output):
        # Magnitudes in float32 at least, not float64: converting a large classifier's weight to
        # float64 would dominate a short run. A sum of L non-negative terms is within gamma_L of
        # exact whatever the order, so scaling by 1 + gamma_L keeps the terms an upper bound.
        dtype = torch.promote_types(module.weight.dtype, torch.float32)
        h = inputs[0].detach().to(dtype).abs()
        weight = module.weight.detach().to(dtype).abs()
        bias = None if module.bias is None else module.bias.detach().to(dtype).abs()
        if isinstance(module, nn.Linear):
            terms = (h @ weight.T + (0 if bias is None else bias)).flatten(0, -2)
            logits = output.detach().flatten(0, -2)
        else:  # a convolution: the same magnitudes, with |W| and |b| convolved over |h|
            terms = module._conv_forward(h, weight, bias).transpose(1, -1).flatten(0, -2)
            logits = output.detach().transpose(1, -1).flatten(0, -2)
        length = weight[0].numel() + 1
        self.terms.append(terms.amax(-1).double().cpu() * (1 + gamma(length, dtype)))
        self.top_probability.append(logits.double().softmax(-1).amax(-1).cpu())

    def __enter__(self) -> "LogitScale":
        self._handle = self.linear.register_forward_hook(self._record)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    @property
    def largest_logit(self) -> float:
        """A bound on every recorded logit's magnitude: the largest S."""
        return float(torch.cat(self.terms).max())

    def value_error(self, sums: Iterable[int], target: Union[str, float] = "softmax") -> float:
        """A bound on how far an evaluation of any recorded row's worth, in the layer's dtype, is
        from exact: the largest of :meth:`value_errors`.

        Raises:
            ValueError: the layer computed nothing while recording.
        """
        return float(self.value_errors(sums, target).max())

    def value_errors(self, sums: Iterable[int], target: Union[str, float] = "softmax") -> torch.Tensor:
        """Per recorded row (in the order computed), a bound on how far an evaluation of its worth,
        in the layer's dtype, is from exact.

        Each layer's dot products (or pooled sums) of length L are within gamma_likely(L) of the
        magnitude of their terms. Modelled assumption: each layer's error reaches the logits at
        most at the scale S of the final dot products (exact for elementwise layers before the
        final Linear; between stacked Linear layers, the margin of gamma_likely over the errors
        actually seen, orders of magnitude, absorbs what amplification there is). So a logit is
        within e_z = S * sum_layers gamma_likely(L). The worth: a logit (target="logit"), a softmax
        probability (within softmax_sensitivity(p) e_z plus its own rounding), or any target
        with the given Lipschitz constant in the logits' max norm.

        Raises:
            ValueError: the layer computed nothing while recording.
        """
        if not self.terms:
            raise ValueError("the final layer computed nothing while recording; record around the evaluations")
        dtype = self.linear.weight.dtype
        terms, top = torch.cat(self.terms), torch.cat(self.top_probability)
        logit_error = terms * sum(gamma_likely(n, dtype) for n in sums)
        if target == "logit":
            return logit_error
        if target == "softmax":
            rounding = softmax_rounding(self.linear.weight.shape[0], dtype, likely=True)
            return softmax_sensitivity(top, logit_error) * logit_error + rounding * top
        return float(target) * logit_error

__all__ = ["EXP_ROUNDINGS", "LIKELY_LAMBDA", "LogitScale", "gamma", "gamma_likely", "head_sums", "opmath",
           "softmax_rounding", "softmax_sensitivity", "unit_roundoff"]
