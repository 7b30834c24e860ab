"""The faithfulness, causal and localisation metrics: hand-computed cases, then cross-checks against
the maintained implementations (torchcam's ClassificationMetric and DeletionInsertionMetric,
quantus' RelevanceMassAccuracy) on the same maps."""
from contextlib import contextmanager
from functools import partial

import numpy as np
import pytest
import torch

from shapcam_ext.metrics import (
    area_under_curve, average_drop, blurred, box_mask, energy_pointing_game, explanation_input,
    increase_in_confidence, ranked_curve,
)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def normalise(image):
    return (image - 0.5) / 0.25


def test_average_drop_known_values():
    # drops: (0.8 - 0.4) / 0.8 = 0.5, and none for 0.5 -> 0.6
    assert average_drop([0.8, 0.5], [0.4, 0.6]) == pytest.approx(25.0)
    assert average_drop(torch.tensor([0.2]), torch.tensor([0.05])) == pytest.approx(75.0)
    assert average_drop([0.3, 0.3], [0.3, 0.9]) == 0.0


def test_increase_in_confidence_counts_strict_increases():
    assert increase_in_confidence([0.8, 0.5], [0.4, 0.6]) == pytest.approx(50.0)
    assert increase_in_confidence([0.5, 0.5, 0.5, 0.5], [0.5, 0.7, 0.1, 0.9]) == pytest.approx(50.0)  # a tie is not


@pytest.mark.parametrize("metric", [average_drop, increase_in_confidence])
def test_score_lists_must_match(metric):
    with pytest.raises(ValueError, match="equally long"):
        metric([0.5, 0.2], [0.5])
    with pytest.raises(ValueError, match="non-empty"):
        metric([], [])


def test_average_drop_needs_positive_full_scores():
    with pytest.raises(ValueError, match="> 0"):
        average_drop([0.0, 0.5], [0.1, 0.2])


def test_explanation_input_multiplies_the_unnormalised_image():
    image = torch.full((1, 3, 2, 2), 0.6)
    saliency = torch.tensor([[[1.0, 0.5], [0.0, 0.25]]])
    out = explanation_input(normalise(image), saliency, MEAN, STD)
    # 0.6 * s in image space, normalised: (0.6 s - 0.5) / 0.25
    expected = torch.tensor([[0.4, -0.8], [-2.0, -1.4]]).expand(1, 3, 2, 2)
    torch.testing.assert_close(out, expected)


def test_explanation_input_full_map_is_identity_and_empty_map_is_black():
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(explanation_input(x, np.ones((2, 4, 4), np.float32), MEAN, STD), x)
    black = explanation_input(x, torch.zeros(2, 4, 4), MEAN, STD)
    torch.testing.assert_close(black, torch.full_like(x, -2.0))  # (0 - 0.5) / 0.25


def test_explanation_input_keeps_top_fraction():
    image = torch.ones(1, 3, 2, 2)
    saliency = torch.tensor([[[0.9, 0.1], [0.5, 0.3]]])
    out = explanation_input(normalise(image), saliency, MEAN, STD, keep_fraction=0.5)
    kept = out[0, 0] * 0.25 + 0.5  # back to image space: the kept saliency itself
    torch.testing.assert_close(kept, torch.tensor([[0.9, 0.0], [0.5, 0.0]]))


def test_explanation_input_resizes_the_map():
    x = normalise(torch.full((1, 3, 8, 8), 0.8))
    out = explanation_input(x, torch.full((1, 2, 2), 0.5), MEAN, STD)
    torch.testing.assert_close(out * 0.25 + 0.5, torch.full((1, 3, 8, 8), 0.4))


@pytest.mark.parametrize("bad, match", [
    (dict(saliency=torch.full((1, 2, 2), 1.5)), r"\[0, 1\]"),
    (dict(saliency=torch.full((2, 2, 2), 0.5)), "saliency"),
    (dict(keep_fraction=0.0), "keep_fraction"),
])
def test_explanation_input_rejects_bad_arguments(bad, match):
    args = dict(x=torch.zeros(1, 3, 2, 2), saliency=torch.full((1, 2, 2), 0.5), mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=match):
        explanation_input(**{**args, **bad})


def test_map_entirely_inside_box_scores_one():
    sal = np.zeros((10, 10))
    sal[3:5, 4:8] = np.random.default_rng(0).random((2, 4)) + 0.1
    assert energy_pointing_game(sal, (4, 3, 8, 5)) == pytest.approx(1.0)
    assert energy_pointing_game(sal, (0, 0, 4, 10)) == pytest.approx(0.0)  # the box just left of it


