"""The one memory planner: how much work fits in one chunk under ``memory_budget``.

Every path (the generic masked batches, the fast walks, the permutation stream) states what one
unit of its work costs, in bytes, and asks the planner how many units a chunk may hold. Costs
that depend on the model (a head evaluation) are measured by counting the storage that one call
allocates; costs of our own ops come from the ops module, for the backend that is active.

A differentiable map (``create_graph``) keeps its autograd graph until the backward. Each chunk
of work runs under :func:`recomputed`, so the graph keeps only the chunk's inputs (tensors the run
holds anyway) and its outputs, never the values in between; the backward then recomputes one
chunk at a time. The planner counts both: the graph's bytes beside every chunk, and every chunk
twice (see :class:`MemoryPlanner`).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

from shapcam_ext.model_state import current_semantics

__all__ = ["MemoryPlanner", "allocated_bytes", "format_bytes", "graph_bytes_per_permutation", "recomputed"]


def format_bytes(count: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units, three significant figures."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.3g} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


class _AllocationCounter(TorchDispatchMode):
    """Sums the bytes of the new storage every op returns (views are free): an upper bound on
    a call's memory, since nothing is counted as freed."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        new = {_storage(t): t.untyped_storage().nbytes() for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        self.bytes += sum(size for storage, size in new.items() if storage not in inputs)
        return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def allocated_bytes(fn: Callable[[], object]) -> int:
    """Bytes of new storage allocated by the tensor ops of one call of ``fn`` (an upper bound)."""
    counter = _AllocationCounter()
    with counter:
        fn()
    return counter.bytes


def cost_per_unit(run: Callable[[int], Callable[[], object]]) -> tuple[int, int]:
    """(fixed, per-unit) bytes of ``run(units)()``, from calls with one and two units.

    Two calls separate the cost of one more unit from what does not grow with the units (views or
    casts of the weights, for instance).
    """
    one, two = allocated_bytes(run(1)), allocated_bytes(run(2))
    per_unit = max(two - one, 1)
    return max(one - per_unit, 0), per_unit


def recomputed(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; while autograd records, its backward recomputes it (a non-reentrant
    ``torch.utils.checkpoint``) instead of keeping its intermediate values: the graph keeps
    ``args`` and the tensors ``fn`` reads, which the caller holds anyway. The recomputation runs
    under the evaluation semantics active now (the backward comes after explain has restored the
    model's modes), so ``fn`` computes the same values again: the paths are deterministic and
    draw no random numbers. It reads the parameters as they are when the backward runs."""
    if not torch.is_grad_enabled():
        return fn(*args)
    again = current_semantics()
    return checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), again))


def graph_bytes_per_permutation(batch: int, n: int) -> int:
    """What a differentiable map's graph keeps per permutation until the backward, on every path:
    the worths of its n + 1 prefixes for every image (float64 at most) and the order with its
    ranks (int64); each chunk's intermediate values are recomputed (:func:`recomputed`)."""
    return (batch * (n + 1) + 2 * n) * 8


class MemoryPlanner:
    """Sizes chunks of work under a byte budget.

    Args:
        budget: bytes one chunk may allocate.
        batch_size: head evaluations per chunk chosen by the user; overrides the budget for
            the paths that count head evaluations.
        graph_bytes: for a differentiable map, the bytes its graph keeps until the backward (all
            of the run's permutations); None otherwise. They are counted beside every chunk, and a
            chunk counts twice: its backward recomputes it, then allocates gradients of about the
            same size.
    """

    def __init__(self, budget: int, batch_size: Optional[int] = None, graph_bytes: Optional[int] = None):
        self.budget = budget
        self.batch_size = batch_size
        self.graph_bytes = graph_bytes

    @property
    def differentiable(self) -> bool:
        """Whether the chunks planned belong to a differentiable map."""
        return self.graph_bytes is not None

    def units(self, per_unit: int, fixed: int = 0, what: str = "one unit of work") -> int:
        """How many units of ``per_unit`` bytes fit beside ``fixed`` bytes (at least one).

        Raises:
            ValueError: not even one unit fits; the message names the need and the budget.
        """
        kept = ""
        if self.graph_bytes is not None:
            per_unit, fixed = 2 * per_unit, fixed + self.graph_bytes
            kept = f" (its backward included, beside the {format_bytes(self.graph_bytes)} the map's graph keeps)"
        if fixed + per_unit > self.budget:
            raise ValueError(
                f"memory_budget of {format_bytes(self.budget)} is too small for {what}{kept}, which needs "
                f"{format_bytes(fixed + per_unit)}; raise memory_budget to at least that"
                + (", or lower n_permutations" if kept else "")
            )
        return max(1, (self.budget - fixed) // max(per_unit, 1))

    def head_rows(self, per_row: int, fixed: int = 0) -> int:
        """Head evaluations per chunk: the user's batch_size, or what the budget allows."""
        if self.batch_size is not None:
            return self.batch_size
        return self.units(per_row, fixed, "one head evaluation")
