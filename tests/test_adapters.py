"""The other libraries' conventions over the one engine, and agreement with Captum."""
import dataclasses
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torchvision

from shapcam_ext import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget, ShapCAM
from shapcam_ext.adapters.captum import LayerShapCAM
from shapcam_ext.adapters.torchcam import ShapCAM as TorchcamShapCAM
from shapcam_ext.head import split_model

SETTINGS = dict(n_permutations=24, seed=3)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    return model, torch.randn(2, 3, 64, 64)  # layer4 is 2x2


def test_gradcam_targets_and_tooling(resnet):
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget as TheirSoftmax
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget as TheirLogit

    model, x = resnet
    with ShapCAM(model=model, target_layers=[model.layer4[-1]], **SETTINGS) as cam:
        theirs = cam(input_tensor=x, targets=[TheirSoftmax(3), TheirLogit(4)])
        ours = cam(input_tensor=x, targets=[ClassifierOutputSoftmaxTarget(3), ClassifierOutputTarget(4)])
        plain = cam(input_tensor=x, targets=[lambda out: out.softmax(-1)[:, 3], lambda out: out[:, 4]])
    np.testing.assert_array_equal(theirs, ours)
    np.testing.assert_allclose(plain, ours, atol=1e-6)
    assert theirs.shape == (2, 64, 64) and theirs.min() >= 0 and theirs.max() <= 1
    overlay = show_cam_on_image(np.random.rand(64, 64, 3).astype(np.float32), theirs[0], use_rgb=True)
    assert overlay.shape == (64, 64, 3)
    scores = CamMultImageConfidenceChange()(x, theirs, [TheirLogit(3), TheirLogit(4)], model)
    assert scores.shape == (2,)


def test_basecam_subclass_gives_the_same_maps(resnet):
    from pytorch_grad_cam.base_cam import BaseCAM

    from shapcam_ext.adapters.gradcam import ShapCAMBase

    model, x = resnet
    targets = [ClassifierOutputSoftmaxTarget(1), ClassifierOutputSoftmaxTarget(2)]
    with ShapCAMBase(model, [model.layer4[-1]], **SETTINGS) as base_cam:
        assert isinstance(base_cam, BaseCAM)
        via_basecam = base_cam(input_tensor=x, targets=targets)
    via_ours = ShapCAM(model, [model.layer4[-1]], **SETTINGS)(x, targets)
    np.testing.assert_allclose(via_basecam, via_ours, atol=1e-6)


def test_several_layers_are_combined_like_gradcam(resnet):
    from pytorch_grad_cam.utils.image import scale_cam_image

    model, x = resnet
    targets = [ClassifierOutputSoftmaxTarget(0)] * 2
    cam = ShapCAM(model, [model.layer3[-1], model.layer4[-1]], **SETTINGS)
    combined = cam(x, targets)
    # pytorch-grad-cam's BaseCAM: per layer ReLU, scale and resize; then mean, ReLU, scale.
    per_layer = [
        scale_cam_image(np.maximum(torch.stack([r.shapley for r in cam.explain(x, targets, i)]).numpy(), 0), (64, 64))
        for i in range(2)
    ]
    np.testing.assert_allclose(combined, scale_cam_image(np.maximum(np.stack(per_layer, 1), 0).mean(1)), atol=1e-5)


def test_torchcam_convention(resnet):
    model, x = resnet
    with TorchcamShapCAM(model, target_layer="layer4", **SETTINGS) as extractor:
        scores = model(x)
        maps = extractor(scores.argmax(-1).tolist(), scores)
    assert len(maps) == 1 and maps[0].shape == (2, 2, 2)
    results = ShapCAM(model, ["layer4"], **SETTINGS).explain(
        x, [ClassifierOutputSoftmaxTarget(c) for c in scores.argmax(-1).tolist()])
    expected = torch.stack([r.shapley for r in results]).clamp_min(0).float()
    for got, want in zip(maps[0], expected):
        torch.testing.assert_close(got, (want - want.min()) / (want.max() - want.min() + 1e-7), atol=1e-6, rtol=0)


