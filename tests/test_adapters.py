"""The other libraries' conventions over the one engine, and agreement with Captum."""
import dataclasses
import gc
import importlib
import subprocess
import sys
import textwrap
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import numerics
from shapcam_ext import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget, ShapCAM
from shapcam_ext.head import split_model

SETTINGS = dict(n_permutations=24, seed=3)
ROOT = Path(__file__).resolve().parents[1]


def test_gradcam_targets_and_tooling(resnet):
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget as TheirSoftmax
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget as TheirLogit

    model, x = resnet
    with ShapCAM(model=model, target_layers=[model.layer4[-1]], **SETTINGS) as cam:
        theirs = cam(input_tensor=x, targets=[TheirSoftmax(3), TheirLogit(4)])
        ours = cam(input_tensor=x, targets=[ClassifierOutputSoftmaxTarget(3), ClassifierOutputTarget(4)])
        plain = cam(input_tensor=x, targets=[lambda out: out.softmax(-1)[3], lambda out: out[4]])
    np.testing.assert_array_equal(theirs, ours)
    # Callables take the pooled path (the head's softmax), class targets the logit walk: both
    # within map_error of the exact maps, then post-processed. The generic path records the
    # logits' magnitudes over the same coalitions.
    targets = [ClassifierOutputSoftmaxTarget(3), ClassifierOutputTarget(4)]
    with numerics.LogitScale(model.fc) as scale:
        raw = ShapCAM(model, [model.layer4[-1]], fast_path=False, **SETTINGS).explain(x, targets)
    value_error = max(numerics.model_value_error(scale, model, model.layer4[-1], 4, worth)
                      for worth in ("softmax", "logit"))
    bound = numerics.rescaled_error(2 * numerics.map_error(value_error), torch.stack([r.shapley for r in raw]))
    numerics.assert_within(plain, ours, bound, "callable targets against class targets")
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
    raw = torch.stack([r.shapley for r in ShapCAM(model, [model.layer4[-1]], **SETTINGS).explain(x, targets)])
    # The same raw maps, post-processed by pytorch-grad-cam and by us.
    numerics.assert_within(via_basecam, via_ours, numerics.rescaled_error(0.0, raw), "BaseCAM subclass against ShapCAM")


def test_a_live_gradcam_leaves_shapcam_on_its_traced_path(resnet):
    """Side by side with a GradCAM on layer3[-1], whose hooks are on the model while ShapCAM is
    built: the same maps, on the same fast path, and GradCAM still works afterwards."""
    from pytorch_grad_cam import GradCAM

    model, x = resnet
    targets = [ClassifierOutputSoftmaxTarget(1), ClassifierOutputSoftmaxTarget(2)]
    alone = ShapCAM(model, [model.layer4[-1]], **SETTINGS).explain(x, targets)
    with GradCAM(model, [model.layer3[-1]]) as gradcam:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fall back to the hook path
            beside = ShapCAM(model, [model.layer4[-1]], **SETTINGS).explain(x, targets)
        assert gradcam(x, targets).shape == (2, 64, 64)
    assert [r.path for r in beside] == [r.path for r in alone] == ["pooled-linear"] * 2
    assert all(torch.equal(a.shapley, b.shapley) for a, b in zip(alone, beside))


def test_pytorch_grad_cam_wrappers_take_shapcam(resnet, monkeypatch):
    """SESS and RefineCAM only call their base method: ShapCAM serves; FinerCAM drives BaseCAM's
    internals: ShapCAMBase serves, and ShapCAM says so."""
    from pytorch_grad_cam.finer_cam import FinerCAM
    from pytorch_grad_cam.refine_cam import RefineCAM
    from pytorch_grad_cam.sess import SESS

    from shapcam_ext.adapters.gradcam import ShapCAMBase

    model, x = resnet
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)  # a __del__ that fails
    sess = SESS(model, [model.layer4[-1]], base_method=ShapCAM, scales=[64, 80], **SETTINGS)
    with sess:
        assert sess(x[:1]).shape == (1, 64, 64)
    del sess
    gc.collect()
    for base_method in (ShapCAM, ShapCAMBase):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # each layer's cut is traced, with the other's hooks alive
            refined = RefineCAM(model, [model.layer3[-1], model.layer4[-1]], base_method=base_method, **SETTINGS)
        assert refined(x).shape == (2, 64, 64)
        del refined
        gc.collect()
    assert FinerCAM(model, [model.layer4[-1]], base_method=ShapCAMBase)(x).shape == (2, 64, 64)
    with pytest.raises(TypeError, match="base_method=shapcam_ext.adapters.gradcam.ShapCAMBase"):
        FinerCAM(model, [model.layer4[-1]], base_method=ShapCAM)(x)
    assert not unraisable, [u.exc_value for u in unraisable]


