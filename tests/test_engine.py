"""Shapley properties of the estimator on tiny models, against exact enumeration."""
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from shapcam_ext import ShapCAM
from shapcam_ext import engine
from shapcam_ext.engine import BatchError
import numerics
from exact import exact_shapley
from tutorials import fasterrcnn_reshape_transform
from shapcam_ext.targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget


def tiny_model(seed=0, channels=4, classes=5):
    """Trunk: conv to (B, C, h, w). Head: a non-linear, non-additive net over positions."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.ReLU(),  # target layer "1"
        nn.Conv2d(channels, channels, 2),  # mixes neighbouring positions: interactions
        nn.Tanh(),
        nn.Flatten(),
        nn.LazyLinear(classes),
    ).eval()


def masked_worth(model, x, category, softmax=True, baseline=0.0):
    """Worth of every coalition by masking the target activation directly (independent path)."""
    act = model[:2](x)
    head = model[2:]

    def worth(members):
        keep = members.view(-1, 1, *act.shape[-2:])
        out = head(torch.where(keep, act, torch.as_tensor(baseline)))
        scores = out.softmax(-1) if softmax else out
        return scores[:, category]

    return worth


def tiny_value_error(scale, model, target="softmax"):
    """How far tiny_model's head (a 2x2 conv over the channels, tanh, Linear) may put a worth
    from exact in float32, for the logits ``scale`` recorded."""
    return scale.value_error(numerics.head_sums(model[2:], positions=0), target)


def explain(model, x, **kw):
    targets = kw.pop("targets", None)
    with ShapCAM(model, [model[1]], **kw) as cam:
        return cam.explain(x, targets)


@pytest.fixture(scope="module")
def model_and_input():
    model = tiny_model()
    x = torch.randn(1, 3, 2, 3)  # 6 players: exact mode walks all 720 orders
    model(x)  # materialise the lazy layer
    return model, x


@pytest.mark.parametrize("softmax", [True, False])
def test_exact_mode_matches_enumeration(model_and_input, softmax):
    model, x = model_and_input
    target = ClassifierOutputSoftmaxTarget(2) if softmax else ClassifierOutputTarget(2)
    with numerics.LogitScale(numerics.final_linear(model)) as scale:
        result = explain(model, x, exact=True, targets=[target])[0]
        expected = exact_shapley(masked_worth(model, x, 2, softmax), 6)
    # Both exact, each within map_error of the exact values.
    value_error = tiny_value_error(scale, model, "softmax" if softmax else "logit")
    numerics.assert_within(result.shapley.flatten(), expected, 2 * numerics.map_error(value_error),
                           "exact mode against enumeration")


def test_sampling_converges_to_exact(model_and_input):
    model, x = model_and_input
    with numerics.LogitScale(numerics.final_linear(model)) as scale:
        expected = exact_shapley(masked_worth(model, x, 1), 6)
        result = explain(model, x, n_permutations=4000, targets=[ClassifierOutputSoftmaxTarget(1)])[0]
    error = (result.shapley.flatten() - expected).abs()
    # Within 5 standard errors everywhere (plus both computations' rounding), and the standard
    # errors are small.
    rounding = 2 * numerics.map_error(tiny_value_error(scale, model))
    assert (error <= 5 * result.std_error.flatten() + rounding).all(), (error, result.std_error)
    assert result.max_std_error < 0.05 * expected.abs().max()


@pytest.mark.parametrize("antithetic", [True, False])
def test_efficiency_holds_for_every_image(antithetic):
    model = tiny_model(1)
    x = torch.randn(3, 3, 4, 4)
    model(x)
    with numerics.LogitScale(numerics.final_linear(model)) as scale:
        results = explain(model, x, n_permutations=7, antithetic=antithetic)
    # Softmax worths: at most 1.
    gap = numerics.efficiency_gap(tiny_value_error(scale, model), k=7, n=16)
    for r in results:
        assert r.efficiency_gap <= gap
        assert abs(r.shapley.sum() - (r.value_full - r.value_empty)) <= gap


def test_null_player_gets_zero_and_symmetric_players_equal():
    # A pooled head is symmetric in positions; a position equal to the baseline is a null player.
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    model = nn.Sequential(nn.Identity(), head).eval()
    x = torch.randn(1, 3, 2, 3)
    x[..., 0, 0] = 0.0  # null player
    x[..., 1, 2] = x[..., 0, 1]  # symmetric pair
    result = ShapCAM(model, [model[0]], n_permutations=64).explain(x)[0]
    assert result.shapley[0, 0] == 0.0
    with numerics.LogitScale(numerics.final_linear(model)) as scale:
        exact = ShapCAM(model, [model[0]], exact=True).explain(x)[0]
    # Equal exact values; each computed within map_error of it (the pool sums in another order).
    value_error = scale.value_error(numerics.head_sums(head, positions=6))
    numerics.assert_within(exact.shapley[1, 2], exact.shapley[0, 1], 2 * numerics.map_error(value_error),
                           "two symmetric players")


# Seeds that share their low 32 bits must differ too: torch's CPU generator keeps only those.
@pytest.mark.parametrize("seed,other", [(7, 8), (2**32 + 5, 5), (2**64 - 1, 2**32 - 1), (2**33, 2**32)])
def test_seed_makes_maps_bit_identical(model_and_input, seed, other):
    model, x = model_and_input
    a = explain(model, x, n_permutations=32, seed=seed)[0].shapley
    b = explain(model, x, n_permutations=32, seed=seed)[0].shapley
    c = explain(model, x, n_permutations=32, seed=other)[0].shapley
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_chunking_and_batching_do_not_change_values():
    model = tiny_model(2)
    x = torch.randn(3, 3, 3, 3)
    model(x)
    with numerics.LogitScale(numerics.final_linear(model)) as scale:
        whole = explain(model, x, n_permutations=10)
        chunked = explain(model, x, n_permutations=10, batch_size=4)  # prefix ranges inside permutations
        single = [explain(model, x[i:i + 1], n_permutations=10)[0] for i in range(3)]
    # The same estimates with the head run on other batches: other GEMM shapes, other roundings.
    bound = 2 * numerics.map_error(tiny_value_error(scale, model))
    for w, c, s in zip(whole, chunked, single):
        numerics.assert_within(w.shapley, c.shapley, bound, "chunked against whole")
        numerics.assert_within(w.shapley, s.shapley, bound, "one image against the batch")


def test_tolerance_stops_early(model_and_input):
    model, x = model_and_input
    result = explain(model, x, n_permutations=4096, tolerance=0.5)[0]
    assert result.n_permutations < 4096
    assert result.max_std_error / result.shapley.abs().max() < 0.5


def test_grouped_players_match_grouped_enumeration():
    model = tiny_model(3)
    x = torch.randn(1, 3, 4, 4)
    model(x)
    cells = torch.arange(16).view(4, 4)
    group_of = ((cells // 4) // 2) * 2 + (cells % 4) // 2  # 2x2 cells -> 4 players
    base = masked_worth(model, x, 0)
    with numerics.LogitScale(numerics.final_linear(model)) as scale:
        result = explain(model, x, exact=True, group_size=2, targets=[ClassifierOutputSoftmaxTarget(0)])[0]
        expected = exact_shapley(lambda groups: base(groups[:, group_of.flatten()]), 4)
    numerics.assert_within(result.shapley.flatten(), expected, 2 * numerics.map_error(tiny_value_error(scale, model)),
                           "grouped exact mode against enumeration")
    assert result.feature_map.shape == (4, 4)


class TokenModel(nn.Module):
    """ViT-like: a class token plus a 2x2 grid of tokens; the head reads all tokens."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.embed = nn.Linear(3, 6)
        self.block = nn.Identity()
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):  # x: (B, 5, 3)
        tokens = self.block(self.embed(x))
        return self.out(torch.tanh(self.mix(tokens)).mean(1) + tokens[:, 0])


