"""Fast head paths: proven from the graph, equal to the generic path on the same permutations."""
import copy
import warnings
from functools import lru_cache

import pytest
import timm
import torch
import torchvision
from torch import nn

from shapcam_ext import ShapCAM, ops, paths
import numerics
from exact import exact_shapley
from shapcam_ext.paths import pattern as fast_pattern
from shapcam_ext.paths import prove
from shapcam_ext.game import Game
from shapcam_ext.head import split_model
from shapcam_ext.memory import MemoryPlanner
from shapcam_ext.players import PlayerGrid
from shapcam_ext.targets import ClassifierOutputSoftmaxTarget, ClassTarget, Scorer

SETTINGS = dict(n_permutations=6, batch_size=512)


@lru_cache(maxsize=2)
def calibrated(name: str) -> nn.Module:
    """A random-weight model whose activations are neither vanishing nor exploding.

    Batch norm takes the statistics of one random batch; ConvNeXt's layer scales (1e-6 at init)
    become 1, so that the residual branches matter.
    """
    torch.manual_seed(0)
    if name.startswith("timm:"):
        model = timm.create_model(name[5:], pretrained=False)
    else:
        model = torchvision.models.get_model(name, weights=None)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average: after one batch, that batch's statistics
    for param_name, param in model.named_parameters():
        if param_name.endswith(("layer_scale", "gamma")):
            param.data.fill_(1.0)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 64, 64))
    return model.eval()


def both_paths(model, layer, x, targets=None, **settings):
    """The fast and the generic path's results, and the magnitudes of the logits they computed."""
    options = {**SETTINGS, **settings}
    with numerics.LogitScale(numerics.final_linear(model)) as scale:
        fast = ShapCAM(model, [layer], **options).explain(x, targets)
        generic = ShapCAM(model, [layer], fast_path=False, **options).explain(x, targets)
    return fast, generic, scale


def assert_same_maps(fast, generic, value_error):
    """Both paths estimate the same map from the same permutations, each within
    numerics.map_error of it when every worth is within value_error of exact."""
    for f, g in zip(fast, generic):
        assert g.path == "generic"
        assert f.n_permutations == g.n_permutations
        numerics.assert_within(f.shapley, g.shapley, 2 * numerics.map_error(value_error),
                               f"{f.path} path against the generic path")
        assert f.value_full == g.value_full and f.value_empty == g.value_empty


MODELS = [
    ("resnet18", "layer4", "pooled-linear"),
    ("resnet50", "layer4.2.conv3", "pooled-linear"),  # bn3, add of the held skip tensor, relu
    ("vgg16", "features.29", "local-pool-linear"),  # 4x4 map: 2x2 max pool cells, adaptive pool upsamples
    ("densenet121", "features", "pooled-linear"),  # in-place relu on a copy, F.adaptive_avg_pool2d
    ("mobilenet_v3_large", "features", "pooled"),  # Linear-Hardswish-Dropout-Linear tail
    ("efficientnet_b0", "features", "pooled-linear"),
    ("convnext_tiny", "features", "pooled"),  # LayerNorm2d on the pooled vector
    ("regnet_y_400mf", "trunk_output", "pooled-linear"),
    ("timm:tf_efficientnet_lite0", "bn2", "pooled-linear"),
    ("timm:tf_efficientnet_lite0", "conv_head", "pooled-linear"),  # BatchNormAct2d before the pool
    ("convnext_tiny", "features.7.2.block.0", "pooled"),  # permute, LayerNorm, Linear, GELU in NHWC
    ("timm:convnext_atto", "stages.3.blocks.1.conv_dw", "pooled"),  # F.layer_norm, 1x1 convs, gamma, skip
    # a 3x3 conv follows, then a held skip: on 2x2 maps the cost model tabulates the 16 states
    ("resnet18", "layer4.1.conv1", "incremental-table"),
    ("timm:tf_efficientnet_lite0", "blocks.5", "incremental-table"),  # blocks.6's 3x3 depthwise conv
]


@pytest.mark.parametrize("name,layer,path", MODELS, ids=[f"{n}-{l}" for n, l, _ in MODELS])
def test_fast_path_equals_generic_path(name, layer, path):
    model = calibrated(name)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    fast, generic, scale = both_paths(model, layer, x)
    assert [r.path for r in fast] == [path, path]
    assert_same_maps(fast, generic, numerics.model_value_error(scale, model, layer, fast[0].shapley.numel()))


