"""LayerShapCAM against Captum's conventions, the core engine and an independent efficiency check."""
import inspect
from contextlib import nullcontext

import pytest
import torch
import torchvision
from captum.attr import LayerAttribution, LayerGradCam, NoiseTunnel
from torch import nn

from shapcam_ext import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget, ShapCAM
from shapcam_ext.adapters.captum import LayerShapCAM

SETTINGS = dict(n_permutations=24, seed=3)


def score_gain(forward_func, layer, inputs, target):
    """f(inputs) - f(inputs with the layer's output zeroed), per example, outside the engine."""
    with torch.no_grad():
        full = forward_func(inputs)
        handle = layer.register_forward_hook(lambda module, args, output: torch.zeros_like(output))
        try:
            empty = forward_func(inputs)
        finally:
            handle.remove()
    rows = torch.arange(inputs.shape[0])
    return (full[rows, target] - empty[rows, target]).double()


def core_shapley(model, layer, x, targets, **options):
    return torch.stack([r.shapley for r in ShapCAM(model, [layer], **options).explain(x, targets)])[:, None]


def test_is_a_captum_layer_attribution_whose_output_captum_interpolates(resnet):
    model, x = resnet
    explainer = LayerShapCAM(model, model.layer4, **SETTINGS)
    attributions = explainer.attribute(x, target=5)
    assert isinstance(explainer, LayerAttribution)
    assert explainer.forward_func is model and explainer.layer is model.layer4
    assert attributions.shape == (2, 1, 2, 2) and attributions.dtype == torch.float32
    # Captum's own LayerGradCam gives the same layout, so Captum's tooling treats both alike.
    assert LayerGradCam(model, model.layer4).attribute(x, target=5).shape == attributions.shape
    for mode in ("nearest", "bilinear"):
        upsampled = LayerAttribution.interpolate(attributions, (64, 64), mode)
        assert upsampled.shape == (2, 1, 64, 64) and upsampled.dtype == torch.float32
    nearest = LayerAttribution.interpolate(attributions, (64, 64))
    torch.testing.assert_close(nearest[:, :, ::32, ::32], attributions)


def test_keeps_the_input_dtype():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval().double()
    attributions, delta = LayerShapCAM(model, model.layer4, **SETTINGS).attribute(
        torch.randn(1, 3, 64, 64, dtype=torch.float64), target=1, return_convergence_delta=True)
    assert attributions.dtype == delta.dtype == torch.float64


def test_agrees_with_the_core_and_sums_to_the_score_gain(resnet):
    model, x = resnet
    attributions, delta = LayerShapCAM(model, model.layer4, **SETTINGS).attribute(
        x, target=5, return_convergence_delta=True)
    expected = core_shapley(model, model.layer4, x, [ClassifierOutputTarget(5)] * 2, **SETTINGS)
    torch.testing.assert_close(attributions, expected.float())
    gain = score_gain(model, model.layer4, x, 5)
    torch.testing.assert_close(attributions.double().sum((1, 2, 3)), gain, atol=1e-5, rtol=1e-5)
    assert delta.shape == (2,) and delta.dtype == torch.float32
    torch.testing.assert_close(delta.double(), attributions.double().sum((1, 2, 3)) - gain, atol=1e-6, rtol=0)


@pytest.mark.parametrize("target", [
    [3, 7], torch.tensor([3, 7]), [(3,), (7,)],
], ids=["list", "tensor", "list-of-tuples"])
def test_per_example_targets_in_captum_forms(resnet, target):
    model, x = resnet
    attributions = LayerShapCAM(model, model.layer4, **SETTINGS).attribute(x, target=target)
    expected = core_shapley(model, model.layer4, x, [ClassifierOutputTarget(3), ClassifierOutputTarget(7)],
                            **SETTINGS)
    torch.testing.assert_close(attributions, expected.float())


@pytest.mark.parametrize("target", [4, torch.tensor(4), torch.tensor([4]), (4,)], ids=["int", "0d", "1-elem", "tuple"])
def test_one_target_for_every_example_in_captum_forms(resnet, target):
    model, x = resnet
    attributions = LayerShapCAM(model, model.layer4, **SETTINGS).attribute(x, target=target)
    expected = core_shapley(model, model.layer4, x, [ClassifierOutputTarget(4)] * 2, **SETTINGS)
    torch.testing.assert_close(attributions, expected.float())


@pytest.mark.parametrize("target,message", [
    (None, "pass target="), ([1, 2, 3], "3 targets for 2 examples"), ((1, 2), "1 dimension"), (1.5, "ints"),
])
def test_targets_that_do_not_pick_one_value_per_example_are_refused(resnet, target, message):
    model, x = resnet
    with pytest.raises(ValueError, match=message):
        LayerShapCAM(model, model.layer4, **SETTINGS).attribute(x, target=target)