def tokens_to_grid(tokens):
    return tokens[:, 1:].reshape(tokens.shape[0], 2, 2, -1).permute(0, 3, 1, 2)


def test_tokens_are_players_through_reshape_transform():
    model = TokenModel().eval()
    x = torch.randn(1, 5, 3)
    tokens = model.embed(x)

    def worth(members):
        keep = torch.cat([torch.ones(members.shape[0], 1, dtype=torch.bool), members], 1)[..., None]
        t = torch.where(keep, tokens, 0.0)
        return model.out(torch.tanh(model.mix(t)).mean(1) + t[:, 0]).softmax(-1)[:, 1]

    with numerics.LogitScale(model.out) as scale:
        result = ShapCAM(model, [model.block], reshape_transform=tokens_to_grid, exact=True).explain(
            x, [ClassifierOutputSoftmaxTarget(1)])[0]
        expected = exact_shapley(worth, 4)
    # The head: mix (a Linear), tanh, the mean over 5 tokens plus the class token, out (a Linear).
    value_error = scale.value_error([model.mix.in_features + 1, numerics.EXP_ROUNDINGS, 5 + 1,
                                     model.out.in_features + 1])
    numerics.assert_within(result.shapley.flatten(), expected, 2 * numerics.map_error(value_error),
                           "token players against enumeration")


