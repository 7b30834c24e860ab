"""The class-token walk: exact worths of ViT token coalitions from the attention of the class token.

Cut at a block's ``norm1`` (proven by :mod:`.token_pattern`), the head reads the tokens only through
the attention of a few query tokens that are never players (the class token; DeiT's distillation
token). A coalition changes only which tokens show those queries their real key and value and
which their baseline's, so every prefix of every permutation is worth what follows from:

* every token's key and value in both states, and the selected tokens' queries: the attention's
  inputs computed once on the activation and once on the empty coalition;
* each selected query's weights exp(logit - max) of the 2N keys, and the 2N values scaled by
  them: then a prefix's attention output is a ratio of two sums over the N keys and values it
  holds, one product of its 0/1 holdings with that table, for every head at once;
* the rest of the head (projection, residual, MLP, final norm, classifier) on the selected tokens
  only, batched over every prefix of a round, where the head runs the block on all N tokens.

The sums hold each prefix's terms afresh rather than updating running sums step by step: those
would subtract the terms of tokens that leave the baseline state, and cancel digits the head
never loses. The denominators sum positive terms, as the head's softmax does; the one shift for
every prefix is safe while no coalition's weights all underflow, which is checked. On ViT-S the
attention is a tenth of a step's flops; the MLP of the class token is most of the rest.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import fx

from shapcam_ext.game import Game
from shapcam_ext.head import expand_held
from shapcam_ext.memory import cost_per_unit
from shapcam_ext.numerics import opmath, unit_roundoff
from shapcam_ext.ops import permutation_ranks
from shapcam_ext.paths.protocol import Evaluator
from shapcam_ext.paths.token_pattern import ClassTokenPattern


class ClassTokenWalk(Evaluator):
    """Worth of every prefix from the selected tokens' attention over each token's two states.

    rest: the head after the attention (:class:`ClassTokenPattern`). owner: (N,) the player each
    token belongs to, -1 for tokens that are always real.
    table: (B, 2N, *heads, S, d + 1): each token's weight times its value (d columns), then its weight,
        for its real key and value (rows 0..N-1), then its baseline's.
    tokens, held: the activation's selected tokens and the held values the rest reads, sliced to them.
    """

    path = "class-token-attention"

    def __init__(self, game: Game, rest: fx.GraphModule, owner: torch.Tensor, table: torch.Tensor,
                 tokens: torch.Tensor, held: tuple):
        super().__init__(game, 0)
        self.rest, self.owner, self.table, self.tokens, self.held = rest, owner, table, tokens, held
        identity = torch.arange(game.n, device=game.device).expand(2, game.n)
        self.bytes_per_permutation = cost_per_unit(lambda k: lambda: self.values(identity[:k]))[1]

    def values(self, perms: torch.Tensor) -> torch.Tensor:
        g = self.game
        b, k, n = g.batch, perms.shape[0], g.n
        rows = k * (n + 1)
        ranks = permutation_ranks(perms)
        joins = torch.where(self.owner >= 0, ranks[:, self.owner.clamp(min=0)], -1)  # (K, N): step a token turns real
        real = joins[:, None, :] < torch.arange(n + 1, device=perms.device)[:, None]  # (K, n + 1, N)
        holds = torch.cat([real, ~real], -1).view(rows, -1).to(self.table.dtype)
        sums = (holds @ self.table.flatten(2)).view((b * rows,) + self.table.shape[2:])
        attention = (sums[..., :-1] / sums[..., -1:]).to(self.tokens.dtype)  # (B rows, *heads, S, d)
        tokens, *held = expand_held((self.tokens, *self.held), b * rows)
        out = self.rest(tokens, attention, *held)
        return g.scorer(g.targets, out, rows).view(b, k, n + 1)


def class_token_walk(game: Game, pattern: ClassTokenPattern) -> Union[ClassTokenWalk, str]:
    """The walk of the game, or why it cannot play it (its tokens, held values, attention flags,
    or attention weights that underflow)."""
    activation = game.grid.activation
    if game.grid.token_index is None or activation.dim() != 3:
        return "the target layer's output is not (B, tokens, C) tokens mapped to a grid by a reshape_transform"
    owner = game.grid.position_owners(channels_last=True)
    reason = _refusal(game, pattern, owner)
    if reason is not None:
        return reason
    held = game.held
    tokens = game.grid.head_input(game.players, game.images)
    empty = game.grid.head_input(game.base_map(), game.images)
    queries_held = [held[i] for i in pattern.queries_held]
    q, k_real, v_real = pattern.queries(tokens, *queries_held)
    _, k_base, v_base = pattern.queries(empty, *queries_held)
    selected = [i % tokens.shape[1] for i in pattern.selected]
    dtype = opmath(q.dtype)
    scale = pattern.scale if pattern.scale is not None else q.shape[-1] ** -0.5
    keys = torch.cat([k_real, k_base], -2).to(dtype)
    logits = q[..., selected, :].to(dtype) @ keys.transpose(-2, -1) * scale  # (B, *heads, S, 2N)
    weights = (logits - logits.amax(-1, keepdim=True)).exp()
    # The smallest sum of weights a coalition can hold: each token's smaller one. Terms below the
    # dtype's normal range lose their digits, so every sum must stay far enough above it.
    n_tokens = tokens.shape[1]
    floor = torch.minimum(weights[..., :n_tokens], weights[..., n_tokens:]).amax(-1)
    if bool((floor < torch.finfo(dtype).tiny / unit_roundoff(dtype)).any()):
        return "the attention's logits span too wide a range for one shift of every coalition's softmax"
    values = torch.cat([v_real, v_base], -2).to(dtype)[..., None, :, :]  # (B, *heads, 1, 2N, d)
    table = torch.cat([weights[..., None] * values, weights[..., None]], -1).movedim(-2, 1).contiguous()
    return ClassTokenWalk(game, pattern.rest, owner, table, tokens[:, selected],
                          tuple(held[i][:, selected] for i in pattern.rest_held))


def _refusal(game: Game, pattern: ClassTokenPattern, owner: torch.Tensor) -> Optional[str]:
    """Why the walk cannot play the game's tokens and held values, or None."""
    if bool((owner == -2).any()):
        return "the reshape_transform puts the cells of several players in one token"
    activation = game.grid.activation
    tokens = activation.shape[1]
    for i in pattern.selected:
        if not -tokens <= i < tokens:
            return f"the head reads token {i} of {tokens}"
        if int(owner[i % tokens]) >= 0:
            return (f"token {i % tokens}, which the head reads after the attention (a class token), is a player: "
                    "the reshape_transform keeps it in the grid")
    for i in sorted(pattern.token_held):
        value = game.held[i]
        if not isinstance(value, torch.Tensor) or value.dim() != activation.dim() \
                or tuple(value.shape[:2]) != (game.batch, tokens):
            return f"held value {i} is not one value per token of each image"
    for i, needed, name in pattern.fixed:
        if game.held[i] is not needed:
            return f"the attention's {name} is {game.held[i]!r}, not {needed!r}"
    return None


__all__ = ["ClassTokenWalk", "class_token_walk"]
