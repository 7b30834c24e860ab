"""The class-token walk of ViT heads cut at a block's norm1: exact against the generic path on the
same permutations and against exact enumeration; refused, with the reason logged, where not proven."""
from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer

import numerics
from exact import exact_shapley
from shapcam_ext import ShapCAM
from shapcam_ext.paths import token_attention
from shapcam_ext.targets import ClassTarget
from test_fastpath import assert_same_maps, both_paths

PATH = "class-token-attention"
LAYER = "blocks.1.norm1"


def tiny_vit(h: int = 3, w: int = 3, distilled: bool = False, **options) -> VisionTransformer:
    """timm's ViT (or DeiT's distilled one) on an h x w grid of 2 x 2 patches, 16 channels, two
    blocks, 5 classes; weights drawn at a scale where every part of the block matters (timm's
    initialisation leaves the attention nearly uniform and the logits nearly equal)."""
    torch.manual_seed(0)
    kind = VisionTransformerDistilled if distilled else VisionTransformer
    model = kind(img_size=(2 * h, 2 * w), patch_size=2, embed_dim=16, depth=2, num_heads=2, num_classes=5,
                 **options)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, param.shape[-1] ** -0.5 if param.dim() > 1 else 0.5)
    return model.eval()


def grid(h: int, w: int):
    """pytorch-grad-cam's ViT reshape_transform for an h x w patch grid after the prefix tokens
    (class, distillation, register tokens), which it drops."""
    return lambda t: t[:, -h * w:].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)


VARIANTS = {
    "vit": {},
    "no-qkv-bias": {"qkv_bias": False},
    "layer-scale": {"init_values": 0.5},
    "qk-norm": {"qk_norm": True},
    "registers": {"reg_tokens": 2},  # class token, two register tokens, then the patches
    "deit-distilled": {"distilled": True},  # two heads on the class and distillation tokens, averaged
}


def value_error(scale, model, players: int, target="softmax") -> float:
    return numerics.model_value_error(scale, model, LAYER, players, target)


@pytest.mark.parametrize("variant", VARIANTS)
def test_class_token_walk_equals_the_generic_path(variant):
    model = tiny_vit(**VARIANTS[variant])
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, 6)
    fast, generic, scale = both_paths(model, LAYER, x, reshape_transform=grid(3, 3))
    assert [r.path for r in fast] == [PATH, PATH]
    assert_same_maps(fast, generic, value_error(scale, model, 9))


def enumerated_worth(model, x, h: int, w: int, target):
    """Every coalition's worth from the model itself, with norm1's output of the absent players'
    tokens set to 0 by a hook (prefix tokens kept)."""
    norm1 = model.blocks[-1].norm1

    def worth(members):
        prefix = torch.ones(len(members), model.num_prefix_tokens, dtype=torch.bool)
        keep = torch.cat([prefix, members], 1)[..., None]
        handle = norm1.register_forward_hook(lambda module, inputs, out: torch.where(keep, out, 0.0))
        try:
            with torch.no_grad():
                out = model(x.expand(len(members), -1, -1, -1))
        finally:
            handle.remove()
        return torch.stack([target(row) for row in out])

    return worth


@pytest.mark.parametrize("variant", ["vit", "layer-scale", "qk-norm", "deit-distilled"])
@pytest.mark.parametrize("softmax", [True, False], ids=["softmax", "logit"])
def test_class_token_walk_matches_exact_enumeration(variant, softmax):
    model = tiny_vit(2, 3, **VARIANTS[variant]).double()  # float32 is held to the generic path above
    torch.manual_seed(2)
    x = torch.randn(1, 3, 4, 6, dtype=torch.float64)
    target = ClassTarget(3, softmax=softmax)
    with numerics.LogitScale(numerics.final_linear(model)) as scale:
        result = ShapCAM(model, [LAYER], grid(2, 3), exact=True).explain(x, [target])[0]
        expected = exact_shapley(enumerated_worth(model, x, 2, 3, target), 6)
    assert result.path == PATH
    # both exact: each within map_error of the exact values
    bound = 2 * numerics.map_error(value_error(scale, model, 6, "softmax" if softmax else "logit"))
    assert float(expected.abs().max()) > 100 * bound, "the map is too faint to tell a wrong walk from rounding"
    numerics.assert_within(result.shapley.flatten(), expected, bound, "the class-token walk against enumeration")


def test_grouped_players_and_a_tensor_baseline():
    """2 x 2 cells of a 4 x 4 token grid per player, removed tokens set to a per-channel value."""
    model = tiny_vit(4, 4)
    torch.manual_seed(3)
    x = torch.randn(2, 3, 8, 8)
    fast, generic, scale = both_paths(model, LAYER, x, reshape_transform=grid(4, 4), group_size=2,
                                      baseline=torch.randn(16, 1, 1))
    assert [r.path for r in fast] == [PATH, PATH] and fast[0].shapley.shape == (2, 2)
    assert_same_maps(fast, generic, value_error(scale, model, 4))