class TwoLevels(nn.Module):
    """An FPN-like layer returning a dict of a 4 x 4 and a 2 x 2 map, and a head over both."""

    def __init__(self):
        super().__init__()
        self.fine, self.coarse = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x):
        fine = torch.relu(self.fine(x))
        return OrderedDict([("0", fine), ("pool", torch.relu(self.coarse(fine)))])


class LevelsModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.levels, self.out = TwoLevels(), nn.Linear(8, 3)

    def forward(self, x):
        levels = self.levels(x)
        return self.out(torch.cat([levels["0"].mean((2, 3)), levels["pool"].amax((2, 3))], 1))


def test_a_dict_of_maps_is_masked_through_a_resizing_reshape_transform():
    """The players are the transform's 2 x 2 grid; each element of each level belongs to the cell
    it falls in at the grid's scale (a 2 x 2 block of the 4 x 4 level), and a removed player's
    elements are the baseline in every level."""
    model = LevelsModel().eval()
    x = torch.randn(1, 3, 4, 4)
    levels = model.levels(x)

    def worth(members):
        keep = members.view(-1, 1, 2, 2)
        fine = torch.where(keep.repeat_interleave(2, 2).repeat_interleave(2, 3), levels["0"], 0.0)
        coarse = torch.where(keep, levels["pool"], 0.0)
        return model.out(torch.cat([fine.mean((2, 3)), coarse.amax((2, 3))], 1)).softmax(-1)[:, 1]

    with numerics.LogitScale(model.out) as scale:
        result = ShapCAM(model, [model.levels], reshape_transform=fasterrcnn_reshape_transform, exact=True).explain(
            x, [ClassifierOutputSoftmaxTarget(1)])[0]
        with torch.no_grad():
            expected = exact_shapley(worth, 4)
    assert result.shapley.shape == (2, 2)
    # The head: the fine level's mean over 16 positions, the coarse level's max, then out (a Linear).
    value_error = scale.value_error([16, model.out.in_features + 1])
    numerics.assert_within(result.shapley.flatten(), expected, 2 * numerics.map_error(value_error),
                           "players of a dict of maps against enumeration")
    with pytest.raises(ValueError, match="scalar baseline"):
        ShapCAM(model, [model.levels], reshape_transform=fasterrcnn_reshape_transform,
                baseline=torch.zeros(8, 2, 2)).explain(x)
    with pytest.raises(ValueError, match="OrderedDict.*reshape_transform="):
        ShapCAM(model, [model.levels]).explain(x)


