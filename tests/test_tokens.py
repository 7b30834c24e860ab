"""Per-token heads (issue 16.2): a transformer cut where its tokens meet only in the pool before
the classifier (Swin and ViT at the last block's norm2, a Swin block's output) takes the pooled
walks: exact against the generic path on the same permutations and against exact enumeration;
what the graph or the run time cannot prove falls back, with the reason at DEBUG."""
from __future__ import annotations

import logging
import math
import warnings

import pytest
import timm
import torch
from torch import nn

import numerics
from exact import exact_shapley
from shapcam_ext import ShapCAM
from shapcam_ext.head import split_model
from shapcam_ext.paths import prove
from shapcam_ext.targets import ClassifierOutputSoftmaxTarget, ClassTarget
from test_fastpath import assert_same_maps, both_paths


def tiny(kind: str, side: int, global_pool: str = "avg") -> nn.Module:
    """A random-weight Swin-T or ViT whose last map is side x side tokens (2 x 2 or 3 x 3).

    timm initialises Linear weights with std 0.02, which leaves the MLP branches and the logits
    near zero; unit-variance weights make the tokens matter and the logits O(1).
    """
    torch.manual_seed(0)
    if kind == "swin":
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=4 * side,
                                  patch_size=2, window_size=side, embed_dim=8, depths=(1, 1), num_heads=(1, 2),
                                  num_classes=5)
    else:
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=4 * side, patch_size=4,
                                  embed_dim=8, depth=2, num_heads=2, num_classes=5, global_pool=global_pool)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features ** -0.5)
            if module.bias is not None:
                nn.init.normal_(module.bias, std=0.1)
    return model.eval()