def test_basecam_subclass_refuses_eigen_smooth(resnet):
    from shapcam_ext.adapters.gradcam import ShapCAMBase

    model, x = resnet
    with pytest.raises(ValueError, match="eigen_smooth"):
        ShapCAMBase(model, [model.layer4[-1]], **SETTINGS)(x, None, eigen_smooth=True)


def test_several_layers_are_combined_like_gradcam(resnet):
    from pytorch_grad_cam.utils.image import scale_cam_image

    model, x = resnet
    targets = [ClassifierOutputSoftmaxTarget(0)] * 2
    cam = ShapCAM(model, [model.layer3[-1], model.layer4[-1]], **SETTINGS)
    combined = cam(x, targets)
    # pytorch-grad-cam's BaseCAM: per layer ReLU, scale and resize; then mean, ReLU, scale.
    raws = [torch.stack([r.shapley for r in cam.explain(x, targets, i)]) for i in range(2)]
    per_layer = [scale_cam_image(np.maximum(raw.numpy(), 0), (64, 64)) for raw in raws]
    mean = np.maximum(np.stack(per_layer, 1), 0).mean(1)
    # The same raw maps post-processed by two implementations, per layer; their mean (two
    # roundings) post-processed again.
    per_layer_error = max(numerics.rescaled_error(0.0, raw) for raw in raws) + numerics.gamma(2, torch.float32)
    numerics.assert_within(combined, scale_cam_image(mean), numerics.rescaled_error(per_layer_error, torch.from_numpy(mean)),
                           "several layers against pytorch-grad-cam's combination")


def test_optional_libraries_stay_optional():
    """import shapcam_ext imports neither; an adapter without its library names the extra to install."""
    script = textwrap.dedent("""
        import importlib, sys
        import shapcam_ext
        assert not {"torchcam", "captum"} & {name.split(".")[0] for name in sys.modules}, "imported eagerly"
        for library in ("torchcam", "captum"):
            sys.modules[library] = None  # as if not installed
            try:
                importlib.import_module(f"shapcam_ext.adapters.{library}")
            except ImportError as err:
                print(err)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert run.stdout.splitlines() == [
        'torchcam is not installed; install it with: pip install "shapcam_ext[torchcam]"',
        'captum is not installed; install it with: pip install "shapcam_ext[captum]"',
    ]


@pytest.mark.parametrize("library", ["torchcam", "captum"])
def test_adapter_docstring_example_runs(library):
    """Each adapter's module docstring shows its library's usage; run it as written."""
    doc = importlib.import_module(f"shapcam_ext.adapters.{library}").__doc__
    block = doc.split("::\n\n", 1)[1].splitlines()
    end = next(i for i, line in enumerate(block) if line and not line.startswith("    "))
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()  # 1000 classes, as the examples' class 281 needs
    img = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    namespace = {"torch": torch, "model": model, "img": img, "input_tensor": img[None] / 255.0}
    exec(textwrap.dedent("\n".join(block[:end])), namespace)
    if library == "torchcam":
        assert namespace["overlay"].size == (64, 64)
    else:
        assert namespace["upsampled"].shape == (1, 1, 64, 64) and namespace["delta"].abs().max() < 1e-6


def test_converged_map_agrees_with_captum_on_the_real_model():
    """Lite0 with its real ImageNet weights, 96x96 cat (3x3 = 9 players), the paper's Y^c."""
    from captum.attr import ShapleyValueSampling

    from shapcam_ext.cli.images import bundled_photos, load_image
    from shapcam_ext.cli.preprocessing import preprocess
    from shapcam_ext.cli.models import load_model

    model, cfg = load_model("tf_efficientnet_lite0")
    x = preprocess(load_image(bundled_photos()["chelsea"]), dataclasses.replace(cfg, input_size=(96, 96)))
    # i.i.d. permutations, as Captum draws them, so that its standard error scales from ours
    result = ShapCAM(model, ["bn2"], n_permutations=3000, design="iid", antithetic=False, seed=0).explain(x)[0]
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
    with ShapCAM(model=model, target_layers=[layer(model)], n_permutations=8) as cam, \
            numerics.LogitScale(numerics.final_linear(model)) as scale:
        maps = cam(input_tensor=x, targets=[TheirSoftmax(281)])
        result = cam.explain(x, [TheirSoftmax(281)])[0]
    assert maps.shape == (1, 64, 64) and maps.dtype == np.float32 and 0 <= maps.min() and maps.max() <= 1
    n = result.shapley.numel()
    assert result.efficiency_gap <= numerics.efficiency_gap(
        numerics.model_value_error(scale, model, layer(model), n), k=8, n=n)
