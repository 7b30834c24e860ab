"""The torchcam extractor against the real torchcam 0.5: its conventions, its metrics, its overlay."""
import functools
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torchcam.methods import GradCAM
from torchcam.methods._utils import locate_candidate_layer
from torchcam.metrics import ClassificationMetric, DeletionInsertionMetric
from torchcam.utils import overlay_mask
from torchvision.transforms.functional import to_pil_image

from shapcam_ext import ClassifierOutputSoftmaxTarget
from shapcam_ext import ShapCAM as CoreShapCAM
from shapcam_ext.adapters.torchcam import ShapCAM

SETTINGS = dict(n_permutations=24, seed=3)


@pytest.fixture(scope="module")
def lite0_photos():
    """The real EfficientNet-Lite0 and four real photos at its 224x224 input."""
    from shapcam_ext.cli.images import bundled_photos, load_image
    from shapcam_ext.cli.models import load_model
    from shapcam_ext.cli.preprocessing import preprocess

    model, cfg = load_model("tf_efficientnet_lite0")
    photos = bundled_photos()
    return model, torch.cat([preprocess(load_image(photos[name]), cfg) for name in ("chelsea", "coffee", "astronaut",
                                                                                       "horse")])


def hook_counts(model):
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def test_same_conventions_as_torchcams_gradcam(resnet):
    """List length, shapes, dtype, [0, 1] range, fuse_cams, repr and hook lifecycle, side by side."""
    model, x = resnet
    layers = ["layer3", "layer4"]
    before = hook_counts(model)
    for make in (lambda: GradCAM(model, layers), lambda: ShapCAM(model, layers, **SETTINGS)):
        extractor = make()
        assert extractor.model is model and extractor.target_names == layers
        with extractor:
            scores = model(x)
            cams = extractor(scores.argmax(-1).tolist(), scores)
            assert hook_counts(model) != before
        assert hook_counts(model) == before  # the context manager removed every hook
        assert [c.shape for c in cams] == [(2, 4, 4), (2, 2, 2)]
        assert all(c.dtype == torch.float32 and c.min() == 0 and 0.999 < c.max() <= 1 for c in cams)
        assert extractor.fuse_cams(cams).shape == (2, 4, 4)
        assert repr(extractor).startswith(f"{type(extractor).__name__}(target_layer=['layer3', 'layer4']")
    assert repr(extractor) == "ShapCAM(target_layer=['layer3', 'layer4'], n_permutations=24, seed=3)"


def test_default_layer_is_torchcams_choice(resnet, caplog):
    model, _ = resnet
    # At 32x32 layer4 is 1x1, so torchcam's rule picks layer3: the input shape is honoured.
    for shape, expected in (((3, 224, 224), "layer4"), ((3, 32, 32), "layer3")):
        with ShapCAM(model, input_shape=shape, **SETTINGS) as extractor, GradCAM(model, input_shape=shape) as theirs:
            assert extractor.target_names == theirs.target_names == [locate_candidate_layer(model, shape)] == [expected]
    assert "thus set to 'layer3'" in caplog.text


def test_torchcams_checks_and_hook_switches(resnet):
    model, x = resnet
    with ShapCAM(model, "layer4", **SETTINGS) as extractor:
        with pytest.raises(AssertionError, match="forwarded"):
            extractor(0)
        extractor.disable_hooks()
        model(x)
        with pytest.raises(AssertionError, match="forwarded"):
            extractor(0)
        extractor.enable_hooks()
        model(x)
        with pytest.raises(ValueError, match="batch size"):
            extractor([0, 1, 2])
        with pytest.raises(ValueError, match="exactly one of class_idx or targets"):
            extractor(0, targets=lambda out: out[0])
        assert len(extractor([0, 1])) == 1
        extractor.reset_hooks()
        with pytest.raises(AssertionError, match="forwarded"):
            extractor(0)


def test_torchcam_output_targets_are_scored_per_sample_like_the_core(resnet):
    model, x = resnet
    margin = lambda out: out[3] - out[5]  # noqa: E731  one sample's output, torchcam's target contract
    with ShapCAM(model, "layer4", **SETTINGS) as extractor:
        model(x)
        shared = extractor(targets=margin, normalized=False)[0]
        per_sample = extractor(targets=[margin, margin], normalized=False)[0]
    core = CoreShapCAM(model, ["layer4"], **SETTINGS).explain(x, [margin, margin])
    expected = torch.stack([r.shapley for r in core]).float()
    torch.testing.assert_close(shared, expected)
    torch.testing.assert_close(per_sample, expected)


def test_raw_maps_are_the_cores_shapley_values_of_the_class_probability(resnet):
    model, x = resnet
    with ShapCAM(model, ["layer3", "layer4"], **SETTINGS) as extractor:
        model(x)
        raw = extractor([3, 8], normalized=False)
        normalized = extractor([3, 8])
    core = CoreShapCAM(model, ["layer3", "layer4"], **SETTINGS)
    for layer, (signed, scaled) in enumerate(zip(raw, normalized, strict=True)):
        results = core.explain(x, [ClassifierOutputSoftmaxTarget(3), ClassifierOutputSoftmaxTarget(8)], layer)
        torch.testing.assert_close(signed, torch.stack([r.shapley for r in results]).float())
        gain = torch.tensor([r.value_full - r.value_empty for r in results], dtype=torch.float64)
        torch.testing.assert_close(signed.double().sum((1, 2)), gain, atol=1e-6, rtol=1e-5)
        # Normalised: ReLU, then torchcam's own per-image min-max.
        assert (scaled[signed <= 0] == 0).all()
        torch.testing.assert_close(scaled, GradCAM._normalize(signed.clamp_min(0)))


