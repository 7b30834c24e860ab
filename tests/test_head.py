"""split_model: head(trunk(x)) must reproduce model(x), on the fx path and on the hook fallback."""
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.testing import assert_close

from shapcam_ext.head import LayerInput, module_name, split_model
from shapcam_ext.cli.images import bundled_photos, load_image
from shapcam_ext.cli.layers import default_layer
from shapcam_ext.cli.models import imagenet_classes, load_model
from shapcam_ext.cli.preprocessing import preprocess
from tutorials import ResnetFeatureExtractor


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("timm:"):
        return timm.create_model(name[5:], pretrained=False).eval()
    return torchvision.models.get_model(name, weights=None).eval()


def _split_and_run(model, layer, x, **kwargs):
    split = split_model(model, layer, **kwargs)
    with torch.no_grad():
        out = split.trunk(x)
        return split, out, split.head(out.activation, *out.held), model(x)


CASES = [
    ("resnet18", "layer4", 0),
    ("resnet18", "layer4.1.conv1", 1),  # inside a residual block: the skip input is held
    ("resnet50", "layer4.2.conv3", 1),
    ("vgg16", "features.29", 0),
    ("densenet121", "features", 0),
    ("mobilenet_v3_large", "features", 0),
    ("efficientnet_b0", "features", 0),
    ("convnext_tiny", "features", 0),
    ("timm:tf_efficientnet_lite0", "bn2", 0),  # traces only with timm's no-trace leaves/functions
]


@pytest.mark.parametrize("name,layer,n_held", CASES, ids=[f"{n}-{l}" for n, l, _ in CASES])
def test_head_of_trunk_equals_model(name, layer, n_held):
    model = _model(name)
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fx path must not fall back
        split, out, y, expected = _split_and_run(model, layer, x)
    assert split.graph_module is not None and split.layer_name == layer
    assert out.activation.dim() == 4 and out.activation.shape[0] == 2
    assert len(out.held) == n_held
    assert all(h.shape[0] == 2 for h in out.held)
    assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name,layer", [("resnet18", "layer4.1.conv1"), ("timm:tf_efficientnet_lite0", "bn2")])
def test_head_repeats_held_tensors_for_a_larger_batch(name, layer):
    model, m = _model(name), 3
    x = torch.randn(2, 3, 64, 64)
    split, out, _, expected = _split_and_run(model, layer, x)
    with torch.no_grad():
        y = split.head(out.activation.repeat_interleave(m, dim=0), *out.held)
    assert_close(y, expected.repeat_interleave(m, dim=0), rtol=1e-4, atol=1e-5)


def test_head_rejects_mismatched_held_values():
    split, out, _, _ = _split_and_run(_model("resnet18"), "layer4.1.conv1", torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="multiple"):
        split.head(out.activation[:1].repeat(3, 1, 1, 1), *out.held)  # 3 rows for 2 images
    with pytest.raises(TypeError, match="held"):
        split.head(out.activation)


@pytest.mark.parametrize("name,layer", [("densenet121", "features"), ("resnet18", "layer4.1.bn1")])
def test_head_does_not_modify_its_inputs(name, layer):
    # densenet applies F.relu(inplace=True) right after `features`, resnet an inplace ReLU after bn1
    split, out, _, _ = _split_and_run(_model(name), layer, torch.randn(1, 3, 64, 64))
    before = out.activation.clone()
    assert (before < 0).any()
    with torch.no_grad():
        split.head(out.activation, *out.held)
    assert torch.equal(out.activation, before)


class _BatchSizeReader(nn.Module):
    """Reads the batch size before the cut and uses it after: the head must see its own batch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        b = x.shape[0]
        return self.fc(self.conv(x).reshape(b, -1))


def test_shape_reads_before_the_cut_follow_the_head_batch():
    model = _BatchSizeReader().eval()
    x = torch.randn(2, 3, 8, 8)
    split, out, y, expected = _split_and_run(model, "conv", x)
    assert split.graph_module is not None
    assert_close(y, expected, rtol=0, atol=0)
    with torch.no_grad():
        y4 = split.head(out.activation.repeat_interleave(4, dim=0), *out.held)
    assert_close(y4, expected.repeat_interleave(4, dim=0))


class _Branchy(nn.Module):
    """Data-dependent Python control flow: torch.fx cannot trace it."""

    in_channels = 3

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        if y.sum() > 0:
            y = y * 2
        return self.fc((self.conv2(y) + y).mean((2, 3)))


class _Shared(nn.Module):
    """The same conv is called twice, so a single cut point does not exist in the graph."""

    in_channels = 4

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(torch.relu(self.conv(x)))).mean((2, 3)))


@pytest.mark.parametrize("model,layer,reason", [(_Branchy(), "conv2", "TraceError"), (_Shared(), "conv", "2 times")])
def test_hook_fallback(model, layer, reason):
    torch.manual_seed(0)
    model.eval()
    x = torch.randn(2, model.in_channels, 16, 16)
    with pytest.warns(UserWarning, match=f"could not trace.*{reason}.*hook path"):
        split, out, y, expected = _split_and_run(model, layer, x)
    assert split.graph_module is None
    assert_close(y, expected, rtol=0, atol=0)
    with torch.no_grad():
        y3 = split.head(out.activation.repeat_interleave(3, dim=0), *out.held)
    assert_close(y3, expected.repeat_interleave(3, dim=0), rtol=1e-5, atol=1e-6)


def _traced_split(model, layer, x, reference=None):
    """The split, checked to be traced and to compute ``reference`` (default: the model)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fx path must not fall back
        split = split_model(model, layer)
    assert split.graph_module is not None
    with torch.no_grad():
        out = split.trunk(x)
        assert_close(split.head(out.activation, *out.held), (reference or model)(x), rtol=0, atol=0)
    return split