def test_cam_call_matches_gradcam_postprocessing(model_and_input):
    from pytorch_grad_cam.utils.image import scale_cam_image as gradcam_scale

    model, x = model_and_input
    x = torch.randn(2, 3, 2, 3)
    cam = ShapCAM(model, [model[1]], n_permutations=16)
    maps = cam(input_tensor=x, targets=None)
    results = cam.explain(x)
    raw = torch.stack([r.shapley for r in results])
    per_layer = gradcam_scale(np.maximum(raw.numpy(), 0), (3, 2))
    expected = gradcam_scale(np.maximum(per_layer[:, None], 0).mean(1))
    assert maps.dtype == np.float32 and maps.shape == (2, 2, 3)
    # The same raw maps (same seed), post-processed by two implementations: per layer, then the
    # layers' mean again.
    bound = numerics.rescaled_error(numerics.rescaled_error(0.0, raw), torch.from_numpy(per_layer))
    numerics.assert_within(maps, expected, bound, "ShapCAM.__call__ against pytorch-grad-cam's post-processing")
    # targets=None explains each image's top class with its softmax probability.
    assert [r.target.category for r in results] == cam.outputs.argmax(-1).tolist()
    assert all(r.target.softmax for r in results)


def test_resize_matches_opencv():
    from pytorch_grad_cam.utils.image import scale_cam_image as gradcam_scale

    from shapcam_ext.postprocess import scale_cam_image

    cams = torch.rand(2, 7, 7, dtype=torch.float64).float()
    numerics.assert_within(scale_cam_image(cams, (224, 224)), gradcam_scale(cams.numpy(), (224, 224)),
                           numerics.rescaled_error(0.0, cams), "our post-processing against OpenCV's")


def test_bad_settings_raise_clear_errors(model_and_input):
    model, x = model_and_input
    with pytest.raises(ValueError, match="n_permutations"):
        ShapCAM(model, [model[1]], n_permutations=0)
    with pytest.raises(ValueError, match="tolerance"):
        ShapCAM(model, [model[1]], tolerance=0.0)
    with pytest.raises(ValueError, match="memory_budget"):
        ShapCAM(model, [model[1]], memory_budget=16).explain(x)
    with pytest.raises(ValueError, match="targets for a batch of 1"):
        ShapCAM(model, [model[1]]).explain(x, [ClassifierOutputTarget(0)] * 2)
    with pytest.raises(ValueError, match="reshape_transform"):
        ShapCAM(TokenModel().eval(), ["block"]).explain(torch.randn(1, 5, 3))


def test_device_mismatch_is_reported():
    meta_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten()).eval().to("meta")
    with pytest.raises(ValueError, match="move the input"):
        ShapCAM(meta_model, [meta_model[1]]).explain(torch.randn(1, 3, 3, 3))


def test_nan_image_fails_alone():
    model = tiny_model(5)
    x = torch.randn(3, 3, 3, 3)
    model(x)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(BatchError, match="NaN or Inf") as info:
        explain(model, x, n_permutations=4)
    results = info.value.results
    assert results[1] is None and results[0] is not None and results[2] is not None
    assert list(info.value.failures) == [1]


# ------------------------------------------------------------------ non-finite values


def test_infinite_weights_fail_every_image_with_a_batch_error():
    model = tiny_model(6)
    x = torch.randn(2, 3, 3, 3)
    model(x)
    with torch.no_grad():
        model[5].weight[0, 0] = float("inf")
    with pytest.raises(BatchError, match="NaN or Inf") as info:
        explain(model, x, n_permutations=4)
    assert info.value.results == [None, None] and sorted(info.value.failures) == [0, 1]


def test_a_target_returning_nan_fails_its_image_only():
    model = tiny_model(7)
    x = torch.randn(2, 3, 3, 3)
    model(x)
    targets = [ClassifierOutputTarget(1), lambda out: out[0] * float("nan")]
    with pytest.raises(BatchError, match="image 1: the target's score is NaN") as info:
        explain(model, x, n_permutations=4, targets=targets)
    assert info.value.results[0] is not None and torch.isfinite(info.value.results[0].shapley).all()


@pytest.mark.parametrize("baseline", [float("nan"), float("inf"), torch.tensor([0.0, float("nan")])])
def test_non_finite_baseline_is_refused(model_and_input, baseline):
    model, _ = model_and_input
    with pytest.raises(ValueError, match="baseline has NaN or Inf"):
        ShapCAM(model, [model[1]], baseline=baseline)


# ------------------------------------------------------------------ one-line errors