def test_uniform_map_scores_the_box_area_fraction():
    assert energy_pointing_game(np.ones((10, 10)), (2, 3, 7, 5)) == pytest.approx(10 / 100)
    assert energy_pointing_game(torch.full((4, 8), 0.3), (0, 0, 4, 4)) == pytest.approx(0.5)


def test_energy_hand_computed_and_boxes_unite_without_double_counting():
    sal = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert energy_pointing_game(sal, (0, 0, 1, 2)) == pytest.approx(4 / 10)  # left column
    # two overlapping boxes cover the left column and the top row: 1 + 2 + 3
    assert energy_pointing_game(sal, [(0, 0, 1, 2), (0, 0, 2, 1)]) == pytest.approx(6 / 10)


def test_box_mask_is_half_open_rounded_and_clipped():
    mask = box_mask((4, 5), (0.6, -3, 3.4, 2))
    expected = np.zeros((4, 5), bool)
    expected[0:2, 1:3] = True
    np.testing.assert_array_equal(mask, expected)
    with pytest.raises(ValueError, match="empty box"):
        box_mask((4, 4), (2, 0, 2, 3))


@pytest.mark.parametrize("sal, match", [
    (-np.ones((3, 3)), "non-negative"),
    (np.zeros((3, 3)), "sums to 0"),
    (np.ones((1, 3, 3)), "one \\(H, W\\)"),
])
def test_energy_rejects_maps_without_energy(sal, match):
    with pytest.raises(ValueError, match=match):
        energy_pointing_game(sal, (0, 0, 2, 2))


def mean_score(inputs, images):
    return inputs.mean(dim=(1, 2, 3))


def test_deletion_of_a_constant_image_falls_linearly_and_its_area_is_one_half():
    x = torch.ones(2, 3, 4, 4)
    saliency = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0))
    fractions, scores = ranked_curve(mean_score, torch.zeros_like(x), x, saliency, steps=4)
    torch.testing.assert_close(fractions, torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64))
    torch.testing.assert_close(scores, (1 - fractions).expand(2, 5))
    torch.testing.assert_close(area_under_curve(fractions, scores), torch.full((2,), 0.5, dtype=torch.float64))


def test_curves_take_pixels_in_order_of_saliency_with_their_channels():
    x = torch.zeros(1, 3, 2, 3)
    x[0, :, 1, 2] = 1.0  # the only evidence: one pixel, in every channel
    def evidence(inputs, images):
        return inputs[:, :, 1, 2].mean(1)
    ranks_first = torch.tensor([[[0.1, 0.2, 0.3], [0.4, 0.5, 0.9]]])
    ranks_last = 1 - ranks_first
    _, found = ranked_curve(evidence, torch.zeros_like(x), x, ranks_first, steps=6)  # deletion
    _, missed = ranked_curve(evidence, torch.zeros_like(x), x, ranks_last, steps=6)
    assert found[0].tolist() == [1, 0, 0, 0, 0, 0, 0]
    assert missed[0].tolist() == [1, 1, 1, 1, 1, 1, 0]
    _, inserted = ranked_curve(evidence, x, torch.zeros_like(x), ranks_first, steps=6)  # insertion
    assert inserted[0].tolist() == [0, 1, 1, 1, 1, 1, 1]


def test_steps_that_do_not_divide_the_pixels_end_on_every_pixel():
    x = torch.ones(1, 1, 3, 3)
    fractions, scores = ranked_curve(mean_score, torch.zeros_like(x), x, torch.rand(1, 3, 3), steps=4)
    assert fractions.tolist() == pytest.approx([0, 3 / 9, 6 / 9, 1])  # stride ceil(9 / 4) = 3
    assert scores[0, -1] == 0


def test_each_image_is_scored_for_itself_in_any_chunking():
    x = torch.rand(3, 2, 12, 12, generator=torch.Generator().manual_seed(1))
    weights = torch.tensor([1.0, 2.0, 3.0])
    def score(inputs, images):
        return inputs.sum(dim=(1, 2, 3)) * weights[images]
    saliency = torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(2))  # resized to 12 x 12
    whole = ranked_curve(score, x, blurred(x), saliency, steps=5, batch_size=100)
    chunked = ranked_curve(score, x, blurred(x), saliency, steps=5, batch_size=4)
    torch.testing.assert_close(whole, chunked)
    torch.testing.assert_close(whole[1][:, -1], x.sum(dim=(1, 2, 3)).double() * weights.double())


def test_blurred_keeps_constants_and_smooths_an_impulse():
    flat = torch.full((1, 3, 16, 16), 0.3)
    torch.testing.assert_close(blurred(flat), flat)
    impulse = torch.zeros(1, 1, 21, 21)
    impulse[0, 0, 10, 10] = 1.0
    out = blurred(impulse)
    assert out.sum() == pytest.approx(1.0, abs=1e-5) and out.max() < 0.02 and out[0, 0, 10, 10] == out.max()


