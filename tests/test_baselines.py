"""RISE and meaningful perturbation ("Mask"): they find the evidence a model uses, follow their
papers' definitions, and leave the model as it was."""
import numpy as np
import pytest
import torch
from torch import nn

from shapcam_ext import ClassifierOutputTarget
from shapcam_ext.baselines import RISE, MeaningfulPerturbation
from shapcam_ext.baselines.perturbation import gaussian_blur, total_variation

SIZE = 96
PATCH = (slice(40, 56), slice(48, 64))  # rows, columns of the input: near its centre, where the
# meaningful-perturbation mask starts (a centred disc)


class PatchEvidence(nn.Module):
    """Class 0's logit grows with the mean of channel 0 over PATCH; class 1's is 0."""

    def forward(self, x):
        evidence = 20 * (x[:, 0, PATCH[0], PATCH[1]].mean((1, 2)) - 0.5)
        return torch.stack([evidence, torch.zeros_like(evidence)], 1)


def patch_image(batch=1):
    x = torch.zeros(batch, 3, SIZE, SIZE)
    x[:, :, PATCH[0], PATCH[1]] = 1.0
    return x


def inside_and_outside(maps):
    inside = np.zeros(maps.shape[-2:], bool)
    inside[PATCH] = True
    return maps[..., inside].mean(-1), maps[..., ~inside].mean(-1)


def test_rise_finds_the_patch_the_class_depends_on():
    maps = RISE(PatchEvidence(), n_masks=400, batch_size=128)(patch_image(), [ClassifierOutputTarget(0)])
    assert maps.shape == (1, SIZE, SIZE) and maps.dtype == np.float32 and maps.min() == 0 and maps.max() == pytest.approx(1)
    inside, outside = inside_and_outside(maps)
    assert inside[0] > outside[0] + 0.3


def test_rise_saliency_is_the_mean_score_of_masks_keeping_each_pixel():
    class MeanOfInput(nn.Module):
        def forward(self, x):
            return x.mean((1, 2, 3))[:, None].repeat(1, 2)

    rise = RISE(MeanOfInput(), n_masks=50, cells=4, batch_size=16)
    x = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    masks = torch.cat(list(rise.masks((20, 24), x.device)))  # (N, 1, H, W)
    scores = (x * masks).mean((1, 2, 3)).double()
    expected = (scores[:, None, None] * masks[:, 0].double()).sum(0) / (50 * 0.5)
    torch.testing.assert_close(rise.saliency(x, [lambda out: out[0]])[0], expected)


def test_rise_masks_follow_the_seed_not_the_chunking():
    rise = RISE(nn.Identity(), n_masks=30, cells=7, batch_size=30)
    masks = torch.cat(list(rise.masks((56, 56), torch.device("cpu"))))
    rise.batch_size = 7
    torch.testing.assert_close(torch.cat(list(rise.masks((56, 56), torch.device("cpu")))), masks)
    rise.seed = 1
    assert not torch.equal(torch.cat(list(rise.masks((56, 56), torch.device("cpu")))), masks)
    assert masks.shape == (30, 1, 56, 56) and 0 <= masks.min() and masks.max() <= 1
    assert 0.3 < masks.mean() < 0.7  # cells are kept with probability 0.5


def test_mask_blurs_away_the_patch_the_class_depends_on():
    method = MeaningfulPerturbation(PatchEvidence(), iterations=40)
    kept = method.deletion_masks(patch_image(), [ClassifierOutputTarget(0)])
    assert kept.shape == (1, 1, SIZE // 8, SIZE // 8) and 0 <= kept.min() and kept.max() <= 1
    maps = method(patch_image(), [ClassifierOutputTarget(0)])
    assert maps.shape == (1, SIZE, SIZE)
    inside, outside = inside_and_outside(maps)
    assert inside[0] > outside[0] + 0.3


def test_total_variation_is_the_authors_isotropic_form():
    mask = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    # forward differences at (0, 0): dy = 1, dx = 1, so (1 + 1)^(3/2); nothing else changes
    assert total_variation(mask, 3.0).item() == pytest.approx(2 ** 1.5)
    assert total_variation(torch.ones(2, 1, 5, 5), 3.0).tolist() == [0, 0]


def test_blur_is_torchvisions_and_fits_small_images():
    tf = pytest.importorskip("torchvision.transforms.functional")
    x = torch.rand(2, 3, 40, 36, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gaussian_blur(x, 5.0), tf.gaussian_blur(x, [31, 31], [5.0, 5.0]))
    flat = torch.full((1, 3, 8, 8), 0.25)
    torch.testing.assert_close(gaussian_blur(flat, 10.0), flat)  # a kernel of 61 cut to the 8-pixel image


@pytest.mark.parametrize("method", [
    lambda model: RISE(model, n_masks=8, batch_size=4),
    lambda model: MeaningfulPerturbation(model, iterations=3),
])
def test_the_model_comes_back_untouched(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Dropout(0.5), nn.Linear(4, 3)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method(model)(torch.randn(2, 3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
