"""The reported uncertainty is honest: standard errors match the spread over seeds, and a
tolerance stop delivers the error it promises."""
from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from exact import exact_shapley
from torch import nn

from shapcam_ext import ShapCAM
from shapcam_ext.sampling import PermutationStream
from shapcam_ext.statistics import MIN_UNITS_TO_STOP, RunningEstimate, t_quantile
from shapcam_ext.targets import ClassifierOutputSoftmaxTarget


def pooled_model(seed: int = 0) -> nn.Sequential:
    """A pooled head (the fast path) with a non-linear tail: cheap, and antithetic pairs matter."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 5)).eval()


def interacting_model(seed: int = 0) -> nn.Sequential:
    """A 3x3 conv, a pool and a steep tail: a game with interactions between neighbouring positions,
    where antithetic pairs help but leave variance (the generic path)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5)).eval()
    with torch.no_grad():
        model[6].weight.mul_(6)
        model[8].weight.mul_(4)
    return model


def exact_values(model: nn.Sequential, x: torch.Tensor, category: int) -> torch.Tensor:
    act, head = model[:2](x), model[2:]
    h, w = act.shape[-2:]

    def worth(members):
        return head(torch.where(members.view(-1, 1, h, w), act, 0.0)).softmax(-1)[:, category]

    with torch.no_grad():
        return exact_shapley(worth, h * w)


SAMPLING = [("iid", False), ("iid", True), ("latin", False), ("latin", True)]


@pytest.mark.parametrize("design,antithetic", SAMPLING)
def test_one_unit_has_an_undefined_standard_error(design, antithetic):
    model = pooled_model()
    x = torch.randn(1, 3, 3, 3)
    result = ShapCAM(model, [model[1]], n_permutations=1, design=design, antithetic=antithetic).explain(x)[0]
    assert result.std_error is None and result.max_std_error is None
    assert result.n_permutations == (2 if antithetic else 1)
    two = ShapCAM(model, [model[1]], n_permutations=4, design=design, antithetic=antithetic).explain(x)[0]
    assert two.std_error is not None and bool((two.std_error > 0).any())


@pytest.mark.parametrize("design,antithetic", SAMPLING)
def test_standard_errors_match_the_spread_over_seeds(design, antithetic):
    model = pooled_model(1)
    x = torch.randn(1, 3, 3, 3)
    target = [ClassifierOutputSoftmaxTarget(2)]
    runs = [ShapCAM(model, [model[1]], n_permutations=32, design=design, antithetic=antithetic,
                    seed=seed).explain(x, target)[0]
            for seed in range(300)]
    maps = torch.stack([r.shapley.flatten() for r in runs])
    spread = maps.std(0)
    reported = torch.stack([r.std_error.flatten() for r in runs]).square().mean(0).sqrt()
    # 300 seeds estimate each spread to about +-4% (1/sqrt(2 * 299)); the i.i.d. formula applied to
    # antithetic pairs was about 2x too large, and to the orders of a Latin block it would be more.
    ratio = reported / spread
    assert ((ratio > 0.8) & (ratio < 1.25)).all(), ratio


@pytest.mark.parametrize("design,antithetic,tolerance",
                         [("iid", False, 0.02), ("iid", True, 0.003), ("latin", False, 0.005), ("latin", True, 0.001)])
def test_tolerance_stop_meets_the_tolerance_in_at_least_90_percent_of_runs(design, antithetic, tolerance):
    # Tolerances at which the stop goes on past its first check, so the rule is exercised beyond
    # it; 97-100% of runs meet them (the bound is conservative with few units).
    model = interacting_model()
    torch.manual_seed(1)
    x = torch.randn(1, 3, 3, 4)  # 12 players
    category = int(model(x).argmax())
    phi = exact_values(model, x, category)
    errors, spent = [], []
    for seed in range(150):
        result = ShapCAM(model, [model[1]], n_permutations=100_000, tolerance=tolerance, design=design,
                         antithetic=antithetic, seed=seed).explain(x, [ClassifierOutputSoftmaxTarget(category)])[0]
        errors.append(float((result.shapley.flatten() - phi).norm() / phi.norm()))
        spent.append(result.n_permutations)
    within = sum(e <= tolerance for e in errors) / len(errors)
    assert within >= 0.9, (within, sorted(errors)[-20:])
    first_check = MIN_UNITS_TO_STOP * PermutationStream(12, antithetic, 0, x.device, design, 100_000).unit_size
    assert min(spent) > first_check, "every run stopped at the first check: the test is too easy"
    assert max(spent) < 100_000, "the cap was hit: the stop never triggered"


