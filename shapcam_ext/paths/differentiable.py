"""The differentiable sums a map's autograd graph is built from: the one seam between the paths
and the ops' functional variants, :func:`shapcam_ext.ops.scatter_marginals` and
:func:`shapcam_ext.ops.linear_walk` (out of place, with ``register_autograd`` formulas).

What their backward keeps: the scatter, its ranks; the walk, its inputs and permutations (its
backward walks again, O(K n M) like the forward, and on CUDA records three numbers per step),
never the (B, K, n + 1, M) logits. With SHAPCAM_BACKEND=reference they are the references,
differentiated by autograd, which keeps the logits.
"""
from shapcam_ext.ops import linear_walk, scatter_marginals

__all__ = ["linear_walk", "scatter_marginals"]