def test_captum_convention(resnet):
    model, x = resnet
    attributions, delta = LayerShapCAM(model, model.layer4, **SETTINGS).attribute(
        x, target=5, return_convergence_delta=True)
    assert attributions.shape == (2, 1, 2, 2)
    split = split_model(model, "layer4")
    act = split.trunk(x).activation
    with torch.no_grad():
        gain = split.head(act)[:, 5] - split.head(torch.zeros_like(act))[:, 5]
    torch.testing.assert_close(attributions.sum((1, 2, 3)).double(), gain.double(), atol=1e-4, rtol=1e-4)
    assert (delta < 1e-4).all()


def test_converged_map_agrees_with_captum_on_the_real_model():
    """Lite0 with its real ImageNet weights, 96x96 cat (3x3 = 9 players), the paper's Y^c."""
    from captum.attr import ShapleyValueSampling

    from shapcam_ext.cli.images import bundled_photos, load_image
    from shapcam_ext.cli.preprocessing import preprocess
    from shapcam_ext.cli.models import load_model

    model, cfg = load_model("tf_efficientnet_lite0")
    x = preprocess(load_image(bundled_photos()["chelsea"]), dataclasses.replace(cfg, input_size=(96, 96)))
    result = ShapCAM(model, ["bn2"], n_permutations=3000, antithetic=False, seed=0).explain(x)[0]
    category = result.target.category

    split = split_model(model, "bn2")
    act = split.trunk(x).activation
    mask = torch.arange(9).view(1, 1, 3, 3).expand_as(act).contiguous()
    captum_samples = 300
    with torch.no_grad():
        theirs = ShapleyValueSampling(lambda a: split.head(a).softmax(-1)).attribute(
            act, baselines=0.0, target=category, feature_mask=mask, n_samples=captum_samples,
            perturbations_per_eval=10)[0, 0]
    ours = result.shapley.float()
    # Both are i.i.d. permutation estimators: Captum's standard error scales from ours by sqrt(K ratio).
    se = result.std_error.float() * (1 + (3000 / captum_samples)) ** 0.5
    assert ((ours - theirs).abs() <= 4 * se + 1e-6).all(), (ours, theirs, se)
    assert torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1] > 0.95


DROP_IN_MODELS = [
    ("resnet18", lambda m: m.layer4[-1]),
    ("resnet50", lambda m: m.layer4[-1]),
    ("vgg16", lambda m: m.features[29]),
    ("densenet121", lambda m: m.features),
    ("mobilenet_v3_large", lambda m: m.features),
    ("efficientnet_b0", lambda m: m.features),
    ("convnext_tiny", lambda m: m.features),
    ("tf_efficientnet_lite0", lambda m: m.bn2),
]


@pytest.mark.parametrize("name,layer", DROP_IN_MODELS, ids=[name for name, _ in DROP_IN_MODELS])
def test_drop_in_snippet_on_the_listed_models(name, layer):
    """The pytorch-grad-cam snippet, unchanged but for the import, on every listed model."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget as TheirSoftmax

    from shapcam_ext.cli.models import load_model

    with pytest.warns(UserWarning, match="random weights") if name != "tf_efficientnet_lite0" else nullcontext():
        model, _ = load_model(name)
    x = torch.randn(1, 3, 64, 64)
    with ShapCAM(model=model, target_layers=[layer(model)], n_permutations=8) as cam:
        maps = cam(input_tensor=x, targets=[TheirSoftmax(281)])
        result = cam.explain(x, [TheirSoftmax(281)])[0]
    assert maps.shape == (1, 64, 64) and maps.dtype == np.float32 and 0 <= maps.min() and maps.max() <= 1
    assert result.efficiency_gap < 1e-5