def test_relative_error_bound_is_infinite_until_enough_units():
    estimate = RunningEstimate(batch=2, n=4, unit_size=2, device=torch.device("cpu"))
    estimate.total += 1.0
    estimate.total_sq += 1.0
    estimate.permutations = 2
    assert torch.isinf(estimate.relative_error_bound()).all()


def test_per_position_intervals_cover_their_confidence():
    """With the 8 Latin blocks of a short run, the t intervals cover each exact value 90% of the
    time, where the normal quantile's +-1.645 SE covers about 85%."""
    model = interacting_model()
    torch.manual_seed(1)
    x = torch.randn(1, 3, 3, 3)  # 9 players; K = 144 is 8 blocks of a full 9 x 9 square and reverses
    category = int(model(x).argmax())
    phi = exact_values(model, x, category)
    inside_t = inside_normal = 0
    seeds, z = 200, NormalDist().inv_cdf(0.95)
    for seed in range(seeds):
        result = ShapCAM(model, [model[1]], n_permutations=144, seed=seed).explain(
            x, [ClassifierOutputSoftmaxTarget(category)])[0]
        assert result.units == MIN_UNITS_TO_STOP
        low, high = result.interval(0.9)
        inside_t += int(((low.flatten() <= phi) & (phi <= high.flatten())).sum())
        inside_normal += int(((result.shapley.flatten() - phi).abs() <= z * result.std_error.flatten()).sum())
    # 1800 position-runs (9 per seed, correlated) estimate a coverage to about +-1.5 points.
    assert 0.87 <= inside_t / (seeds * 9) <= 0.93, inside_t / (seeds * 9)
    assert inside_normal / (seeds * 9) < 0.87, "the normal interval covers 90% here: the test cannot tell t from it"


def test_interval_is_undefined_for_one_unit_and_exact_for_enumeration():
    model = pooled_model()
    x = torch.randn(1, 3, 2, 2)
    one = ShapCAM(model, [model[1]], n_permutations=1).explain(x)[0]
    with pytest.raises(ValueError, match="single unit of permutations"):
        one.interval()
    exact = ShapCAM(model, [model[1]], exact=True).explain(x)[0]
    low, high = exact.interval(0.99)
    assert torch.equal(low, exact.shapley) and torch.equal(high, exact.shapley)


@pytest.mark.parametrize("confidence", [1e-6, 0.5, 0.9, 0.95, 0.99, 0.9999])
def test_t_quantile_matches_closed_forms_and_the_normal_limit(confidence):
    """Student's t has closed-form quantiles for 1 (Cauchy) and 2 degrees of freedom, and tends to
    the normal as they grow (by about z (z^2 + 1) / (4 dof), A&S 26.7.5)."""
    assert t_quantile(confidence, 1) == pytest.approx(math.tan(math.pi * confidence / 2), rel=1e-9)
    assert t_quantile(confidence, 2) == pytest.approx(confidence * math.sqrt(2 / (1 - confidence**2)), rel=1e-9)
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    dof = 10**5
    assert t_quantile(confidence, dof) == pytest.approx(z + z * (z * z + 1) / (4 * dof), rel=1e-8)
    assert t_quantile(confidence, 7) > t_quantile(confidence, 8) > z


def test_t_quantile_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    for dof in (3, 7, 8, 30, 1000):
        for confidence in (0.5, 0.9, 0.99):
            assert t_quantile(confidence, dof) == pytest.approx(stats.t.ppf((1 + confidence) / 2, dof), rel=1e-9)