@pytest.mark.parametrize("layers, error, match", [
    ([None], TypeError, r"each target layer must be a module.*got NoneType"),
    ("1", TypeError, r"wrap it in a list: target_layers=\['1'\]"),
    ([], ValueError, "target_layers is empty"),
])
def test_bad_target_layers_name_the_fix(model_and_input, layers, error, match):
    model, _ = model_and_input
    with pytest.raises(error, match=match):
        ShapCAM(model, layers)


@pytest.mark.parametrize("option, value, error, match", [
    ("n_permutations", 2.5, TypeError, "n_permutations must be an int, got float 2.5"),
    ("n_permutations", "32", TypeError, "n_permutations must be an int, got str '32'"),
    ("seed", 2**70, ValueError, "seed must be below 2\\*\\*64"),
    ("seed", -1, ValueError, "seed must be >= 0"),
    ("group_size", 0, ValueError, "group_size must be >= 1"),
    ("antithetic", "yes", TypeError, "antithetic must be True or False"),
    ("design", "sobol", ValueError, "design must be one of 'latin', 'iid', got 'sobol'"),
    ("tolerance", float("nan"), ValueError, "tolerance must be > 0"),
])
def test_bad_settings_are_one_line_errors(model_and_input, option, value, error, match):
    model, _ = model_and_input
    with pytest.raises(error, match=match) as info:
        ShapCAM(model, [model[1]], **{option: value})
    assert "\n" not in str(info.value)


def test_input_that_is_not_a_batch_tensor(model_and_input):
    model, x = model_and_input
    cam = ShapCAM(model, [model[1]], n_permutations=2)
    with pytest.raises(TypeError, match=r"got ndarray; convert it with torch.from_numpy\(x\)"):
        cam(x.numpy())
    with pytest.raises(ValueError, match="input_tensor has no images"):
        cam(x[:0])


def test_tiny_memory_budget_names_the_need_in_readable_units(model_and_input):
    model, x = model_and_input
    with pytest.raises(ValueError, match=r"memory_budget of 16 B is too small for one head evaluation, which "
                                         r"needs [\d.]+ (B|KiB)"):
        ShapCAM(model, [model[1]], memory_budget=16, fast_path=False).explain(x)


# ------------------------------------------------------------------ bounded memory, known cost


def test_permutations_are_streamed_so_a_huge_cap_costs_nothing_up_front(model_and_input):
    model, x = model_and_input
    result = explain(model, x, n_permutations=10**9, tolerance=0.5)[0]
    assert result.n_permutations < 10**4


def test_a_long_run_announces_its_cost_first(model_and_input, monkeypatch, caplog):
    model, x = model_and_input
    monkeypatch.setattr(engine, "LONG_RUN_SECONDS", 0.0)
    with caplog.at_level("WARNING", logger="shapcam_ext"):
        result = explain(model, x, n_permutations=64, batch_size=7)[0]
    (record,) = [r for r in caplog.records if "projected" in r.getMessage()]
    # 64 rounded up to whole Latin blocks
    assert f"{result.n_permutations} permutations on the generic path" in record.getMessage()


CLOCK = [0.0]  # a clock that only the head advances, as if each call cost 1 ms plus 10 us per row


@torch.fx.wrap
def _ticking(x):
    CLOCK[0] += 1e-3 + 1e-5 * x.shape[0]
    return x


class Ticking(nn.Module):
    def forward(self, x):
        return _ticking(x)


