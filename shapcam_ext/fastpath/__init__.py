"""Exact fast paths for structured heads: proven on the head's fx graph, else the generic path.

``prove(split)`` inspects the head once; ``prepare(...)`` builds the walk for a batch of images,
or returns None so that the engine runs its generic masked-batch path.
"""
from shapcam_ext.fastpath.pattern import HeadPattern, prove
from shapcam_ext.fastpath.walk import LinearWalk, RunningWalk, prepare

__all__ = ["HeadPattern", "LinearWalk", "RunningWalk", "prepare", "prove"]
