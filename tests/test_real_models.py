"""Real model families and pytorch-grad-cam's use cases, run through ShapCAM unchanged.

Each block below is pytorch-grad-cam's own tutorial code (classification, ViT and Swin,
semantic segmentation, embeddings, detection) with only the CAM import switched to shapcam_ext;
what is asserted are Shapley properties (efficiency, exact enumeration) and that the user's
model is left as it was given.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import timm
import torch
import torchvision
from exact import exact_shapley
from tutorials import ResnetFeatureExtractor, fasterrcnn_reshape_transform
from pytorch_grad_cam.utils.model_targets import (
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
    FasterRCNNBoxScoreTarget,
    SemanticSegmentationTarget,
)
from torch import nn

from shapcam_ext import ShapCAM
from shapcam_ext.model_state import eval_semantics


def assert_efficient(result):
    """The map sums to f(full) - f(empty).

    The models run in float64, so that the worth of a coalition does not depend on the batch it
    is evaluated in beyond float64 rounding: each layer's sums have fan-in below 10^5 and the
    networks have fewer than 100 layers, so recomputations differ by well under
    100 * gamma_{10^5}(float64) ~ 1e-9 relative, and the n-term float64 sum of the map adds less.
    """
    scale = max(abs(result.value_full), abs(result.value_empty), 1e-12)
    assert result.efficiency_gap <= 1e-9 * scale, (result.efficiency_gap, scale)
    assert abs(result.value_full - result.value_empty) > 1e-9 * scale, "degenerate game: nothing to explain"


def state_of(model: nn.Module) -> dict:
    return {name: t.clone() for name, t in model.state_dict().items()}


# ------------------------------------------------------------------------ the user's model


def test_train_mode_model_is_untouched_and_explained_as_in_eval_mode():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.fc = nn.Sequential(nn.Dropout(0.5), model.fc)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    model.layer2.eval()  # mixed modes must come back exactly
    modes = {name: m.training for name, m in model.named_modules()}
    before = state_of(model)
    trained = ShapCAM(model, ["layer3"], n_permutations=8).explain(x)
    again = ShapCAM(model, ["layer3"], n_permutations=8).explain(x)
    assert {name: m.training for name, m in model.named_modules()} == modes
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "parameters or buffers changed"
    evaluated = ShapCAM(model.eval(), ["layer3"], n_permutations=8).explain(x)
    for t, a, e in zip(trained, again, evaluated):
        assert torch.equal(t.shapley, e.shapley) and torch.equal(t.shapley, a.shapley)


def test_modes_are_restored_after_an_error():
    model = torchvision.models.resnet18(num_classes=10).train()
    cam = ShapCAM(model, ["layer4"], n_permutations=2)
    with pytest.raises(ValueError, match="targets for a batch"):
        cam.explain(torch.randn(1, 3, 32, 32), [ClassifierOutputTarget(1)] * 3)
    assert all(m.training for m in model.modules())


def test_concurrent_calls_give_the_sequential_maps_and_leave_the_model_untouched():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    model.layer2.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    before = state_of(model)
    cam = ShapCAM(model, [model.layer4[-1]], n_permutations=16)
    threads, calls = 4, 3
    inputs = [[torch.randn(1, 3, 64, 64) for _ in range(calls)] for _ in range(threads)]
    sequential = [[cam.explain(x)[0].shapley for x in xs] for xs in inputs]
    start = threading.Barrier(threads)

    def explain(xs):
        start.wait()
        return [cam.explain(x)[0].shapley for x in xs]

    with ThreadPoolExecutor(threads) as pool:
        concurrent = list(pool.map(explain, inputs))
    assert all(torch.equal(c, s) for cs, ss in zip(concurrent, sequential) for c, s in zip(cs, ss))
    assert {name: m.training for name, m in model.named_modules()} == modes
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "parameters or buffers changed"


def test_interleaved_blocks_restore_the_modes_they_found():
    """Thread b tries to enter while a is inside; a must exit before b enters, or b saves a's eval
    modes and restores them last (enter a, enter b, exit a, exit b leaves the model in eval)."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    inside_a, b_entered, a_exited = threading.Event(), threading.Event(), threading.Event()

    def b():
        inside_a.wait()
        with eval_semantics(model):
            b_entered.set()
            a_exited.wait(timeout=1.0)

    thread = threading.Thread(target=b)
    thread.start()
    with eval_semantics(model):
        inside_a.set()
        b_entered.wait(timeout=1.0)  # b waits for the lock: a goes on after the timeout
    a_exited.set()
    thread.join()
    assert b_entered.is_set()
    assert all(m.training for m in model.modules())


def test_a_compiled_model_is_explained_as_the_model_it_wraps():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    eager = ShapCAM(model, ["layer4"], n_permutations=8).explain(x)
    compiled = torch.compile(model)
    for layer in (compiled.layer4, "layer4", "_orig_mod.layer4"):
        results = ShapCAM(compiled, [layer], n_permutations=8).explain(x)
        assert [r.path for r in results] == [r.path for r in eager] == ["pooled-linear"] * 2
        assert all(torch.equal(c.shapley, e.shapley) and c.layer == "layer4" for c, e in zip(results, eager))