def test_the_projected_cost_is_close_to_the_run_time(monkeypatch, caplog):
    """The projection comes from a probe of the path that runs, timed on one and on a batch of
    permutations to separate a call's fixed cost from each permutation's; against a head whose cost
    is known exactly (a clock it advances), it must land within a small factor of the run (a
    100x error once announced a 40 s run as an hour)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Ticking(), nn.Conv2d(4, 4, 2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(4 * 1 * 2, 5)).eval()
    x = torch.randn(1, 3, 2, 3)
    monkeypatch.setattr(engine, "LONG_RUN_SECONDS", 0.0)
    monkeypatch.setattr(engine, "_synchronized_clock", lambda device: CLOCK[0])
    for options in (dict(), dict(batch_size=20)):  # one head call per round, or several
        cam = ShapCAM(model, [model[1]], n_permutations=1024, **options)
        prepared = cam.prepare(x)
        caplog.clear()
        with caplog.at_level("WARNING", logger="shapcam_ext"):
            start = CLOCK[0]
            cam.estimate(prepared)
            seconds = CLOCK[0] - start
        (record,) = [r for r in caplog.records if hasattr(r, "projected_seconds")]
        assert seconds / 2 < record.projected_seconds < 2 * seconds, options


# ------------------------------------------------------------------ two phases: one forward pass per batch


def forward_calls(model: nn.Module) -> list:
    """A list that grows by one each time the model's first layer runs: once per forward pass of the
    model (the heads start after it)."""
    calls = []
    next(m for m in model.modules() if isinstance(m, nn.Conv2d)).register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_one_forward_pass_serves_every_target_layer():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    cam = ShapCAM(model, [model.layer3, model.layer4], n_permutations=4)
    calls = forward_calls(model)
    maps = cam(x)
    assert len(calls) == 1 and maps.shape == (2, 64, 64)
    prepared = cam.prepare(x)
    calls.clear()
    per_layer = [cam.estimate(prepared, None, layer) for layer in (0, 1)]
    assert calls == []
    # the same maps as one layer explained alone
    alone = ShapCAM(model, [model.layer4], n_permutations=4).explain(x)
    assert all(torch.equal(a.shapley, b.shapley) for a, b in zip(alone, per_layer[1]))
    assert torch.equal(prepared.outputs, model(x))


def test_estimate_names_a_bad_layer_or_preparation(model_and_input):
    model, x = model_and_input
    cam = ShapCAM(model, [model[1]], n_permutations=4)
    with pytest.raises(ValueError, match=r"layer must index the 1 target layer\(s\), got 1"):
        cam.estimate(cam.prepare(x), None, layer=1)
    with pytest.raises(TypeError, match="prepared must come from prepare"):
        cam.estimate(x)


def test_a_missed_tolerance_is_reported(model_and_input):
    model, x = model_and_input
    with pytest.warns(RuntimeWarning, match="tolerance 1e-09 was not met"):
        (result,) = explain(model, x, n_permutations=16, tolerance=1e-9, design="iid")
    assert result.tolerance_met is False
    (result,) = explain(model, x, n_permutations=4096, tolerance=0.5)
    assert result.tolerance_met is True
    assert explain(model, x, n_permutations=4)[0].tolerance_met is None


def test_a_loose_tolerance_costs_the_same_whatever_the_cap():
    """With a tolerance, Latin blocks are sized from a pilot's projection of what the tolerance needs,
    not from the cap: a cap of 256 or of 4096 must not change how long a loose tolerance runs (it
    once ran 208 and 784 permutations on Lite0 bn2, blocks of 8 and 49 strata)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    x = torch.randn(1, 3, 7, 7)  # 49 players
    runs = [explain(model, x, n_permutations=cap, tolerance=0.2)[0] for cap in (256, 4096)]
    assert runs[0].n_permutations == runs[1].n_permutations <= 64
    assert all(r.tolerance_met for r in runs)


def test_a_long_run_is_announced_before_its_path_is_built_and_checked(model_and_input, monkeypatch, caplog):
    """Building and checking a fast path, and the probe, run whole permutations: on a large map with a
    heavy head that alone took minutes in silence. The two ends' head evaluations are timed first,
    and a long projection is logged before any of it (issue 18.7)."""
    model, x = model_and_input
    monkeypatch.setattr(engine, "LONG_RUN_SECONDS", 0.0)
    logged_before_path = []
    real = engine.evaluator_for

    def spy(game, proof):
        logged_before_path.extend(r.getMessage() for r in caplog.records)
        return real(game, proof)

    monkeypatch.setattr(engine, "evaluator_for", spy)
    with caplog.at_level("WARNING", logger="shapcam_ext"):
        explain(model, x, n_permutations=64)
    assert any("checking for a faster exact path first" in m for m in logged_before_path)