class PooledBlock(Block):
    """A custom block that adds every token's mean to each token: it mixes the tokens again."""

    def forward(self, x, attn_mask=None, is_causal=False):
        x = super().forward(x, attn_mask, is_causal)
        return x + x.mean(1, keepdim=True)


def every_token(t):
    """A reshape_transform that keeps the class token in the grid: 10 tokens as 2 x 5."""
    return t.reshape(t.shape[0], 2, 5, t.shape[2]).permute(0, 3, 1, 2)


def torchvision_vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=6, patch_size=2, num_layers=1, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=5).eval()


REFUSED = [  # (model, layer, reshape_transform, the reason logged)
    (lambda: tiny_vit(global_pool="avg"), LAYER, grid(3, 3), "other than by one token"),
    (tiny_vit, LAYER, every_token, "token 0, which the head reads after the attention (a class token), is a player"),
    (lambda: tiny_vit(block_fn=PooledBlock), LAYER, grid(3, 3), "mean at mean_1 is not a recognised token-wise op"),
    (tiny_vit, "blocks.0.norm1", grid(3, 3), "a second attention"),  # the last block attends again
    (torchvision_vit, "encoder.layers.encoder_layer_0.ln_1", grid(3, 3), "MultiheadAttention"),
]


@pytest.mark.parametrize("make,layer,transform,reason", REFUSED,
                         ids=["avg-pool", "class-token-player", "custom-block", "two-attentions", "torchvision"])
def test_heads_the_walk_cannot_follow_take_the_generic_path(make, layer, transform, reason, caplog):
    model = make()
    with caplog.at_level(logging.DEBUG, logger="shapcam_ext"):
        result = ShapCAM(model, [layer], transform, n_permutations=2).explain(torch.randn(1, 3, 6, 6))[0]
    assert result.path == "generic"
    assert any("generic path" in r.message and reason in r.message for r in caplog.records), caplog.text


def test_logits_out_of_range_for_one_shift_take_the_generic_path(caplog):
    """Queries and keys 100x larger: the class token's logits span hundreds, and some coalition's
    weights would all underflow under the one shift the walk gives every coalition."""
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[-1].attn.qkv.weight[:32] *= 100
    with caplog.at_level(logging.DEBUG, logger="shapcam_ext"):
        result = ShapCAM(model, [LAYER], grid(3, 3), n_permutations=2).explain(torch.randn(1, 3, 6, 6))[0]
    assert result.path == "generic" and "too wide a range" in caplog.text


def test_the_self_check_runs_the_walk(monkeypatch):
    """A walk that drifts from the head (here: 1% off) is caught by the check, which runs the very
    walk the run would, and the generic path takes over."""
    real = token_attention.ClassTokenWalk.values
    monkeypatch.setattr(token_attention.ClassTokenWalk, "values", lambda self, perms: real(self, perms) * 1.01)
    model = tiny_vit()
    with pytest.warns(RuntimeWarning, match=f"{PATH} path differs from the head"):
        result = ShapCAM(model, [LAYER], grid(3, 3), n_permutations=2).explain(torch.randn(1, 3, 6, 6))[0]
    assert result.path == "generic"


def test_the_walk_leaves_the_model_and_its_activations_untouched():
    model = tiny_vit(init_values=0.5)
    for block in model.blocks:
        block.ls1.inplace = block.ls2.inplace = True  # timm's in-place layer scale: x.mul_(gamma)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cam = ShapCAM(model, [LAYER], grid(3, 3), n_permutations=2)
    prepared = cam.prepare(torch.randn(1, 3, 6, 6))
    kept = [prepared.layers[0].activation.clone(), *(h.clone() for h in prepared.layers[0].held
                                                      if isinstance(h, torch.Tensor))]
    assert cam.estimate(prepared)[0].path == PATH
    now = [prepared.layers[0].activation, *(h for h in prepared.layers[0].held if isinstance(h, torch.Tensor))]
    assert all(torch.equal(a, b) for a, b in zip(kept, now))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_walk_is_differentiable():
    """create_graph=True: the walk's map is a differentiable function of the input (gradcheck in
    float64 at fixed permutations)."""
    model = tiny_vit(2, 2).double()
    cam = ShapCAM(model, [LAYER], grid(2, 2), n_permutations=4, seed=1)

    def maps(x):
        return torch.stack([r.shapley for r in cam.explain(x, [ClassTarget(1)], create_graph=True)])

    torch.manual_seed(4)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert cam.explain(x, [ClassTarget(1)], create_graph=True)[0].path == PATH
    assert torch.autograd.gradcheck(maps, (x,), fast_mode=True)