# --------------------------------------------------------------------- Vision Transformers


def vit_reshape_transform(tensor, height=4, width=4):
    """pytorch-grad-cam's ViT reshape_transform (its tutorial's, for a 4 x 4 token grid)."""
    result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    result = result.transpose(2, 3).transpose(1, 2)
    return result


def swin_reshape_transform(tensor, height=7, width=7):
    """pytorch-grad-cam's Swin reshape_transform (timm's Swin blocks are channels-last)."""
    result = tensor.reshape(tensor.size(0), height, width, tensor.size(-1))
    result = result.transpose(2, 3).transpose(1, 2)
    return result


def randomised_head(model: nn.Module, head: nn.Linear) -> nn.Module:
    """torchvision's ViT starts with an all-zero classifier (every class at 1/1000)."""
    torch.manual_seed(1)
    nn.init.normal_(head.weight, std=0.5)
    return model


VISION_TRANSFORMERS = {
    "timm vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224", img_size=64),
    "timm deit_tiny": lambda: timm.create_model("deit_tiny_patch16_224", img_size=64),
    "timm vit_small": lambda: timm.create_model("vit_small_patch16_224", img_size=64),
}


@pytest.mark.parametrize("name", VISION_TRANSFORMERS)
def test_timm_vision_transformers_at_the_last_blocks_norm1(name):
    torch.manual_seed(0)
    model = VISION_TRANSFORMERS[name]().eval().double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    cam = ShapCAM(model=model, target_layers=[model.blocks[-1].norm1], reshape_transform=vit_reshape_transform,
                  n_permutations=8)
    grayscale_cam = cam(input_tensor=x, targets=None)
    assert grayscale_cam.shape == (1, 64, 64)
    result = cam.explain(x)[0]
    assert result.shapley.shape == (4, 4)
    assert_efficient(result)


def test_timm_vision_transformer_matches_exact_enumeration():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32).eval()  # 2 x 2 tokens
    x = torch.randn(1, 3, 32, 32)
    target = ClassifierOutputSoftmaxTarget(3)
    result = ShapCAM(model, [model.blocks[-1].norm1], lambda t: vit_reshape_transform(t, 2, 2), exact=True
                     ).explain(x, [target])[0]
    def worth(members):  # all coalitions in one batch: norm1's grid tokens zeroed, the class token kept
        keep = torch.cat([torch.ones(len(members), 1, dtype=torch.bool), members], 1)[..., None]
        handle = model.blocks[-1].norm1.register_forward_hook(lambda m, i, o: torch.where(keep, o, 0.0))
        with torch.no_grad():
            out = model(x.expand(len(members), -1, -1, -1))
        handle.remove()
        return torch.stack([target(row) for row in out])

    torch.testing.assert_close(result.shapley.flatten(), exact_shapley(worth, 4), atol=1e-7, rtol=1e-5)


def test_swin_with_its_reshape_transform():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224").eval().double()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    cam = ShapCAM(model, [model.layers[-1].blocks[-1].norm1], reshape_transform=swin_reshape_transform,
                  n_permutations=2)
    result = cam.explain(x)[0]
    assert result.shapley.shape == (7, 7)
    assert_efficient(result)


def test_torchvision_vit():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_32(weights=None)
    model = randomised_head(model, model.heads.head).eval().double()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    cam = ShapCAM(model, [model.encoder.layers[-1].ln_1],
                  reshape_transform=lambda t: vit_reshape_transform(t, 7, 7), n_permutations=2)
    result = cam.explain(x)[0]
    assert result.shapley.shape == (7, 7)
    assert_efficient(result)


# ------------------------------------------------------------- segmentation (the tutorial)