def test_grouped_players_share_their_value(resnet):
    """A raw map of 3x3 players on a 4x4 map sums to the probability gain (the edge players are cut)."""
    model, x = resnet
    with ShapCAM(model, "layer3", group_size=3, **SETTINGS) as extractor:
        model(x)
        (raw,) = extractor(5, normalized=False)
    core = CoreShapCAM(model, ["layer3"], group_size=3, **SETTINGS)
    results = core.explain(x, [ClassifierOutputSoftmaxTarget(5)] * 2)
    gain = torch.tensor([r.value_full - r.value_empty for r in results], dtype=torch.float64)
    torch.testing.assert_close(raw.double().sum((1, 2)), gain, atol=1e-6, rtol=1e-5)
    corner = torch.stack([r.shapley[0, 0] / 9 for r in results])  # a whole 3x3 player
    torch.testing.assert_close(raw[:, :3, :3].double(), corner.view(2, 1, 1).expand(2, 3, 3), atol=1e-7, rtol=1e-5)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx can't trace it, so the engine reruns the whole model."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) if x.sum() < 1e9 else -self.net(x)


def test_engine_passes_leave_the_hooked_state_alone(resnet):
    """On the hook path the engine runs the model itself; torchcam's hook switch keeps it out of the state."""
    model, x = resnet
    wrapped = Untraceable(model).eval()
    with pytest.warns(UserWarning, match="hook path"), ShapCAM(wrapped, "net.layer4", **SETTINGS) as extractor:
        wrapped(x)
        first = extractor([1, 2], normalized=False)
        assert extractor.hook_a[0].shape[0] == 2 and torch.equal(extractor._input, x)
        second = extractor([1, 2], normalized=False)
    torch.testing.assert_close(first, second)


def test_a_train_mode_model_is_explained_in_eval_mode_and_left_in_train_mode(resnet):
    model, x = resnet
    with ShapCAM(model, "layer4", **SETTINGS) as extractor:
        model(x)
        expected = extractor(4, normalized=False)
    model.train()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the core may warn about train mode when it cuts the model
            extractor = ShapCAM(model, "layer4", **SETTINGS)
        with extractor, torch.no_grad():
            model.eval()
            model(x)  # the same hooked input as above, then the explanation with the model in train mode
            model.train()
            got = extractor(4, normalized=False)
        assert all(m.training for m in model.modules())
    finally:
        model.eval()
    torch.testing.assert_close(got, expected)


def test_classification_metric_on_the_real_model(lite0_photos):
    """torchcam's Average Drop and Increase in Confidence on real photos.

    Shap-CAM drops the confidence less than the same map values put in the wrong places, and less
    than torchcam's own Grad-CAM (the paper's claim; Average Drop favours wide maps, so an
    inverted map is no fair foil).
    """
    model, x = lite0_photos
    cells = torch.randperm(49, generator=torch.Generator().manual_seed(0))
    drops = {}
    for name in ("shapcam", "relocated", "gradcam"):
        with (GradCAM(model) if name == "gradcam" else ShapCAM(model, n_permutations=64)) as extractor:
            assert extractor.target_names == ["bn2"]  # torchcam's default layer, 7x7
            metric = ClassificationMetric(Relocated(extractor, cells) if name == "relocated" else extractor,
                                          functools.partial(torch.softmax, dim=-1))
            metric.update(x)
        summary = metric.summary()
        assert metric.total == 4 and metric.nan_count == 0
        assert 0 <= summary["avg_drop"] <= 1 and 0 <= summary["conf_increase"] <= 1
        drops[name] = summary["avg_drop"]
    assert drops["shapcam"] < drops["relocated"] and drops["shapcam"] < drops["gradcam"], drops


class Relocated:
    """A torchcam extractor whose maps hold the wrapped one's values at shuffled positions."""

    def __init__(self, extractor, cells: torch.Tensor):
        self.extractor = extractor
        self.cells = cells
        self.model = extractor.model

    def __call__(self, *args, **kwargs):
        return [cam.flatten(1)[:, self.cells].view_as(cam) for cam in self.extractor(*args, **kwargs)]

    def fuse_cams(self, cams):
        return self.extractor.fuse_cams(cams)

    def _hooks_off(self):
        return self.extractor._hooks_off()


def test_deletion_insertion_metric_on_the_real_model(lite0_photos):
    model, x = lite0_photos
    with ShapCAM(model, "bn2", n_permutations=64) as extractor:
        metric = DeletionInsertionMetric(extractor, functools.partial(torch.softmax, dim=-1), steps=8)
        metric.update(x)
    summary = metric.summary()
    assert summary["insertion_auc"] > summary["deletion_auc"]


def test_overlay_mask_on_a_real_photo(lite0_photos):
    from shapcam_ext.cli.images import bundled_photos, load_image

    model, x = lite0_photos
    with ShapCAM(model, "bn2", n_permutations=64) as extractor:
        out = model(x[:1])
        cams = extractor(out.squeeze(0).argmax().item(), out)
    photo = load_image(bundled_photos()["chelsea"])
    overlay = overlay_mask(photo, to_pil_image(cams[0].squeeze(0), mode="F"), alpha=0.5)
    assert overlay.size == photo.size and overlay.mode == "RGB"
    assert np.abs(np.asarray(overlay, dtype=np.float64) - np.asarray(photo, dtype=np.float64)).mean() > 10
