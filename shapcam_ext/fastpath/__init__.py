"""Exact fast paths for structured heads: proven on the head's fx graph, else the generic path.

``prove(split)`` inspects the head once; ``prepare(...)`` builds the walk for a batch of images,
or returns None so that the engine runs its generic masked-batch path. Heads whose body mixes
positions locally before a global pool get the incremental walks of ``fastpath.incremental``.
"""
from shapcam_ext.fastpath.pattern import HeadPattern, prove
from shapcam_ext.fastpath.running import RunningWalk, Walk
from shapcam_ext.fastpath.walk import LinearWalk, prepare

__all__ = ["HeadPattern", "LinearWalk", "RunningWalk", "Walk", "prepare", "prove"]