# How each target's worth moves with the logits: a logit, a softmax probability, or (for a
# difference of two logits) a Lipschitz constant in the max norm (the sigmoid's is 1/4).
# (Logit targets alone make the game additive: tests/test_additive.py.)
@pytest.mark.parametrize("targets,path,worths", [
    ([ClassTarget(3, softmax=True), ClassTarget(5, softmax=False)], "pooled", ["softmax", "logit"]),  # mixed
    ([lambda out: out[1] - out[2], lambda out: out[0].sigmoid()], "pooled", [2.0]),  # any callable
], ids=["mixed", "callable"])
def test_targets_on_a_pooled_linear_head(targets, path, worths):
    model = calibrated("resnet50")
    torch.manual_seed(2)
    x = torch.randn(2, 3, 64, 64)
    fast, generic, scale = both_paths(model, "layer4.2.conv3", x, targets)
    assert {r.path for r in fast} == {path}
    n = fast[0].shapley.numel()
    value_error = max(numerics.model_value_error(scale, model, "layer4.2.conv3", n, worth) for worth in worths)
    assert_same_maps(fast, generic, value_error)


@pytest.mark.parametrize("name,layer", [("mobilenet_v3_large", "features"), ("vgg16", "features.29")])
def test_walk_chunks_do_not_change_values(name, layer):
    model = calibrated(name)
    torch.manual_seed(6)
    x = torch.randn(2, 3, 64, 64)
    with numerics.LogitScale(numerics.final_linear(model)) as scale:
        whole = ShapCAM(model, [layer], **SETTINGS).explain(x)
        chunked = ShapCAM(model, [layer], **{**SETTINGS, "batch_size": 1}).explain(x)  # one permutation per chunk
    # The tables and their running sums are per permutation, so both runs feed the tail the same
    # inputs; the chunk size changes only the tail's GEMM shapes, hence the order of its roundings.
    # Each run's worths are within the tail's bound (its dot products' fan-in) of exact.
    tail = prove(split_model(model, layer))[0].tail
    value_error = scale.value_error(numerics.head_sums(tail, positions=0))
    for w, c in zip(whole, chunked):
        assert w.path == c.path != "generic"
        numerics.assert_within(w.shapley, c.shapley, 2 * numerics.map_error(value_error),
                               "one permutation per chunk against one chunk")


def test_tensor_baseline_and_tolerance_rounds():
    model = calibrated("resnet50")
    torch.manual_seed(3)
    x = torch.randn(1, 3, 96, 96)  # 3x3 map
    baseline = torch.rand(2048, 1, 1)
    fast, generic, scale = both_paths(model, "layer4.2.conv3", x, baseline=baseline, n_permutations=1024,
                                      tolerance=0.3)
    assert fast[0].path == "pooled-linear" and fast[0].n_permutations < 1024
    assert_same_maps(fast, generic, numerics.model_value_error(scale, model, "layer4.2.conv3", 9))


def local_pool_model(pool: nn.Module, tail: nn.Module) -> nn.Sequential:
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), pool, nn.Flatten(), nn.Linear(4 * 1 * 1, 6), tail).eval()


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.AvgPool2d(2)], ids=["max", "avg"])
def test_local_pool_matches_exact_enumeration(pool):
    # A 2x3 map and a 2x2 window: one pooled cell; the third column is outside every window.
    model = local_pool_model(pool, nn.Sequential(nn.Tanh(), nn.Linear(6, 3)))
    x = torch.randn(1, 3, 2, 3)
    act, head = model[:2](x), model[2:]

    def worth(members):
        keep = members.view(-1, 1, 2, 3)
        return head(torch.where(keep, act, 0.0)).softmax(-1)[:, 1]

    with numerics.LogitScale(numerics.final_linear(model)) as scale:
        result = ShapCAM(model, [model[1]], exact=True).explain(x, [ClassifierOutputSoftmaxTarget(1)])[0]
        expected = exact_shapley(worth, 6)
    assert result.path == "local-pool-linear"
    # Both exact: each within map_error of the exact values (a pool window of 4 positions).
    value_error = scale.value_error(numerics.head_sums(head, positions=4))
    numerics.assert_within(result.shapley.flatten(), expected, 2 * numerics.map_error(value_error),
                           "the local-pool walk against exact enumeration")
    assert (result.shapley[:, 2] == 0).all()  # null players


def tiny_pooled(mid: nn.Module) -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), mid, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 5)).eval()


class MeanPlusMax(nn.Module):
    def forward(self, x):
        return x.mean((2, 3)) + x.amax((2, 3))


