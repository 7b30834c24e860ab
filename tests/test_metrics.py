"""Hand-computed cases for the faithfulness and localisation metrics."""
import numpy as np
import pytest
import torch

from shapcam_ext.metrics import (
    average_drop, box_mask, energy_pointing_game, explanation_input, increase_in_confidence,
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
