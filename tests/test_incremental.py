"""Incremental walks of heads that mix positions locally before a global pool: exact against the
generic path on the same permutations, and against exact enumeration; refused where not proven."""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import numerics
from exact import exact_shapley
from shapcam_ext import ShapCAM, paths
from shapcam_ext.paths import incremental, prove
from shapcam_ext.paths.recompute import RecomputeWalk
from shapcam_ext.head import split_model
from shapcam_ext.game import Game
from shapcam_ext.memory import MemoryPlanner
from shapcam_ext.players import PlayerGrid
from shapcam_ext.targets import ClassifierOutputSoftmaxTarget, ClassTarget, Scorer
from test_fastpath import SETTINGS, assert_same_maps, both_paths, calibrated

WALKS = {incremental.RECOMPUTE: "incremental-recompute", incremental.TABLE: "incremental-table"}


def force(monkeypatch, walk: str) -> None:
    """Makes ``walk`` run whatever the cost model prefers; it must be available."""
    def forced(costs):
        assert walk in costs, f"the {walk} walk is not available: {sorted(costs)}"
        return walk

    monkeypatch.setattr(incremental, "choose", forced)


@pytest.fixture(params=sorted(WALKS))
def strategy(request, monkeypatch):
    """Each incremental walk in turn."""
    force(monkeypatch, request.param)
    return request.param


BOTH, RECOMPUTE_ONLY = sorted(WALKS), [incremental.RECOMPUTE]
# (model, layer, input size, walks): every cut whose head mixes positions locally before its pool;
# the table needs footprints of at most MAX_BITS positions, so stacked convolutions recompute
COVERED = [
    ("resnet18", "layer4.1.conv1", 96, BOTH),  # bn1, relu, 3x3 conv, bn2, + held skip, relu
    ("resnet50", "layer4.2.conv1", 96, BOTH),  # 3x3 conv inside the bottleneck, then conv3, bn3, + skip
    ("resnet50", "layer4.0.conv1", 96, RECOMPUTE_ONLY),  # 3x3 stride 2; downsample of the held input; 2 blocks
    ("resnet50", "layer3", 64, RECOMPUTE_ONLY),  # all of layer4: three blocks, receptive fields that grow
    ("timm:tf_efficientnet_lite0", "blocks.5", 64, BOTH),  # blocks.6 (3x3 depthwise), conv_head, bn2
    ("timm:tf_efficientnet_lite0", "blocks.4", 96, RECOMPUTE_ONLY),  # 5x5 "same" stride 2 (Conv2dSame), ...
    ("convnext_tiny", "features.7.1", 64, BOTH),  # the last block: 7x7 depthwise, NHWC LayerNorm/MLP, layer scale
    ("timm:convnext_atto", "stages.3.blocks.0", 64, BOTH),  # timm's block: conv_dw, LayerNorm, Mlp, gamma, skip
]
CASES = [(name, layer, size, walk) for name, layer, size, walks in COVERED for walk in walks]


def explain_both(name, layer, size, seed=1, **settings):
    """Both paths' results and the bound on their worths' rounding (tests/numerics.py)."""
    model = calibrated(name)
    torch.manual_seed(seed)
    fast, generic, scale = both_paths(model, layer, torch.randn(2, 3, size, size), **settings)
    return fast, generic, numerics.model_value_error(scale, model, layer, fast[0].shapley.numel())


@pytest.mark.parametrize("name,layer,size,walk", CASES, ids=[f"{n}-{l}-{w}" for n, l, _, w in CASES])
def test_incremental_walks_equal_the_generic_path(name, layer, size, walk, monkeypatch):
    force(monkeypatch, walk)
    fast, generic, value_error = explain_both(name, layer, size)
    assert {r.path for r in fast} == {WALKS[walk]}
    assert_same_maps(fast, generic, value_error)


