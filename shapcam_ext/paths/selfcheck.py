"""The self-check: a fast path must agree with the head before it is taken.

It runs the evaluator that will run (its ``accumulate``, compiled kernels included) on one probe
permutation, a checkerboard order, into a scratch estimate. Along one permutation the marginal
contributions telescope: the sum of the first t players' contributions is v(first t) - v(empty).
The head itself scores the empty, the checkerboard and the full coalition, and the two must agree
within the rounding bound of :mod:`shapcam_ext.numerics` for these worths, which scales with the
head's own logits, so that a real difference can never pass as rounding.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import fx, nn

from shapcam_ext import numerics
from shapcam_ext.game import Game
from shapcam_ext.paths.protocol import Evaluator
from shapcam_ext.statistics import RunningEstimate
from shapcam_ext.targets import class_targets


def probe_permutation(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """(1, n) the checkerboard order (black cells first), and how many cells are black."""
    cells = torch.arange(h * w, device=device)
    black = (cells // w + cells % w) % 2 == 0
    return torch.cat([cells[black], cells[~black]])[None], int(black.sum())


@torch.no_grad()  # a check, never part of a differentiable map's graph
def disagreement(evaluator: Evaluator, game: Game, head: fx.GraphModule) -> Optional[str]:
    """None when ``evaluator`` agrees with ``head`` on the probe coalitions; else what differs."""
    h, w = game.players.shape[-2:]
    n = game.n
    probe, black = probe_permutation(h, w, game.device)
    scratch = RunningEstimate(game.batch, n, 1, game.device)
    evaluator.accumulate(probe, scratch)
    along = scratch.total[:, probe[0]].cumsum(1)  # (B, n): v(first t + 1) - v(empty)
    fast = along[:, [black - 1, n - 1]]

    ranks = torch.empty_like(probe[0])
    ranks[probe[0]] = torch.arange(n, device=game.device)
    keep = (ranks < torch.tensor([0, black, n], device=game.device)[:, None]).view(3, 1, h, w)
    masked = torch.where(keep, game.players[:, None], game.base_map()[:, None]).flatten(0, 1)
    projection = _last_projection(head)
    sums = numerics.head_sums(head, n)
    if projection is None:
        worths = game.worth(masked).double()
        value_error = _output_scale(worths) * sum(numerics.gamma_likely(s, game.players.dtype) for s in sums)
    else:
        with numerics.LogitScale(projection) as scale:
            worths = game.worth(masked).double()
        # per image: the tolerance scales with that image's own worths
        value_error = scale.value_errors(sums, _target_kind(game)).to(worths).view(game.batch, -1).amax(1, True)
    generic = worths[:, 1:] - worths[:, :1]
    # each side differences two worths; the float64 sums along the order add their own rounding
    bound = 4 * value_error + 2 * numerics.gamma(2 * n, torch.float64) * scratch.total.abs().sum(1, True)
    excess = (fast - generic).abs() - bound
    if bool((excess <= 0).all()):
        return None
    worst = int(excess.flatten().argmax())
    return (f"differs from the head by {float((fast - generic).abs().flatten()[worst]):.3g} on a probe coalition, "
            f"beyond its rounding bound {float(bound.expand_as(fast).flatten()[worst]):.3g}")


def _last_projection(head: fx.GraphModule) -> Optional[nn.Module]:
    """The head's last Linear (else its last convolution): the layer producing the logits."""
    modules = [head.get_submodule(node.target) for node in head.graph.nodes if node.op == "call_module"]
    for kinds in ((nn.Linear,), (nn.modules.conv._ConvNd,)):
        found = [m for m in modules if isinstance(m, kinds)]
        if found:
            return found[-1]
    return None


def _target_kind(game: Game) -> Union[str, float]:
    """How the worth depends on the logits: a softmax probability, a logit, or (any other target)
    assumed 1-Lipschitz in them."""
    classes = class_targets(game.targets)
    if classes is None:
        return 1.0
    return "softmax" if classes[0].softmax else "logit"


def _output_scale(worths: torch.Tensor) -> torch.Tensor:
    """Without a projection to record, each image's worths' own magnitude stands for its logits' scale."""
    return worths.abs().amax(1, True)


__all__ = ["disagreement", "probe_permutation"]