def to_grid(prefix_tokens: int = 0):
    """pytorch-grad-cam's reshape_transform for tokens (B, N, C) or (B, h, w, C): drops the prefix
    tokens (a class token), makes the square grid (B, C, h, w) (FACTS.md: Swin's (B, 49, C))."""
    def transform(tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens[:, prefix_tokens:] if tokens.dim() == 3 else tokens
        b, c = tokens.shape[0], tokens.shape[-1]
        side = math.isqrt(tokens[0].numel() // c)
        return tokens.reshape(b, side, side, c).permute(0, 3, 1, 2)

    return transform


# (model, pool, layer, tokens before the grid, path): (B, N, C) tokens at norm2, (B, h, w, C) after a Swin block
CUTS = [
    ("swin", "avg", "layers.1.blocks.0.norm2", 0, "pooled-linear"),  # MLP, + held, reshape to (B, h, w, C), norm, mean
    ("swin", "avg", "layers.1.blocks.0", 0, "pooled-linear"),  # (B, h, w, C): norm, mean over (1, 2)
    ("vit", "avg", "blocks.1.norm2", 1, "pooled"),  # MLP, + held, x[:, 1:].mean(1), fc_norm (a layer norm), head
    ("vit", "token", "blocks.1.norm2", 1, "pooled-linear"),  # x[:, 0]: the patch tokens are null players
]
IDS = [f"{kind}-{pool}-{layer}" for kind, pool, layer, _, _ in CUTS]


@pytest.mark.parametrize("kind,pool,layer,prefix,path", CUTS, ids=IDS)
def test_token_walks_equal_the_generic_path(kind, pool, layer, prefix, path):
    model = tiny(kind, 3, pool)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fast path may fail its self-check
        fast, generic, scale = both_paths(model, layer, x, [ClassTarget(1), ClassTarget(3)],
                                          reshape_transform=to_grid(prefix))
    assert [r.path for r in fast] == [path, path]
    value_error = numerics.model_value_error(scale, model, layer, 9)
    assert_same_maps(fast, generic, value_error)
    if pool == "token":
        # only the class token's output reaches the classifier: every patch token is a null player
        assert all(bool((r.shapley == 0).all()) and bool((r.std_error == 0).all()) for r in fast)
    else:  # a map far above the rounding bound, so that a token walked in the wrong place would show
        assert float(generic[0].shapley.abs().max()) > 100 * 2 * numerics.map_error(value_error)


def masked_worth(model: nn.Module, layer: str, x: torch.Tensor, prefix: int, category: int):
    """The worth of coalitions of the tokens at ``layer``, by the model itself: a forward hook zeroes
    the grid tokens outside the coalition (independent of the engine's split and masking)."""
    module = model.get_submodule(layer)

    def worth(members: torch.Tensor) -> torch.Tensor:
        def mask(_module, _inputs, output):
            keep = members.view(members.shape[0], *([1] * (output.dim() - 3)), -1, 1)
            if output.dim() == 4:  # (B, h, w, C)
                keep = members.view(members.shape[0], *output.shape[1:3], 1)
            kept = torch.where(keep, output[:, prefix:] if output.dim() == 3 else output, 0.0)
            return torch.cat([output[:, :prefix], kept], 1) if output.dim() == 3 else kept

        handle = module.register_forward_hook(mask)
        try:
            return model(x.expand(members.shape[0], -1, -1, -1)).softmax(-1)[:, category]
        finally:
            handle.remove()

    return worth


@pytest.mark.parametrize("kind,pool,layer,prefix,path", CUTS, ids=IDS)
def test_token_walks_match_exact_enumeration(kind, pool, layer, prefix, path):
    model = tiny(kind, 2, pool)
    torch.manual_seed(2)
    x = torch.randn(1, 3, 8, 8)
    with numerics.LogitScale(numerics.final_linear(model)) as scale, torch.no_grad():
        result = ShapCAM(model, [layer], to_grid(prefix), exact=True).explain(x, [ClassifierOutputSoftmaxTarget(2)])[0]
        expected = exact_shapley(masked_worth(model, layer, x, prefix, 2), 4)
    assert result.path == path
    # each side within map_error of the exact values
    value_error = numerics.model_value_error(scale, model, layer, 4)
    numerics.assert_within(result.shapley.flatten(), expected, 2 * numerics.map_error(value_error),
                           f"the {path} walk against exact enumeration")


class TokenMixer(nn.Module):
    """Mixes the tokens (B, N, C) with a Linear over N before the pool, as an MLP-Mixer does."""

    def __init__(self, tokens: int, channels: int):
        super().__init__()
        self.mix, self.head = nn.Linear(tokens, tokens), nn.Linear(channels, 5)

    def forward(self, x):
        return self.head(self.mix(x.transpose(1, 2)).transpose(1, 2).mean(1))


class SplitTokens(nn.Module):
    """A reshape that halves the channels and doubles the tokens: (B, N, C) -> (B, 2N, C/2)."""

    def __init__(self, tokens: int, channels: int):
        super().__init__()
        self.shape = (2 * tokens, channels // 2)
        self.norm, self.head = nn.LayerNorm(channels // 2), nn.Linear(channels // 2, 5)

    def forward(self, x):
        return self.head(self.norm(x.reshape(-1, *self.shape)).mean(1))


class MeanOverRowsAndChannels(nn.Module):
    """A mean over dims (1, 3) of (B, h, w, C): over the rows and the channels. On 3 x 3 tokens of 3
    channels its output has the size of a pooled vector, though it is not one."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 5)

    def forward(self, x):
        return self.head(x.mean((1, 3)))


class Tokens(nn.Module):
    """(B, 3, 6, 6) -> 3 x 3 tokens by a patch embedding, (B, 9, C) or, with ``grid``, (B, 3, 3, C),
    marked by ``tokens`` (the cut), then ``head``."""

    def __init__(self, head: nn.Module, grid: bool = False, channels: int = 8):
        super().__init__()
        self.embed, self.tokens, self.head, self.grid = nn.Conv2d(3, channels, 2, 2), nn.Identity(), head, grid

    def forward(self, x):
        tokens = self.embed(x).permute(0, 2, 3, 1)
        return self.head(self.tokens(tokens if self.grid else tokens.flatten(1, 2)))


def test_unproven_token_heads_take_the_generic_path(caplog):
    # Swin's window attention at norm1 reads the activation's shape (and mixes a window)
    model = tiny("swin", 3)
    with caplog.at_level(logging.DEBUG, logger="shapcam_ext"):
        result = ShapCAM(model, ["layers.1.blocks.0.norm1"], to_grid(), n_permutations=2).explain(
            torch.randn(1, 3, 12, 12))[0]
    assert result.path == "generic"
    assert "generic path (getattr" in caplog.text and "not a recognised position-wise op" in caplog.text
    pattern, why = prove(split_model(Tokens(TokenMixer(9, 8)).eval(), "tokens"))
    assert pattern is None and "transpose" in why


@pytest.mark.parametrize("model", [Tokens(SplitTokens(9, 8)), Tokens(MeanOverRowsAndChannels(), True, 3)],
                         ids=["reshape-into-tokens", "mean-over-a-channel"])
def test_what_only_run_time_shows_falls_back(model, caplog):
    """Proven on the graph, whose sizes it does not know; the recorded values show the positions
    do not line up (a reshape that moves channels into the tokens, a mean over a channel
    dimension), so no walk is built. Without these checks the self-check would warn instead."""
    model.eval()
    pattern, why = prove(split_model(model, "tokens"))
    assert pattern is not None, why
    with warnings.catch_warnings(), caplog.at_level(logging.DEBUG, logger="shapcam_ext"):
        warnings.simplefilter("error")
        result = ShapCAM(model, ["tokens"], to_grid(), n_permutations=2).explain(torch.randn(1, 3, 6, 6))[0]
    assert result.path == "generic"
    assert "runtime shape does not fit" in caplog.text


def test_players_that_are_not_tokens_take_the_generic_path(caplog):
    """A reshape_transform that reshapes (B, N, C) to (B, C, h, w) without moving the channels last
    spreads each grid cell over several tokens: the per-token walk does not apply."""
    model = tiny("swin", 3)
    x = torch.randn(1, 3, 12, 12)

    def scrambled(tokens):
        return tokens.reshape(tokens.shape[0], tokens.shape[-1], 3, 3)

    with warnings.catch_warnings(), caplog.at_level(logging.DEBUG, logger="shapcam_ext"):
        warnings.simplefilter("error")
        result = ShapCAM(model, ["layers.1.blocks.0.norm2"], scrambled, n_permutations=2).explain(x)[0]
    assert result.path == "generic"
    assert "runtime shape does not fit" in caplog.text
