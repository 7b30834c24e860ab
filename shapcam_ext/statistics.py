"""Running Shapley estimates, their standard errors and the tolerance stop.

The accumulators stay on the model's device: the ops add each chunk's contributions to them, and
nothing is read back until a stop check or the end.

Standard errors are computed over independent units (an antithetic pair is one unit: its two
orders are negatively correlated, and treating them as independent would overstate the error
about twofold). With U units of u permutations, the ops accumulate per player
``total = sum of all marginals`` and ``total_sq = sum over units of (unit's sum of marginals)^2``;
the unit means are x_k = unit sum / u, and

    mean = total / (U u),   var(x) = (total_sq / u^2 - U mean^2) / (U - 1),   SE = sqrt(var(x) / U).

The tolerance stop bounds the relative L2 error of the signed map, ||phi_hat - phi|| / ||phi||,
at 90% confidence (see :func:`relative_error_bound`). Per-position intervals use Student's t with
U - 1 degrees of freedom (:func:`t_quantile`): with the 8 Latin blocks of a default run, the
normal quantile's +-1.645 SE covers about 86% of the time, not 90%.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

CONFIDENCE = 0.9
MIN_UNITS_TO_STOP = 8  # a variance from fewer units is too uncertain to stop on


class RunningEstimate:
    """Sums of marginal contributions of a batch of images, by unit, on one device.

    Args:
        batch: images. n: players. unit_size: permutations per independent unit.
        exhaustive: the permutations are all n! orders (exact values, zero standard error).
        differentiable: also keep ``sums``, the same sums as ``total`` with their autograd graph
            (:meth:`add_sums`); ``total`` and ``total_sq``, which the stop checks and standard errors
            read, never hold a graph.
    """

    def __init__(self, batch: int, n: int, unit_size: int, device: torch.device, exhaustive: bool = False,
                 differentiable: bool = False):
        self.total = torch.zeros(batch, n, dtype=torch.float64, device=device)
        self.total_sq = torch.zeros_like(self.total)
        self.unit_size = unit_size
        self.exhaustive = exhaustive
        self.differentiable = differentiable
        self.sums: Optional[torch.Tensor] = None
        self.permutations = 0

    def add_sums(self, sums: torch.Tensor) -> None:
        """Adds (B, n) sums of marginal contributions, out of place, so that their graph is kept."""
        sums = sums.to(self.total.dtype)
        self.sums = sums if self.sums is None else self.sums + sums

    def differentiable_mean(self) -> torch.Tensor:
        """(B, n) the mean of ``sums``, a differentiable function of what the worths depend on."""
        return self.sums / max(self.permutations, 1)

    @property
    def units(self) -> int:
        return self.permutations // self.unit_size

    def mean(self) -> torch.Tensor:
        return self.total / max(self.permutations, 1)

    def std_error(self) -> Optional[torch.Tensor]:
        """(B, n) standard errors; zeros when exhaustive; None when undefined (fewer than two units)."""
        if self.exhaustive:
            return torch.zeros_like(self.total)
        units = self.units
        if units < 2:
            return None
        unit_means_sq = self.total_sq / self.unit_size**2
        var = (unit_means_sq - units * self.mean().square()).clamp_min(0) / (units - 1)
        return (var / units).sqrt()

    def relative_error_bound(self) -> torch.Tensor:
        """(B,) 90%-confidence upper bound on each image's relative L2 error; inf while undefined."""
        se = self.std_error()
        if se is None or self.units < MIN_UNITS_TO_STOP:
            return torch.full(self.total.shape[:1], math.inf, dtype=torch.float64, device=self.total.device)
        return relative_error_bound(self.mean(), se, self.units)


def relative_error_bound(mean: torch.Tensor, std_error: torch.Tensor, units: int) -> torch.Tensor:
    """Upper bound, at :data:`CONFIDENCE`, on ||mean - phi|| / ||phi|| per image (rows of (B, n)).

    Two one-sided 95% bounds, so both hold with probability >= 90%:

    * The estimated variances: sum(SE^2) comes from ``units`` units, and (U-1) s^2 / sigma^2 is
      chi-square with U-1 degrees of freedom, so sigma^2 <= s^2 (U-1) / chi2_{U-1}(5%).
    * The realised error: ||e||^2 = sum SE_i^2 Z_i^2 with Z_i ~ N(0, 1), a weighted chi-square
      that Satterthwaite matches to chi2 with d = (sum SE^2)^2 / sum SE^4 degrees of freedom,
      so ||e||^2 <= sum SE^2 chi2_d(95%) / d.

    ||phi|| is estimated by sqrt(||mean||^2 - sum SE^2), since E||mean||^2 = ||phi||^2 + sum SE^2.
    Chi-square quantiles use the Wilson-Hilferty approximation, accurate to a few percent for
    d >= 2, which the coverage test in tests/test_statistics.py checks end to end.
    """
    z = 1.6448536269514722  # the standard normal's 95% quantile
    var = std_error.square().sum(-1)
    dof = var.square() / std_error.pow(4).sum(-1).clamp_min(1e-300)
    realised = _chi2_quantile(dof, z) / dof
    estimated = (units - 1) / _chi2_quantile(torch.full_like(var, units - 1.0), -z)
    norm_sq = (mean.square().sum(-1) - var).clamp_min(0)
    bound = (var * realised * estimated / norm_sq).sqrt()
    return torch.where(norm_sq > 0, bound, torch.full_like(bound, math.inf))


def _chi2_quantile(dof: torch.Tensor, z: float) -> torch.Tensor:
    """The chi-square quantile at the normal quantile z (Wilson-Hilferty)."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * c.sqrt()).clamp_min(1e-3).pow(3)


def t_quantile(confidence: float, dof: int) -> float:
    """q such that P(|T| <= q) = ``confidence`` for Student's t with ``dof`` degrees of freedom.

    P(|T| <= q) = I_y(1 / 2, dof / 2) with y = q^2 / (dof + q^2) (Abramowitz & Stegun 26.7.1
    and 26.5.2), solved for q by bisection. For confidences up to 0.9999 it is within 1e-9 of the
    exact quantile (relative) up to 1e5 degrees of freedom, and 1e-8 at millions (the rounding of
    the log-gamma terms).

    Raises:
        ValueError: ``confidence`` outside (0, 1) or ``dof`` below 1.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if dof < 1:
        raise ValueError(f"a t quantile needs at least 1 degree of freedom, got {dof}; run more permutations")

    def coverage(q: float) -> float:
        return _incomplete_beta(0.5, dof / 2, q * q / (dof + q * q))

    high = 2.0
    while coverage(high) < confidence:
        high *= 2
    low = 0.0
    while high - low > 1e-15 * high:
        middle = (low + high) / 2
        low, high = (middle, high) if coverage(middle) < confidence else (low, middle)
    return (low + high) / 2


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), from its continued fraction on the side
    where it converges fast (Press et al., Numerical Recipes, 3rd ed., section 6.4)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), by the modified Lentz method."""
    tiny = 1e-300

    def clamp(value: float) -> float:
        return value if abs(value) > tiny else tiny

    c, d = 1.0, 1.0 / clamp(1 - (a + b) * x / (a + 1))
    fraction = d
    for m in range(1, 100_000):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for term in (even, odd):
            d = 1.0 / clamp(1 + term * d)
            c = clamp(1 + term / c)
            fraction *= c * d
        if abs(c * d - 1) < 1e-16:
            return fraction
    raise ArithmeticError(f"the incomplete beta fraction did not converge for a={a}, b={b}, x={x}")