class NormOverWidth(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(3)

    def forward(self, x):
        return self.norm(x).mean((2, 3))


class Train(nn.Module):
    """Wraps a module that stays in training mode inside an eval-mode model."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)

    def train(self, mode=True):
        return super().train(True)


NOT_PROVEN = [  # more, for heads with spatial convolutions, in test_incremental.py
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Flatten(), nn.LazyLinear(5)), "MaxPool2d"),
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 5)),
     "AdaptiveMaxPool2d"),
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), MeanPlusMax(), nn.Linear(4, 5)), "amax"),
    # the layer norm reads the activation channels-last, so its mean over (2, 3) covers a channel
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), NormOverWidth(), nn.Linear(4, 5)), "pools a nhwc value"),
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), Train(nn.BatchNorm2d(4)), nn.AdaptiveAvgPool2d(1),
                   nn.Flatten(), nn.Linear(4, 5)), "BatchNorm2d"),
]


@pytest.mark.parametrize("model,reason", NOT_PROVEN, ids=[r for _, r in NOT_PROVEN])
def test_unproven_heads_take_the_generic_path(model, reason):
    model.eval()
    x = torch.randn(1, 3, 3, 3)
    model(x)  # materialise lazy layers
    pattern, why = prove(split_model(model, model[1]))
    assert pattern is None and reason in why
    assert ShapCAM(model, [model[1]], n_permutations=4).explain(x)[0].path == "generic"


def test_players_that_are_not_positions_take_the_generic_path():
    model = tiny_pooled(nn.Identity())
    x = torch.randn(1, 3, 4, 4)
    assert ShapCAM(model, [model[1]], n_permutations=4).explain(x)[0].path == "pooled-linear"
    assert ShapCAM(model, [model[1]], n_permutations=4, group_size=2).explain(x)[0].path == "generic"
    assert ShapCAM(model, [model[1]], n_permutations=4, fast_path=False).explain(x)[0].path == "generic"


def test_probe_catches_a_wrong_proof(monkeypatch):
    # Pretend every conv is position-wise: the probe coalitions expose the 3x3 one.
    model = tiny_pooled(nn.Conv2d(4, 4, 3, padding=1))
    monkeypatch.setattr(fast_pattern, "_module_rule", lambda module: "nchw" if isinstance(module, nn.Conv2d) else None)
    x = torch.randn(1, 3, 4, 4)
    with pytest.warns(RuntimeWarning, match="differs from the head"):
        result = ShapCAM(model, [model[1]], n_permutations=4).explain(x)[0]
    assert result.path == "generic"


def test_fast_path_leaves_inputs_untouched():
    model = calibrated("densenet121")  # its head runs relu(inplace=True) on the activation
    split = split_model(model, "features")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = split.trunk(x)
    before = out.activation.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = ShapCAM(model, ["features"], n_permutations=4).explain(x)[0]
    assert result.path == "pooled-linear"
    with torch.no_grad():
        assert torch.equal(split.trunk(x).activation, before)


def test_the_self_check_runs_the_compiled_walk(monkeypatch):
    """A kernel that drifts from the head (here: 1% off) is caught by the check, which runs the very
    op the run would, and the generic path takes over."""
    real = ops.linear_walk_

    def drifting(start, deltas, *rest):
        real(start, deltas * 1.01, *rest)

    monkeypatch.setattr(ops, "linear_walk_", drifting)
    model = tiny_pooled(nn.Identity())
    x = torch.randn(1, 3, 4, 4)
    with pytest.warns(RuntimeWarning, match="pooled-linear path differs from the head"):
        result = ShapCAM(model, [model[1]], n_permutations=4).explain(x)[0]
    assert result.path == "generic"


def test_an_in_place_tail_never_writes_into_what_the_walk_keeps():
    """VGG's classifier runs ReLU(inplace=True) on the first Linear's output, which the local-pool
    walk keeps as its start; sizing the tail's memory once ran it on that very tensor, and with
    small biases the corrupted start passed the self-check (issue 18.1)."""
    model = copy.deepcopy(calibrated("vgg16"))
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.classifier:
            if isinstance(layer, nn.Linear):
                layer.bias.normal_(0, 0.01)
    split = split_model(model, "features.29")
    proof = paths.proof_of(split)
    with torch.no_grad():
        out = split.trunk(torch.randn(2, 3, 64, 64))
        game = Game(layer="features.29", head=split.head, grid=PlayerGrid(out.activation), players=out.activation,
                    baseline=torch.tensor(0.0), held=out.held, batched=(True,) * len(out.held),
                    targets=(ClassTarget(1), ClassTarget(2)), images=slice(0, 2), scorer=Scorer(),
                    planner=MemoryPlanner(1 << 30), permutations=6)
        walk = paths.evaluator_for(game, proof)
        expected = proof.pattern.front(proof.pattern.body(game.base_map(), *game.held))
    assert walk.path == "local-pool-linear" and (expected < 0).any()
    assert torch.equal(walk.start, expected)
