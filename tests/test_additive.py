"""Additive games in one pass: a logit target on a pooled head ending in its Linear is a sum of one
term per position, so each position's Shapley value is its term, exactly, with nothing sampled."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import numerics
from exact import exact_shapley
from shapcam_ext import ShapCAM
from shapcam_ext.paths.pooled import LinearWalk
from shapcam_ext.targets import ClassifierOutputTarget, ClassTarget
from test_differentiable import inputs, tiny
from test_fastpath import calibrated, tiny_pooled


def test_additive_game_matches_exact_enumeration(monkeypatch):
    model = tiny_pooled(nn.Identity())
    torch.manual_seed(1)
    x = torch.randn(1, 3, 2, 3)
    act, head = model[:2](x), model[2:]
    walked = []
    real = LinearWalk.accumulate
    monkeypatch.setattr(LinearWalk, "accumulate", lambda self, perms, estimate: walked.append(len(perms)) or real(
        self, perms, estimate))

    def worth(members):
        return head(torch.where(members.view(-1, 1, 2, 3), act, 0.0))[:, 4]

    with numerics.LogitScale(model[-1]) as scale, torch.no_grad():
        result = ShapCAM(model, [model[1]], n_permutations=64).explain(x, [ClassifierOutputTarget(4)])[0]
        expected = exact_shapley(worth, 6)
    assert result.path == "additive" and result.n_permutations == 0
    assert walked == [1], "only the self-check's probe permutation may be walked"
    assert torch.equal(result.std_error, torch.zeros(2, 3, dtype=torch.float64))
    value_error = scale.value_error(numerics.head_sums(head, positions=6), "logit")
    # both exact: each within map_error of the exact values
    numerics.assert_within(result.shapley.flatten(), expected, 2 * numerics.map_error(value_error),
                           "the additive map against exact enumeration")
    worth_scale = max(abs(result.value_full), abs(result.value_empty))
    assert result.efficiency_gap <= numerics.efficiency_gap(value_error, 1, 6, worth_scale)


def test_additive_maps_equal_the_generic_path():
    """For an additive game every permutation gives every position its exact term, so the generic
    path's estimate from a few permutations is the exact map too (up to rounding)."""
    model = calibrated("resnet50")
    layer = "layer4.2.conv3"  # bn3, the add of the held skip tensor and relu before the pool
    torch.manual_seed(2)
    x = torch.randn(2, 3, 64, 64)
    targets = [ClassifierOutputTarget(3), ClassTarget(5, softmax=False)]
    with numerics.LogitScale(numerics.final_linear(model)) as scale:
        additive = ShapCAM(model, [layer]).explain(x, targets)
        generic = ShapCAM(model, [layer], fast_path=False, n_permutations=6).explain(x, targets)
    bound = 2 * numerics.map_error(numerics.model_value_error(scale, model, layer, 4, "logit"))
    for a, g in zip(additive, generic):
        assert (a.path, a.n_permutations, g.path) == ("additive", 0, "generic")
        numerics.assert_within(a.shapley, g.shapley, bound, "the additive map against the generic path")
        assert a.value_full == g.value_full and a.value_empty == g.value_empty


@pytest.mark.parametrize("settings", [{"tolerance": 0.01}, {"exact": True}], ids=["tolerance", "exact"])
def test_a_closed_form_meets_any_tolerance_and_is_exact(settings, recwarn):
    model = tiny_pooled(nn.Identity())
    result = ShapCAM(model, [model[1]], **settings).explain(torch.randn(1, 3, 2, 3), [ClassifierOutputTarget(0)])[0]
    assert result.path == "additive" and result.n_permutations == 0
    assert result.tolerance_met is (True if "tolerance" in settings else None)
    assert not [w for w in recwarn if "tolerance" in str(w.message)]


def test_softmax_targets_are_not_additive():
    model = tiny_pooled(nn.Identity())
    result = ShapCAM(model, [model[1]], n_permutations=4).explain(torch.randn(1, 3, 2, 3))[0]
    assert result.path == "pooled-linear" and result.n_permutations == 4


def test_the_closed_form_is_differentiable():
    """A differentiable map (create_graph=True) of an additive game: the table's rows, a function of
    the input through the trunk and the head (gradcheck in float64)."""
    model = tiny("pooled-linear")
    cam = ShapCAM(model, [model[1]])
    targets = [ClassifierOutputTarget(1), ClassifierOutputTarget(2)]

    def maps(x):
        return torch.stack([r.shapley for r in cam.explain(x, targets, create_graph=True)])

    x = inputs().requires_grad_()
    result = cam.explain(x, targets, create_graph=True)
    assert {r.path for r in result} == {"additive"} and all(r.shapley.grad_fn is not None for r in result)
    assert torch.autograd.gradcheck(maps, (x,), fast_mode=True)