def test_callable_forward_func_with_a_layer(resnet):
    """A lambda owns no modules: the layer is cut through the hook path, and the result is the same."""
    model, x = resnet
    probabilities = lambda inputs: model(inputs).softmax(-1)  # noqa: E731 (Captum's usual forward_func)
    with pytest.warns(UserWarning, match="hook path"):
        attributions, delta = LayerShapCAM(probabilities, model.layer4, **SETTINGS).attribute(
            x, target=torch.tensor([1, 2]), return_convergence_delta=True)
    expected = core_shapley(model, model.layer4, x, [ClassifierOutputSoftmaxTarget(c) for c in (1, 2)], **SETTINGS)
    torch.testing.assert_close(attributions, expected.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attributions.double().sum((1, 2, 3)),
                               score_gain(probabilities, model.layer4, x, torch.tensor([1, 2])), atol=1e-6, rtol=1e-5)
    assert delta.abs().max() < 1e-6


def test_target_none_for_one_value_per_example(resnet):
    model, x = resnet
    with pytest.warns(UserWarning, match="hook path"):
        attributions = LayerShapCAM(lambda inputs: model(inputs)[:, 6], model.layer4, **SETTINGS).attribute(x)
    expected = core_shapley(model, model.layer4, x, [ClassifierOutputTarget(6)] * 2, **SETTINGS)
    torch.testing.assert_close(attributions, expected.float(), atol=1e-6, rtol=1e-5)


