"""The players: how a target activation becomes a grid of players and back.

A CNN activation (B, C, h, w) is already a grid of h*w positions. A ViT token tensor goes
through the user's ``reshape_transform`` (pytorch-grad-cam's convention, tokens to a grid);
since that transform only rearranges tokens, pushing token *indices* through it tells which
token each grid cell is, and masked grids are written back into the token tensor. Tokens the
transform drops (a class token) are never masked. Grouping fuses g x g cells into one player
with pixel_unshuffle, so the masking op sees a coarser grid with g*g times the channels.

A layer whose output is a structure of maps (a dict or tuple, e.g. the levels of an FPN) goes
through the ``reshape_transform`` too, but that transform may resize the maps (pytorch-grad-cam's
``fasterrcnn_reshape_transform`` interpolates every level to the coarsest), so grids cannot be
written back element by element: see :class:`MapStructure`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten


class PlayerGrid:
    """Maps an activation to its (B, C*g*g, H, W) player grid, and masked grids back."""

    def __init__(self, activation: torch.Tensor, reshape_transform: Optional[Callable] = None, group_size: int = 1):
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.activation = activation
        self.group_size = group_size
        self.token_index = None
        self.structure = None
        if not isinstance(activation, torch.Tensor):
            if reshape_transform is None:
                raise ValueError(
                    f"the target layer's output is a {type(activation).__name__}, not a (B, C, h, w) tensor; pass "
                    "reshape_transform= to turn it into a grid (e.g. pytorch-grad-cam's fasterrcnn_reshape_transform)"
                )
            self.structure = MapStructure(activation, reshape_transform(activation))
            grid = self.structure.presence
        elif reshape_transform is not None:
            grid = reshape_transform(activation)
            self.token_index = _token_index(activation, reshape_transform, grid)
        elif activation.dim() == 4:
            grid = activation
        else:
            raise ValueError(
                f"the target layer's output has shape {tuple(activation.shape)}, not (B, C, h, w); pass "
                "reshape_transform= to turn it into a grid (e.g. ViT tokens -> (B, C, h, w))"
            )
        self.grid_shape = grid.shape[1:]  # (C, h, w)
        h, w = grid.shape[-2:]
        self.padding = (0, -w % group_size, 0, -h % group_size)
        self.players = self.to_players(grid)

    def to_players(self, grid: torch.Tensor) -> torch.Tensor:
        if self.group_size == 1:
            return grid
        return F.pixel_unshuffle(F.pad(grid, self.padding), self.group_size)

    def baseline(self, baseline) -> torch.Tensor:
        """The baseline in player layout: a scalar stays a scalar, a tensor is broadcast to the grid.
        For a structure of maps, the players are presences and a removed one is 0; the baseline
        (a scalar) fills the maps' removed elements."""
        base = torch.as_tensor(baseline, dtype=self.players.dtype, device=self.players.device)
        if self.structure is not None:
            return self.structure.set_fill(base)
        if base.dim() == 0:
            return base
        try:
            grid = base.expand((self.players.shape[0],) + tuple(self.grid_shape))
        except RuntimeError as err:
            raise ValueError(
                f"baseline of shape {tuple(base.shape)} does not broadcast to the target grid "
                f"{tuple(self.grid_shape)}; pass a scalar or a (C, h, w)-broadcastable tensor"
            ) from err
        return self.to_players(grid.contiguous())

    def head_input(self, players: torch.Tensor, images: slice) -> torch.Tensor:
        """The head's input for masked player grids of the images in ``images``, image-major."""
        grid = players
        if self.group_size > 1:
            grid = F.pixel_shuffle(players, self.group_size)[..., : self.grid_shape[-2], : self.grid_shape[-1]]
        if self.structure is not None:
            return self.structure.assemble(grid, images)
        if self.token_index is None:
            return grid
        source = self.activation[images]
        per_image = grid.shape[0] // source.shape[0]
        tokens = source.repeat_interleave(per_image, 0).flatten(1)
        tokens[:, self.token_index] = grid.reshape(grid.shape[0], -1)
        return tokens.view((-1,) + tuple(source.shape[1:]))

    def position_owners(self, channels_last: bool) -> Optional[torch.Tensor]:
        """(positions,) the player whose grid cells each position of the activation holds (its
        dimensions but the batch and the channels, the last dimension or the second, flattened in
        row-major order): -1 for a position no player holds (a class token the reshape_transform
        drops; it keeps its value in every coalition), -2 for one the cells of several players
        share; None for a structure of maps, which has no one activation."""
        if self.structure is not None:
            return None
        one = self.activation[0]
        channels = one.shape[-1 if channels_last else 0]
        positions = one.numel() // channels
        index = self.token_index if self.token_index is not None else torch.arange(one.numel(), device=one.device)
        position = index // channels if channels_last else index % positions
        c, h, w = self.grid_shape
        g = self.group_size
        cells = torch.arange(h * w, device=one.device)
        player = ((cells // w // g) * -(-w // g) + cells % w // g).repeat(c)  # grid elements are (C, h, w)
        players = self.players.shape[-2] * self.players.shape[-1]
        low = torch.full((positions,), players, device=one.device).scatter_reduce(0, position, player, "amin")
        high = torch.full((positions,), -1, device=one.device).scatter_reduce(0, position, player, "amax")
        return torch.where((high >= 0) & (low != high), -2, high)

    def player_positions(self, channels_last: bool) -> Optional[torch.Tensor]:
        """(players,) the position of the activation that holds each player's elements (see
        :meth:`position_owners`); None unless every player fills one position of its own (a group
        of g x g cells spans several)."""
        owner = self.position_owners(channels_last)
        held = None if owner is None else (owner >= 0).nonzero().flatten()
        if held is None or bool((owner == -2).any()) or not torch.equal(
                owner[held].sort().values, torch.arange(len(held), device=owner.device)):
            return None
        positions = torch.empty_like(held)
        positions[owner[held]] = held
        return positions

    def positions_are_players(self, channels_last: bool) -> bool:
        """Whether the activation's positions are the players, position p being player p (a CNN's map)."""
        owner = self.position_owners(channels_last)
        return owner is not None and torch.equal(owner, torch.arange(len(owner), device=owner.device))

    def to_map(self, values: torch.Tensor) -> torch.Tensor:
        """Per-player values (..., H, W) spread over the feature grid (..., h, w): each position holds
        an equal share of its player's value (a group cut by the grid's edge shares it among the
        positions it covers), so the map sums to the players' total."""
        if self.group_size == 1:
            return values
        g = self.group_size
        h, w = self.grid_shape[-2:]
        full = values.repeat_interleave(g, -2).repeat_interleave(g, -1)[..., :h, :w]
        shares = _positions_per_player(h, g)[:, None] * _positions_per_player(w, g)[None, :]
        return full / shares.to(full.device)  # a differentiable map stays on the model's device


class MapStructure:
    """A layer output that is a structure of (B, C, H, W) maps, its players and their write-back.

    The players are the cells of the (h, w) grid the ``reshape_transform`` makes of the
    structure, and each element of each map belongs to the cell it falls in when the map is
    scaled to the grid (nearest neighbour: the maps are views of one image at several
    resolutions). Removing a player puts the baseline in its elements of every map. The engine
    masks a grid of presences (1 kept, 0 removed), from which :meth:`assemble` builds the
    structure the head consumes; an image whose maps hold NaN or Inf gets NaN presences, so the
    engine fails that image alone.
    """

    def __init__(self, activation, grid: torch.Tensor):
        self.maps, self.spec = tree_flatten(activation)
        if grid.dim() != 4:
            raise ValueError(f"reshape_transform must return (B, C, h, w), got shape {tuple(grid.shape)}")
        batch = grid.shape[0]
        for m in self.maps:
            if not isinstance(m, torch.Tensor) or m.dim() != 4 or m.shape[0] != batch:
                described = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
                raise ValueError(f"the target layer's output holds {described}; Shap-CAM masks a structure only "
                                 f"when each of its elements is a ({batch}, C, H, W) map")
        finite = torch.stack([torch.isfinite(m.flatten(1)).all(1) for m in self.maps]).all(0)
        presence = torch.ones((batch, 1) + tuple(grid.shape[-2:]), dtype=grid.dtype, device=grid.device)
        self.presence = presence.masked_fill(~finite.view(batch, 1, 1, 1), float("nan"))
        self.fill = torch.zeros((), dtype=grid.dtype, device=grid.device)

    def set_fill(self, baseline: torch.Tensor) -> torch.Tensor:
        """Keeps the value of removed elements; returns the value of a removed presence (0).

        Raises:
            ValueError: a tensor baseline, which has no place in maps of other sizes.
        """
        if baseline.dim():
            raise ValueError("a structure of maps takes a scalar baseline (its maps differ in size); pass a number")
        self.fill = baseline
        return torch.zeros_like(baseline)

    def assemble(self, presence: torch.Tensor, images: slice):
        """The structure for presence grids (N, 1, h, w) of the images ``images``, image-major."""
        per_image = presence.shape[0] // (images.stop - images.start)
        maps = []
        for m in self.maps:
            keep = F.interpolate(presence, size=m.shape[-2:], mode="nearest") > 0.5
            maps.append(torch.where(keep, m[images].repeat_interleave(per_image, 0), self.fill.to(m.dtype)))
        return tree_unflatten(maps, self.spec)


def _positions_per_player(size: int, group_size: int) -> torch.Tensor:
    """Along one axis: how many positions the player covering each position spans (fewer at the edge)."""
    return (size - torch.arange(size) // group_size * group_size).clamp(max=group_size)


def _token_index(activation: torch.Tensor, reshape_transform: Callable, grid: torch.Tensor) -> torch.Tensor:
    """Flat index into one image's activation of every grid element (C*h*w,)."""
    if grid.dim() != 4:
        raise ValueError(f"reshape_transform must return (B, C, h, w), got shape {tuple(grid.shape)}")
    one = activation[:1]
    probe = torch.arange(one.numel(), dtype=torch.float64, device=activation.device).view(one.shape)
    index = reshape_transform(probe).reshape(-1)
    if index.numel() != grid[0].numel() or not torch.equal(index, index.round()) or index.unique().numel() != index.numel():
        raise ValueError(
            "reshape_transform must only rearrange (permute/reshape/slice) the activation's elements; "
            "Shap-CAM masks grid cells by writing them back into the tokens"
        )
    return index.long()
