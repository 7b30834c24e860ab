"""Every way of playing a game, behind one protocol, and the one function that picks among them.

* :mod:`.protocol`: the :class:`Evaluator` every path implements.
* :mod:`.generic`: the head on masked player grids; any head, any target.
* :mod:`.pattern`: the proofs, on the head's fx graph, that an exact shortcut applies.
* :mod:`.pooled` (with :mod:`.running`): heads that pool a position-wise body: walks of the
  pooled vector or of the logits (``ops.linear_walk_``).
* :mod:`.incremental` (with :mod:`.receptive`, :mod:`.recompute`, :mod:`.table`): heads that mix
  positions locally before a global pool: each step recomputes, or looks up, what it changes.
* :mod:`.token_attention` (with :mod:`.token_pattern`): ViT heads cut at a block's norm1 that read
  the tokens through a class token's attention: each step swaps one token's key and value.
* :mod:`.selfcheck`: a fast path runs only after agreeing with the head on probe coalitions.
* :mod:`.differentiable`: the differentiable sums a map's autograd graph is built from.

A new path is one Evaluator subclass and one line in :func:`evaluator_for`.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Optional, Union

from torch import fx

from shapcam_ext.game import Game
from shapcam_ext.head import SplitModel
from shapcam_ext.paths.generic import GenericPath
from shapcam_ext.paths.incremental import incremental_walk
from shapcam_ext.paths.pattern import HeadPattern, prove
from shapcam_ext.paths.pooled import pooled_walk
from shapcam_ext.paths.protocol import Evaluator
from shapcam_ext.paths.selfcheck import disagreement
from shapcam_ext.paths.token_attention import class_token_walk
from shapcam_ext.paths.token_pattern import NO_ATTENTION, ClassTokenPattern, class_token_pattern

logger = logging.getLogger("shapcam_ext")


@dataclass(frozen=True)
class Proof:
    """What one layer's head was proven to be: its fast pattern (None: not proven, ``reason`` says
    why) and its fx graph (None on the hook path or for a user's head)."""

    pattern: Union[HeadPattern, ClassTokenPattern, None]
    reason: str
    head: Optional[fx.GraphModule]

    @property
    def walks_cheaply(self) -> bool:
        """Whether a permutation of the proven walk costs a small part of the generic path's (the
        pooled and class-token walks), so that building and checking it is quick; an incremental
        walk recomputes boxes of the head at every step, and may cost nearly as much."""
        return self.pattern is not None and getattr(self.pattern, "local", None) is None


def proof_of(split: SplitModel, fast_path: bool = True) -> Proof:
    """The proof for the head of ``split`` (none is attempted when ``fast_path`` is False): a pooled
    head's pattern, else a class token's attention; the reason names what failed in a head that
    attends, else in the pooled proof."""
    if not fast_path:
        return Proof(None, "fast_path=False", split.graph_module)
    pattern, reason = prove(split)
    if pattern is None:
        tokens, why = prove(split, class_token_pattern)
        if tokens is not None or why != NO_ATTENTION:
            pattern, reason = tokens, why
    return Proof(pattern, reason, split.graph_module)


def evaluator_for(game: Game, proof: Proof) -> Evaluator:
    """The fastest exact evaluator the head's proven pattern allows for this game, checked against
    the head; the generic path otherwise, with the reason logged at DEBUG (or warned, when a
    proven shortcut fails or disagrees with the head: that is a bug to report)."""
    if proof.pattern is None or proof.head is None:
        return _generic(game, proof.reason or "no shortcut proven for the head")
    try:
        walk = _walk(game, proof.pattern)
        problem = None if isinstance(walk, str) else disagreement(walk, game, proof.head)
    except Exception as err:  # an op the walk runs on boxes or tables in an unforeseen way: generic must still run
        walk, problem = None, f"failed ({type(err).__name__}: {err})"
    if problem is not None:
        warnings.warn(f"shapcam_ext: the {getattr(walk, 'path', 'fast')} path {problem}; using the generic path. "
                      "Please report the model and layer.", RuntimeWarning, stacklevel=5)
        return GenericPath(game)
    return _generic(game, walk) if isinstance(walk, str) else walk


def _generic(game: Game, reason: str) -> GenericPath:
    logger.debug("Shap-CAM at %r: generic path (%s)", game.layer, reason)
    return GenericPath(game)


def _walk(game: Game, pattern: Union[HeadPattern, ClassTokenPattern]) -> Union[Evaluator, str]:
    """The walk the pattern proves for this game, or why it cannot play it (its players, a runtime
    shape, or a cost above the generic path's)."""
    if isinstance(pattern, ClassTokenPattern):
        return class_token_walk(game, pattern)
    if game.grid.group_size != 1:
        return "grouped players"
    walk = incremental_walk(game, pattern) if pattern.local is not None else pooled_walk(game, pattern)
    return "cheaper, or a runtime shape does not fit the proof" if walk is None else walk


__all__ = ["Evaluator", "GenericPath", "HeadPattern", "Proof", "evaluator_for", "proof_of", "prove"]