def test_hooks_other_code_keeps_on_the_model_are_neither_traced_nor_touched():
    """A live pytorch-grad-cam GradCAM on layer3[-1] (the usual side-by-side comparison): its hooks
    call register_hook on their output, which breaks fx tracing if the tracer runs them."""
    grad_cam = pytest.importorskip("pytorch_grad_cam")
    model = _model("resnet18")
    block = model.layer3[-1]
    gradcam = grad_cam.GradCAM(model, [block])
    calls = []
    block.register_forward_pre_hook(lambda module, args: calls.append("pre"))
    hooks, pre_hooks = block._forward_hooks, block._forward_pre_hooks
    registered = (list(hooks.items()), list(pre_hooks.items()))
    split = _traced_split(model, model.layer4[-1], torch.randn(2, 3, 64, 64))
    assert split.layer_name == "layer4.1"
    assert block._forward_hooks is hooks and block._forward_pre_hooks is pre_hooks
    assert (list(hooks.items()), list(pre_hooks.items())) == registered
    # The trace ran none of them; the model's own forward pass (above) ran each once.
    assert calls == ["pre"] and len(gradcam.activations_and_grads.activations) == 1


def test_a_model_that_defines_call_instead_of_forward_is_traced():
    model = ResnetFeatureExtractor(_model("resnet18")).eval()
    split = _traced_split(model, model.model.layer4[-1], torch.randn(2, 3, 64, 64))
    assert split.layer_name == "model.layer4.1"


@pytest.mark.parametrize("layer", ["module", "layer4", "_orig_mod.layer4"])
def test_a_compiled_model_is_split_at_the_model_it_wraps(layer):
    eager = _model("resnet18")
    compiled = torch.compile(eager)
    # Compared with the eager model: running the compiled one would compile it (a minute here).
    split = _traced_split(compiled, compiled.layer4 if layer == "module" else layer, torch.randn(2, 3, 64, 64), eager)
    assert split.layer_name == "layer4"


@pytest.mark.parametrize("model,layer,traced", [
    (_model("resnet18"), "layer4.1.conv1", True),  # its input is also the block's skip
    (_Branchy(), "conv2", False),
])
def test_cut_at_a_layers_input(model, layer, traced):
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    seen = []
    handle = model.get_submodule(layer).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if not traced else "error")
            split, out, y, expected = _split_and_run(model, LayerInput(layer), x)
    finally:
        handle.remove()
    assert (split.graph_module is not None) == traced and split.layer_name == layer
    assert torch.equal(out.activation, seen[-1])
    assert_close(y, expected, rtol=0, atol=0)
    with torch.no_grad():  # a masked input reaches the layer: zero it, and the head must differ
        assert not torch.equal(split.head(torch.zeros_like(out.activation), *out.held), expected)


def test_explicit_head_is_used_as_given():
    model = _model("resnet18")
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.fc)
    x = torch.randn(1, 3, 64, 64)
    split, out, y, expected = _split_and_run(model, model.layer4, x, head=head)
    assert split.head is head and out.held == () and split.layer_name == "layer4" and split.graph_module is None
    assert_close(y, expected)


def test_bad_target_layers():
    model = _model("resnet18")
    with pytest.raises(ValueError, match=r"'layer5'.*layer4.*named_modules"):
        split_model(model, "layer5")
    with pytest.raises(ValueError, match="not a submodule"):
        split_model(model, nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="not a submodule"):
        module_name(model, nn.ReLU())
    with pytest.raises(ValueError, match="model itself"):
        split_model(model, model)
    assert module_name(model, model.layer4[1].conv1) == "layer4.1.conv1"


def test_training_mode_warns():
    with pytest.warns(UserWarning, match="training mode"):
        split_model(_model("resnet18").train(), "layer4")


def test_real_lite0_weights_on_chelsea():
    model, cfg = load_model()
    x = preprocess(load_image(bundled_photos()["chelsea"]), cfg)
    split, _, y, expected = _split_and_run(model, default_layer("tf_efficientnet_lite0", model), x)
    assert split.layer_name == "bn2" and split.graph_module is not None
    assert_close(y, expected, rtol=0, atol=0)
    prob, index = y.softmax(-1)[0].max(0)
    assert imagenet_classes()[index] == "Egyptian cat"
    assert prob.item() == pytest.approx(0.77, abs=0.03)