@pytest.mark.parametrize("bad, match", [(dict(steps=0), "steps"), (dict(rest=torch.zeros(1, 3, 2, 2)), "one shape")])
def test_ranked_curve_rejects_bad_arguments(bad, match):
    args = dict(score=mean_score, first=torch.zeros(1, 3, 4, 4), rest=torch.ones(1, 3, 4, 4),
                saliency=torch.rand(1, 4, 4), steps=4)
    with pytest.raises(ValueError, match=match):
        ranked_curve(**{**args, **bad})


# ----------------------------------------------------------------- against maintained implementations


@pytest.fixture(scope="module")
def tiny_classifier():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(32, 5),
    ).eval()
    with torch.no_grad():
        model[-1].weight *= 20  # confident enough for the masks to move the scores
    x = torch.randn(6, 3, 12, 12)
    cams = torch.rand(6, 3, 3, generator=torch.Generator().manual_seed(3))  # resized to 12 x 12 by both sides
    return model, x, cams


class FixedCams:
    """A torchcam CAM extractor that returns given maps, so torchcam's metric scores exactly our maps."""

    def __init__(self, model, cams):
        self.model, self.cams = model, cams

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        return [self.cams]

    def fuse_cams(self, cams):
        return cams[0]

    @contextmanager
    def _hooks_off(self):
        yield


def test_average_drop_and_increase_match_torchcam(tiny_classifier):
    metrics = pytest.importorskip("torchcam.metrics")
    model, x, cams = tiny_classifier
    theirs = metrics.ClassificationMetric(FixedCams(model, cams), partial(torch.softmax, dim=-1))
    theirs.update(x)
    with torch.no_grad():
        probabilities = model(x).softmax(-1)
        classes = probabilities.argmax(-1)
        full = probabilities[torch.arange(6), classes]
        # torchcam multiplies the normalised tensor: our masking with mean 0, std 1 does the same
        masked = model(explanation_input(x, cams, (0, 0, 0), (1, 1, 1))).softmax(-1)[torch.arange(6), classes]
    summary = theirs.summary()
    assert average_drop(full, masked) / 100 == pytest.approx(summary["avg_drop"], rel=1e-5)
    assert increase_in_confidence(full, masked) / 100 == pytest.approx(summary["conf_increase"])
    assert 0 < summary["avg_drop"] < 1  # a case where the metric has something to measure


@pytest.mark.parametrize("steps", [7, 36])
def test_deletion_and_insertion_areas_match_torchcam(tiny_classifier, steps):
    metrics = pytest.importorskip("torchcam.metrics")
    model, x, cams = tiny_classifier
    theirs = metrics.DeletionInsertionMetric(FixedCams(model, cams), partial(torch.softmax, dim=-1), steps=steps,
                                            baseline=blurred)
    theirs.update(x)
    with torch.no_grad():
        classes = model(x).argmax(-1)
    def probability(inputs, images):
        return model(inputs).softmax(-1)[torch.arange(len(images)), classes[images]]
    substrate = blurred(x)
    deletion = area_under_curve(*ranked_curve(probability, substrate, x, cams, steps))
    insertion = area_under_curve(*ranked_curve(probability, x, substrate, cams, steps))
    summary = theirs.summary()
    assert deletion.mean().item() == pytest.approx(summary["deletion_auc"], rel=1e-5)
    assert insertion.mean().item() == pytest.approx(summary["insertion_auc"], rel=1e-5)
    assert (deletion - insertion).abs().max() > 0.05  # the curves have something to measure


def test_energy_pointing_game_matches_quantus_relevance_mass_accuracy():
    quantus = pytest.importorskip("quantus")
    rng = np.random.default_rng(4)
    maps = rng.random((5, 16, 20)) ** 3
    boxes = [[(2, 3, 9, 12)], [(0, 0, 20, 4)], [(5, 5, 6, 6)], [(1, 1, 8, 8), (6, 6, 15, 14)], [(10, 2, 19, 15)]]
    masks = np.stack([box_mask((16, 20), b) for b in boxes])[:, None].astype(np.float32)
    theirs = quantus.RelevanceMassAccuracy(normalise=False, abs=False, disable_warnings=True)(
        model=None, x_batch=rng.random((5, 3, 16, 20)).astype(np.float32), y_batch=np.zeros(5, int),
        a_batch=maps[:, None].astype(np.float32), s_batch=masks,
    )
    ours = [energy_pointing_game(m, b) for m, b in zip(maps, boxes)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