class SegmentationModelOutputWrapper(nn.Module):
    """pytorch-grad-cam's tutorial wrapper: torchvision segmentation models return a dict."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


@pytest.mark.parametrize("arch", ["fcn_resnet50", "deeplabv3_resnet50"])
def test_semantic_segmentation_target_on_torchvision_models(arch):
    torch.manual_seed(0)
    model = SegmentationModelOutputWrapper(
        torchvision.models.get_model(arch, weights=None, weights_backbone=None, num_classes=4, aux_loss=False)
    ).eval()
    x = torch.randn(1, 3, 32, 32)  # layer4 is 4 x 4 (output stride 8); 2 x 2 groups make 4 players
    with torch.no_grad():
        output = model(x)
    normalized_masks = torch.nn.functional.softmax(output, dim=1).cpu()
    category = 2
    mask = normalized_masks[0, :, :, :].argmax(axis=0).detach().cpu().numpy()
    mask_float = np.float32(mask == category)
    target_layers = [model.model.backbone.layer4]
    targets = [SemanticSegmentationTarget(category, mask_float)]
    with ShapCAM(model=model, target_layers=target_layers, exact=True, group_size=2) as cam:
        grayscale_cam = cam(input_tensor=x, targets=targets)[0, :]
        result = cam.explain(x, targets)[0]
    assert grayscale_cam.shape == (32, 32)

    layer4 = model.model.backbone.layer4
    group_of = (torch.arange(4)[:, None] // 2 * 2 + torch.arange(4)[None] // 2).flatten()

    def worth(members):  # all coalitions in one batch, layer4's cells of absent groups zeroed
        keep = members[:, group_of].view(-1, 1, 4, 4)
        handle = layer4.register_forward_hook(lambda m, i, o: torch.where(keep, o, 0.0))
        with torch.no_grad():
            out = model(x.expand(len(members), -1, -1, -1))
        handle.remove()
        return torch.stack([targets[0](row) for row in out])

    torch.testing.assert_close(result.shapley.flatten(), exact_shapley(worth, 4), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------- embeddings (the tutorial)


class SimilarityToConceptTarget:
    """pytorch-grad-cam's tutorial target: cosine similarity to a concept's embedding."""

    def __init__(self, features):
        self.features = features

    def __call__(self, model_output):
        cos = nn.CosineSimilarity(dim=0)
        return cos(model_output, self.features)


def test_similarity_to_concept_on_a_feature_extractor():
    torch.manual_seed(0)
    model = ResnetFeatureExtractor(torchvision.models.resnet18(weights=None)).eval()
    concept, image = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        concept_features = model(concept)[0, :]
    target_layers = [model.model.layer4[-1]]
    targets = [SimilarityToConceptTarget(concept_features)]
    with ShapCAM(model=model, target_layers=target_layers, exact=True) as cam:  # layer4 is 2 x 2
        result = cam.explain(image, targets)[0]
    # The extractor defines __call__, not forward: traced through it, so the pooled fast path (the
    # hook path, "generic", reran the model per coalition: 40 minutes at the default K at 224 px).
    assert result.path == "pooled"
    block = model.model.layer4[-1]
    act = {}
    handle = block.register_forward_hook(lambda m, i, o: act.setdefault("out", o))
    with torch.no_grad():
        model(image)
    handle.remove()

    def worth(members):
        masked = torch.where(members.view(-1, 1, 2, 2), act["out"], 0.0)
        pooled = masked.mean((2, 3))
        return nn.functional.cosine_similarity(pooled, concept_features[None], dim=1)

    torch.testing.assert_close(result.shapley.flatten(), exact_shapley(worth, 4), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ detection (the tutorial)


def faster_rcnn(size: int):
    """Random-weight Faster R-CNN R50-FPN in float64 at ``size`` px, an image, its outputs, and
    the tutorial's target on its first two boxes."""
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=size, max_size=size, box_score_thresh=0.0).eval().double()
    x = torch.rand(1, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        outputs = model(x)
    boxes, labels = outputs[0]["boxes"][:2].numpy(), outputs[0]["labels"][:2].tolist()
    return model, x, outputs, [FasterRCNNBoxScoreTarget(labels=labels, bounding_boxes=boxes)]


def test_faster_rcnn_tutorial_at_the_backbone():
    """The tutorial's target_layers=[model.backbone]: an OrderedDict of FPN levels, each masked
    over the cells of the transform's grid (2 x 2 at 96 px)."""
    model, x, outputs, targets = faster_rcnn(96)
    with pytest.warns(UserWarning, match="hook path"):
        cam = ShapCAM(model, target_layers=[model.backbone], reshape_transform=fasterrcnn_reshape_transform,
                      n_permutations=1, antithetic=False)
    result = cam.explain(x, targets)[0]
    assert result.shapley.shape == (2, 2)
    assert_efficient(result)
    # The coalitions of every player and of none, outside the engine: the model as it is, and
    # with every level of the backbone's output zeroed.
    handle = model.backbone.register_forward_hook(
        lambda module, args, levels: {key: torch.zeros_like(level) for key, level in levels.items()})
    with torch.no_grad():
        empty = model(x)
    handle.remove()
    assert result.value_full == pytest.approx(float(targets[0](outputs[0])), rel=1e-9)
    assert result.value_empty == pytest.approx(float(targets[0](empty[0])), rel=1e-9, abs=1e-12)


def test_faster_rcnn_box_score_target_through_the_hook_path(capsys):
    model, x, _, targets = faster_rcnn(64)
    with pytest.warns(UserWarning, match="hook path"):  # detection models do not trace with fx
        cam = ShapCAM(model, [model.backbone.body.layer4], n_permutations=2)  # 2 x 2 map: 4 players
    start = time.perf_counter()
    result = cam.explain(x, targets)[0]
    seconds = time.perf_counter() - start
    assert result.path == "generic" and result.shapley.shape == (2, 2)
    assert_efficient(result)
    coalitions = 2 * (4 + 1) + 2
    with capsys.disabled():
        print(f"\nFaster R-CNN R50-FPN at 64 px, hook path: {seconds / coalitions:.2f} s per coalition")