def tiny_head_model() -> nn.Module:
    """A 2 x 4 map (8 players) and every kind of local layer: strided, dilated, grouped, "same"."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU())
            self.a = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=3), nn.BatchNorm2d(6), nn.ReLU(inplace=True))
            self.b = nn.Conv2d(6, 6, (1, 3), padding="same", dilation=(1, 2))
            self.c = nn.Conv2d(6, 8, 3, stride=2, padding=1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            x = self.stem(x)
            y = self.b(self.a(x)) + x
            return self.fc(torch.tanh(self.c(y)).mean((2, 3)))

    torch.manual_seed(7)
    model = Model().eval()
    with torch.no_grad():
        model.a[1].running_mean.uniform_(-0.5, 0.5)
        model.a[1].running_var.uniform_(0.5, 2.0)
    return model


def test_incremental_walks_match_exact_enumeration(strategy):
    model = tiny_head_model()
    x = torch.randn(1, 3, 2, 4)
    act = model.stem(x)

    def worth(members):
        masked = torch.where(members.view(-1, 1, 2, 4), act, 0.0)
        y = model.b(model.a(masked)) + masked
        return model.fc(torch.tanh(model.c(y)).mean((2, 3))).softmax(-1)[:, 2]

    with numerics.LogitScale(model.fc) as scale, torch.no_grad():
        result = ShapCAM(model, [model.stem], exact=True).explain(x, [ClassifierOutputSoftmaxTarget(2)])[0]
        expected = exact_shapley(worth, 8)
    assert result.path == WALKS[strategy]
    # each side within map_error of the exact values
    value_error = numerics.model_value_error(scale, model, model.stem, 8)
    numerics.assert_within(result.shapley.flatten(), expected, 2 * numerics.map_error(value_error),
                           f"{result.path} walk against exact enumeration")


class Geometry(nn.Module):
    """conv(k, stride, padding, dilation, groups) between two position-wise layers, then a pool."""

    def __init__(self, kernel, stride, padding, dilation, groups, same_pad):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
        conv = (timm.layers.Conv2dSame(4, 4, kernel, stride, dilation=dilation, groups=groups) if same_pad
                else nn.Conv2d(4, 4, kernel, stride, padding, dilation, groups))
        self.body = nn.Sequential(conv, nn.GELU(), nn.Conv2d(4, 6, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


@settings(max_examples=20, deadline=None)
@given(kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)), stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       padding=st.tuples(st.integers(0, 2), st.integers(0, 2)), dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       groups=st.sampled_from([1, 2, 4]), same_pad=st.booleans(),
       size=st.tuples(st.integers(3, 6), st.integers(3, 6)), walk=st.sampled_from(sorted(WALKS)))
def test_any_convolution_geometry_is_walked_exactly(kernel, stride, padding, dilation, groups, same_pad, size, walk):
    torch.manual_seed(0)
    model = Geometry(kernel, stride, padding, dilation, groups, same_pad).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        try:
            model(x)
        except RuntimeError:  # the kernel does not fit the padded map: no such model
            assume(False)
    original, available = incremental.choose, []
    incremental.choose = lambda costs: available.append(walk in costs) or (walk if walk in costs else original(costs))
    with numerics.LogitScale(model.head[2]) as scale:
        try:
            fast = ShapCAM(model, [model.stem], n_permutations=4, seed=3).explain(x, [ClassTarget(0, softmax=False)])[0]
        finally:
            incremental.choose = original
        generic = ShapCAM(model, [model.stem], n_permutations=4, seed=3, fast_path=False).explain(
            x, [ClassTarget(0, softmax=False)])[0]
    if not same_pad and kernel == stride == (1, 1) and padding == (0, 0):
        assert fast.path == "additive"  # position-wise after all, and a logit: one term per position
    elif available[0]:  # else the table's footprints are too large: another path, still exact
        assert fast.path == WALKS[walk]
    # Both paths compute each worth (a logit) within the rounding bound of tests/numerics.py; a wrong
    # box or index moves a marginal by the size of the map itself, checked to be far above it.
    bound = 2 * numerics.map_error(numerics.model_value_error(scale, model, model.stem, fast.shapley.numel(), "logit"))
    assume(float(generic.shapley.abs().max()) > 100 * bound)  # else the map is too faint to compare
    numerics.assert_within(fast.shapley, generic.shapley, bound, f"{fast.path} walk against the generic path")


def choice(model, layer, permutations, size=224) -> tuple[list, str]:
    """(the walks costed, the one chosen) for one image of ``size``."""
    split = split_model(model, layer)
    pattern, why = prove(split)
    assert pattern is not None and pattern.local is not None, why
    with torch.no_grad():
        out = split.trunk(torch.randn(1, 3, size, size))
        found = incremental.estimate(pattern, out.activation, torch.zeros_like(out.activation), out.held,
                                     permutations, 1 << 30)
    return sorted(found.costs), incremental.choose(found.costs)


def test_cost_model_prefers_the_table_for_many_permutations():
    model = calibrated("timm:tf_efficientnet_lite0")
    # blocks.5: 7 x 7 (n = 49), 3 x 3 footprints: 512 maps of the body pay off after some 100 permutations
    assert choice(model, "blocks.5", 8) == (["generic", "recompute", "table"], "recompute")
    assert choice(model, "blocks.5", 1000) == (["generic", "recompute", "table"], "table")
    # blocks.4: 14 x 14, footprints over the whole map (no table); the sites beat whole heads, once the
    # walk's probe permutation is paid for
    assert choice(model, "blocks.4", 64) == (["generic", "recompute"], "recompute")
    assert choice(model, "blocks.4", 1)[1] == "generic"
    # a 7 x 7 depthwise conv on a 7 x 7 map reaches every position from the centre, but 4 x 4 of them from
    # a corner: the sites average 28 of 49, and the walk beats the generic path (1.7x, bench_breakdown.py)
    assert choice(calibrated("convnext_tiny"), "features.7.1", 64)[1] == "recompute"


def test_chunks_and_memory_budget_do_not_change_the_maps(strategy):
    model = calibrated("resnet18")
    torch.manual_seed(6)
    x = torch.randn(2, 3, 96, 96)
    layer = "layer4.1.conv1"
    # The generic path runs the head's Linear on every coalition, so the scale records them all.
    with numerics.LogitScale(numerics.final_linear(model)) as scale:
        ShapCAM(model, [layer], fast_path=False, **SETTINGS).explain(x)
        whole = ShapCAM(model, [layer], **SETTINGS).explain(x)
        chunked = ShapCAM(model, [layer], **{**SETTINGS, "batch_size": 1}).explain(x)
        budget = 16 << 20  # the table (2 images x 833 rows x (512 + 1000) floats) is 10 MB
        with LargestAllocation() as largest:
            small = ShapCAM(model, [layer], n_permutations=6, memory_budget=budget).explain(x)
    assert largest.bytes <= budget
    # Chunks change the shapes of the GEMMs, and so the order of the roundings: each run is within
    # map_error of the exact map, so two runs are within twice that of each other.
    bound = 2 * numerics.map_error(numerics.model_value_error(scale, model, layer, whole[0].shapley.numel()))
    for w, c, s in zip(whole, chunked, small):
        assert w.path == c.path == s.path == WALKS[strategy]
        for other, what in ((c, "one head evaluation per chunk"), (s, "a 16 MiB budget")):
            numerics.assert_within(other.shapley, w.shapley, bound, f"{what} against one chunk")


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.untyped_storage().nbytes())
        return out


def test_walks_leave_their_inputs_untouched(strategy):
    model = calibrated("convnext_tiny")  # its blocks add in place: result += input
    split = split_model(model, "features.7.1")
    pattern, why = prove(split)
    assert pattern is not None and pattern.local is not None, why
    with torch.no_grad():
        out = split.trunk(torch.randn(2, 3, 64, 64))
        grid = PlayerGrid(out.activation)
        players, held = grid.players, out.held
        before = [t.clone() for t in (players, *held)]
        game = Game(layer="features.7.1", head=split.head, grid=grid, players=players, baseline=torch.tensor(0.5),
                    held=held, batched=tuple(isinstance(h, torch.Tensor) and h.dim() > 0 for h in held),
                    targets=(ClassTarget(1), ClassTarget(4)), images=slice(0, 2), scorer=Scorer(),
                    planner=MemoryPlanner(1 << 30), permutations=8)
        walk = paths.evaluator_for(game, paths.proof_of(split))
        walk.values(torch.stack([torch.randperm(4) for _ in range(3)]))
    assert walk.path == WALKS[strategy]
    assert all(torch.equal(a, b) for a, b in zip(before, (players, *held)))


def test_a_walk_that_fails_falls_back_to_the_generic_path(monkeypatch):
    def broken(self, perms):
        raise RuntimeError("an op that cannot run on boxes")

    monkeypatch.setattr(RecomputeWalk, "values", broken)
    force(monkeypatch, incremental.RECOMPUTE)
    model = calibrated("resnet18")
    with pytest.warns(RuntimeWarning, match="cannot run on boxes"):
        result = ShapCAM(model, ["layer4.1.conv1"], n_permutations=4).explain(torch.randn(1, 3, 64, 64))[0]
    assert result.path == "generic"


class SqueezeExcite(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class Attention(nn.Module):
    """Self-attention over the positions: every position reads every other."""

    def __init__(self, channels):
        super().__init__()
        self.attn = nn.MultiheadAttention(channels, 1, batch_first=True)

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)
        return self.attn(tokens, tokens, tokens)[0].transpose(1, 2).reshape(x.shape)


def local_then(layer: nn.Module, pool: nn.Module = None) -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), layer,
                         pool or nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LazyLinear(5))


REFUSED = [
    (local_then(SqueezeExcite(4)), "squeeze-and-excitation"),  # a global op before the pool
    (local_then(Attention(4)), "not a recognised position-wise op"),
    (local_then(nn.Upsample(scale_factor=2)), "Upsample"),
    (local_then(nn.MaxPool2d(3, 1, 1)), "MaxPool2d"),  # a local op other than a convolution
    (local_then(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")), "Conv2d"),  # padding reads across the map
    (local_then(nn.Identity(), nn.MaxPool2d(2)), "local pool after spatial convolutions"),
]


@pytest.mark.parametrize("model,reason", REFUSED, ids=[r for _, r in REFUSED])
def test_heads_that_mix_positions_otherwise_take_the_generic_path(model, reason):
    model.eval()
    x = torch.randn(1, 3, 4, 4)
    model(x)  # materialise the lazy Linear
    pattern, why = prove(split_model(model, model[1]))
    assert pattern is None and reason in why
    assert ShapCAM(model, [model[1]], n_permutations=4).explain(x)[0].path == "generic"


@pytest.mark.parametrize("name,layer", [("mobilenet_v3_large", "features.12"), ("efficientnet_b0", "features.5"),
                                        ("regnet_y_400mf", "trunk_output.block4.block4-0.f.b")])
def test_squeeze_excitation_is_refused_on_real_families(name, layer):
    pattern, why = prove(split_model(calibrated(name), layer))
    assert pattern is None and "squeeze-and-excitation" in why