class Scaled(nn.Module):
    """A classifier taking extra arguments: per-example scales (batched) and a shared offset."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, scale, offset):
        return self.net(x) * scale[:, None] + offset


@pytest.mark.parametrize("as_module", [True, False], ids=["module", "callable"])
def test_additional_forward_args_follow_their_examples(resnet, as_module):
    """The logit times a per-example scale plus an offset: the Shapley values scale, the offset cancels."""
    model, x = resnet
    scaled = Scaled(model).eval()
    forward_func = scaled if as_module else (lambda inputs, scale, offset: scaled(inputs, scale, offset))
    scale = torch.tensor([2.0, -3.0])
    attributions, delta = LayerShapCAM(forward_func, model.layer4, **SETTINGS).attribute(
        x, target=[0, 9], additional_forward_args=(scale, 0.5), return_convergence_delta=True)
    plain = LayerShapCAM(model, model.layer4, **SETTINGS).attribute(x, target=[0, 9])
    torch.testing.assert_close(attributions, plain * scale.view(2, 1, 1, 1), atol=1e-6, rtol=1e-5)
    assert delta.abs().max() < 1e-5
    single = LayerShapCAM(forward_func, model.layer4, **SETTINGS).attribute(
        x[1:], target=9, additional_forward_args=(scale[1:], 0.5))
    torch.testing.assert_close(single, attributions[1:], atol=1e-6, rtol=1e-5)


class Summed(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, a, b):
        return self.net(a + b)


def test_several_input_tensors(resnet):
    model, x = resnet
    summed = Summed(model).eval()
    attributions = LayerShapCAM(summed, model.layer4, **SETTINGS).attribute((x / 2, x / 2), target=3)
    expected = LayerShapCAM(model, model.layer4, **SETTINGS).attribute(x, target=3)
    torch.testing.assert_close(attributions, expected, atol=1e-6, rtol=1e-5)


def test_unbatched_tensor_argument_is_refused(resnet):
    model, x = resnet
    with pytest.raises(ValueError, match="batch dimension 0"):
        LayerShapCAM(Scaled(model).eval(), model.layer4, **SETTINGS).attribute(
            x, target=0, additional_forward_args=(torch.ones(3), 0.0))


class Channels(nn.Module):
    def forward(self, x):
        return x.permute(0, 3, 1, 2)


def test_integer_inputs_give_the_default_float_dtype():
    """Token ids into an embedding: the map takes the default float dtype, not the ids' int64."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1)
    model = nn.Sequential(nn.Embedding(16, 3), Channels(), conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    ids = torch.randint(0, 16, (2, 3, 3))
    attributions, delta = LayerShapCAM(model.eval(), conv, **SETTINGS).attribute(
        ids, target=2, return_convergence_delta=True)
    assert attributions.dtype == delta.dtype == torch.float32 and attributions.shape == (2, 1, 3, 3)
    assert delta.abs().max() < 1e-6


@pytest.mark.parametrize("group_size", [2, 3])
def test_grouped_players_sum_to_the_score_gain(resnet, group_size):
    """Issue 9 item 6: the map of g x g players sums to f(x) - f(baseline), and the delta says so."""
    model, x = resnet
    attributions, delta = LayerShapCAM(model, model.layer3, group_size=group_size, **SETTINGS).attribute(
        x, target=2, return_convergence_delta=True)
    gain = score_gain(model, model.layer3, x, 2)
    torch.testing.assert_close(attributions.double().sum((1, 2, 3)), gain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(delta.double(), attributions.double().sum((1, 2, 3)) - gain, atol=1e-6, rtol=0)
    assert delta.abs().max() < 1e-5
    # Each player's value is shared equally by the cells it covers (4x4 map: 3x3 players are cut at the edge).
    players = ShapCAM(model, [model.layer3], group_size=group_size, **SETTINGS).explain(
        x, [ClassifierOutputTarget(2)] * 2)
    for attribution, player in zip(attributions[:, 0].double(), players, strict=True):
        for i in range(player.shapley.shape[0]):
            for j in range(player.shapley.shape[1]):
                cells = attribution[i * group_size:(i + 1) * group_size, j * group_size:(j + 1) * group_size]
                torch.testing.assert_close(cells, torch.full_like(cells, player.shapley[i, j] / cells.numel()),
                                           atol=1e-6, rtol=1e-5)


def test_signature_is_captums_layer_gradcam():
    """Every parameter of Captum's LayerGradCam, at its position and with its default, so code
    written for it (keywords or positions) runs on LayerShapCAM."""
    for method in ("__init__", "attribute"):
        theirs = list(inspect.signature(getattr(LayerGradCam, method)).parameters.values())
        ours = list(inspect.signature(getattr(LayerShapCAM, method)).parameters.values())[:len(theirs)]
        assert [(p.name, p.default) for p in ours] == [(p.name, p.default) for p in theirs], method


def test_captums_noise_tunnel_passes_the_deltas_through(resnet):
    """NoiseTunnel asks has_convergence_delta() and calls attribute.__wrapped__; with zero noise
    its samples are the inputs themselves."""
    model, x = resnet
    explainer = LayerShapCAM(model, model.layer4, **SETTINGS)
    assert explainer.has_convergence_delta()
    attributions, delta = explainer.attribute(x, target=5, return_convergence_delta=True)
    smoothed, deltas = NoiseTunnel(explainer).attribute(x, nt_samples=2, stdevs=0.0, target=5,
                                                        return_convergence_delta=True)
    torch.testing.assert_close(smoothed, attributions)
    torch.testing.assert_close(deltas, delta.repeat_interleave(2), atol=1e-6, rtol=0)


def test_relu_attributions_clamp_the_signed_map(resnet):
    model, x = resnet
    signed = LayerShapCAM(model, model.layer4, **SETTINGS).attribute(x, 5)
    assert (signed < 0).any()
    relu = LayerShapCAM(model, model.layer4, **SETTINGS).attribute(x, 5, relu_attributions=True)
    assert torch.equal(relu, signed.clamp_min(0))


@pytest.mark.parametrize("as_module", [True, False], ids=["module", "callable"])
def test_attribute_to_layer_input(resnet, as_module):
    """ResNet calls layer4 on layer3's output: the players at layer4's input are layer3's positions."""
    model, x = resnet
    forward_func = model if as_module else (lambda inputs: model(inputs))
    with nullcontext() if as_module else pytest.warns(UserWarning, match="hook path"):
        at_input = LayerShapCAM(forward_func, model.layer4, **SETTINGS).attribute(
            x, 5, attribute_to_layer_input=True)
    with nullcontext() if as_module else pytest.warns(UserWarning, match="hook path"):
        at_output = LayerShapCAM(forward_func, model.layer3, **SETTINGS).attribute(x, 5)
    assert at_input.shape == LayerGradCam(model, model.layer4).attribute(x, 5, attribute_to_layer_input=True).shape
    assert torch.equal(at_input, at_output)


@pytest.mark.parametrize("setting,message", [
    (dict(attr_dim_summation=False), "attr_dim_summation"), (dict(grad_kwargs={"retain_graph": True}), "grad_kwargs"),
])
def test_captum_settings_without_a_meaning_here_are_refused(resnet, setting, message):
    model, x = resnet
    with pytest.raises(ValueError, match=message):
        LayerShapCAM(model, model.layer4, **SETTINGS).attribute(x, 5, **setting)
    with pytest.raises(ValueError, match=r"device_ids.*\.module"):
        LayerShapCAM(model, model.layer4, [0, 1])
