"""The Shapley estimator: sampled permutations of feature-map positions, walked through the head.

One engine serves every public API (ShapCAM, the torchcam and Captum adapters, the CLI).
For each image it runs the trunk once, then streams the masked prefixes of each sampled
permutation through the head in chunks under a memory budget, and accumulates the marginal
contributions with the compiled scatter op.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from shapcam_ext import fastpath, ops
from shapcam_ext._backend import backend_info
from shapcam_ext.head import SplitModel
from shapcam_ext.players import PlayerGrid
from shapcam_ext.postprocess import scale_cam_image
from shapcam_ext.sampling import all_permutations, sample_permutations
from shapcam_ext.targets import Target, resolve_targets, score

MiB = 1 << 20


@dataclass
class SamplingConfig:
    """How the Shapley values are estimated.

    n_permutations: permutations to sample (the cap when ``tolerance`` is set).
    antithetic: sample each permutation together with its reverse.
    seed: seeds the permutations; the same seed gives bit-identical maps on the CPU.
    tolerance: stop once max standard error / max |value| falls below it (checked per round).
    exact: average over all n! orders instead of sampling (n <= 8 players).
    baseline: value of removed positions; a scalar or a tensor broadcastable to (C, h, w).
    group_size: g fuses g x g positions into one player, for large maps.
    memory_budget: bytes one chunk of head evaluations may use.
    batch_size: head evaluations per chunk; overrides the budget-derived chunk size.
    fast_path: use an exact shortcut when the head's graph proves one applies (pooled or
        local-pool heads, see :mod:`shapcam_ext.fastpath`); False forces the generic path.
    """

    n_permutations: int = 256
    antithetic: bool = True
    seed: Optional[int] = 0
    tolerance: Optional[float] = None
    exact: bool = False
    baseline: object = 0.0
    group_size: int = 1
    memory_budget: int = 1024 * MiB
    batch_size: Optional[int] = None
    round_size: int = 64
    fast_path: bool = True

    def validate(self) -> None:
        if self.n_permutations < 1:
            raise ValueError(f"n_permutations must be >= 1, got {self.n_permutations}")
        if self.tolerance is not None and not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance}; use None for a fixed n_permutations")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.memory_budget <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {self.memory_budget}")


@dataclass
class ShapleyResult:
    """Shap-CAM of one image at one target layer.

    shapley: (H, W) signed Shapley value of each player (float64, CPU); sums to
        value_full - value_empty up to ``efficiency_gap``.
    std_error: (H, W) standard error of each value (i.i.d. formula; conservative for
        antithetic pairs, whose members are negatively correlated).
    value_full / value_empty: the target's score with every / no position kept.
    path: how the coalitions were evaluated: "generic" (the head on masked maps), or an exact
        fast path: "pooled-linear", "pooled" or "local-pool-linear".
    """

    shapley: torch.Tensor
    std_error: torch.Tensor
    value_full: float
    value_empty: float
    efficiency_gap: float
    n_permutations: int
    backend: str
    seconds: float
    layer: str
    target: Target
    feature_map: torch.Tensor = field(repr=False, default=None)  # shapley spread over (h, w)
    path: str = "generic"

    @property
    def max_std_error(self) -> float:
        return float(self.std_error.max())

    def cam_image(self, size: Optional[tuple] = None) -> np.ndarray:
        """The map as ShapCAM returns it: ReLU, min-max to [0, 1], resized to size = (width, height)."""
        return scale_cam_image(self.feature_map[None].clamp_min(0), size)[0]


class BatchError(ValueError):
    """Some images of a batch failed; ``results`` holds the others (None where failed)."""

    def __init__(self, failures: dict, results: list):
        lines = "; ".join(f"image {i}: {msg}" for i, msg in failures.items())
        super().__init__(f"{len(failures)} of {len(results)} images failed ({lines})")
        self.failures = failures
        self.results = results


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


def _check_device(model: torch.nn.Module, input_tensor: torch.Tensor) -> None:
    param = next(model.parameters(), None)
    if param is not None and param.device != input_tensor.device:
        raise ValueError(
            f"input_tensor is on {input_tensor.device} but the model is on {param.device}; "
            f"move the input with input_tensor.to('{param.device}')"
        )


class ShapleyEngine:
    """Estimates Shap-CAM maps for one split model (one target layer)."""

    def __init__(self, split: SplitModel, config: SamplingConfig, reshape_transform: Optional[Callable] = None,
                 progress: bool = False):
        config.validate()
        self.split = split
        self.config = config
        self.reshape_transform = reshape_transform
        self.progress = progress
        # The head's fast pattern, or None with the reason it is not proven.
        self.fast_pattern, self.fast_reason = fastpath.prove(split) if config.fast_path else (None, "fast_path=False")

    @torch.no_grad()
    def explain(self, input_tensor: torch.Tensor, targets: Optional[Sequence[Target]] = None) -> tuple:
        """Shapley maps of a batch.

        Returns (results, logits): one ShapleyResult per image and the model's output.
        Raises BatchError (with the other images' results) if some images fail, e.g. on
        NaN/Inf activations; ValueError for bad targets, shapes or settings.
        """
        start = time.perf_counter()
        trunk = self.split.trunk(input_tensor)
        act = trunk.activation
        grid = PlayerGrid(act, self.reshape_transform, self.config.group_size)
        logits = self.split.head(act, *trunk.held)
        targets = resolve_targets(targets, logits)
        finite = torch.isfinite(act.flatten(1)).all(1).tolist()
        failures = {
            i: "the target layer's activation has NaN or Inf values; check the input and the model's weights"
            for i, ok in enumerate(finite) if not ok
        }
        good = [i for i, ok in enumerate(finite) if ok]
        results: List[Optional[ShapleyResult]] = [None] * act.shape[0]
        for images in _runs(good):
            results[images] = self._explain_images(grid, trunk.held, targets, images, start)
        if failures:
            raise BatchError(failures, results)
        return results, logits

    def _explain_images(self, grid, held, targets, images: slice, start) -> List[ShapleyResult]:
        cfg = self.config
        players = grid.players[images]
        held = tuple(h[images] for h in held)
        targets = targets[images]
        baseline = grid.baseline(cfg.baseline)
        if baseline.dim():
            baseline = baseline[images]
        b, n = players.shape[0], players.shape[-1] * players.shape[-2]

        def worth(masked: torch.Tensor, sub: slice) -> torch.Tensor:
            """Scores (len(sub), rows per image) of masked grids of images ``sub`` of this run."""
            absolute = slice(images.start + sub.start, images.start + sub.stop)
            out = self.split.head(grid.head_input(masked, absolute), *(h[sub] for h in held))
            return score(targets[sub], out.view((sub.stop - sub.start, -1) + tuple(out.shape[1:])))

        everyone = slice(0, b)
        ends = torch.stack([  # (b, 2): the worth of the empty and of the full coalition
            worth(ops.masked_prefixes(players, _identity_perm(n, players.device), baseline, prefix_range=(t, t + 1)),
                  everyone)[:, 0]
            for t in (0, n)
        ], 1).double().cpu()
        walk = self._fast_walk(grid, players, held, targets, baseline)
        rows = None if walk is not None else self._rows_per_chunk(grid, players, held, images)

        phi = torch.zeros(b, n, dtype=torch.float64, device=players.device)
        phi_sq = torch.zeros_like(phi)
        done = 0
        for perms in self._permutation_rounds(n):
            perms = perms.to(players.device)
            if walk is not None:
                walk(perms, phi, phi_sq)
            else:
                self._accumulate(players, baseline, perms, worth, rows, phi, phi_sq)
            done += perms.shape[0]
            if cfg.tolerance is not None and _relative_error(phi, phi_sq, done).max() < cfg.tolerance:
                break
        mean, std_error = _mean_and_standard_error(phi.cpu(), phi_sq.cpu(), done)
        seconds = time.perf_counter() - start
        h, w = players.shape[-2:]
        out = []
        for i in range(b):
            empty, full = ends[i].tolist()
            shapley = mean[i].view(h, w)
            out.append(ShapleyResult(
                shapley=shapley,
                std_error=std_error[i].view(h, w),
                value_full=full,
                value_empty=empty,
                efficiency_gap=abs(float(mean[i].sum()) - (full - empty)),
                n_permutations=done,
                backend=backend_info()["backend"],
                seconds=seconds,
                layer=self.split.layer_name,
                target=targets[i],
                feature_map=grid.to_map(shapley),
                path="generic" if walk is None else walk.path,
            ))
        return out

    def _fast_walk(self, grid, players, held, targets, baseline) -> Optional[fastpath.RunningWalk]:
        """The exact fast path for these images, or None for the generic path."""
        cfg = self.config
        if self.fast_pattern is None:
            return None
        return fastpath.prepare(self.fast_pattern, self.split.head, grid, players, held, targets, baseline,
                                cfg.memory_budget, cfg.batch_size, _allocated_bytes)

    def _permutation_rounds(self, n: int):
        """Yields blocks of permutations; one block unless a tolerance asks for rounds."""
        cfg = self.config
        if cfg.exact:
            yield all_permutations(n)
            return
        generator = torch.Generator()
        if cfg.seed is None:
            generator.seed()
        else:
            generator.manual_seed(cfg.seed)
        perms = sample_permutations(n, cfg.n_permutations, generator, cfg.antithetic)
        step = perms.shape[0] if cfg.tolerance is None else cfg.round_size + cfg.round_size % 2
        bar = tqdm(total=perms.shape[0], desc="permutations", unit="perm", disable=not self.progress, leave=False)
        with bar:
            for start in range(0, perms.shape[0], step):
                block = perms[start:start + step]
                yield block
                bar.update(block.shape[0])

    def _accumulate(self, players, baseline, perms, worth, rows, phi, phi_sq) -> None:
        """Walks every permutation of ``perms`` through the head in chunks of at most ``rows``.

        Whole permutations of several images go together when they fit; otherwise fewer
        images, then fewer permutations, then a range of prefix lengths per chunk.
        """
        b, n, k = players.shape[0], players.shape[-1] * players.shape[-2], perms.shape[0]
        per_group = max(1, min(b, rows // (n + 1)))
        for i0 in range(0, b, per_group):
            sub = slice(i0, min(b, i0 + per_group))
            images = sub.stop - sub.start
            base = baseline[sub] if baseline.dim() else baseline
            prefixes = max(1, min(n + 1, rows // images))
            per_chunk = max(1, rows // (images * (n + 1)))
            for k0 in range(0, k, per_chunk):
                k1 = min(k, k0 + per_chunk)
                values = torch.empty(images, k1 - k0, n + 1, dtype=torch.float64, device=players.device)
                for t0 in range(0, n + 1, prefixes):
                    t1 = min(n + 1, t0 + prefixes)
                    masked = ops.masked_prefixes(players[sub], perms, base, (k0, k1), (t0, t1))
                    values[:, :, t0:t1] = worth(masked, sub).view(images, k1 - k0, t1 - t0)
                ops.scatter_marginals_(values, perms[k0:k1], phi[sub], phi_sq[sub])

    def _rows_per_chunk(self, grid, players, held, images) -> int:
        """Head evaluations per chunk: the user's batch_size, or what the memory budget allows."""
        cfg = self.config
        if cfg.batch_size is not None:
            return cfg.batch_size
        # Two calls separate the cost of one more row from per-call constants (weight copies).
        image = slice(images.start, images.start + 1)
        measured = [_allocated_bytes(lambda: self.split.head(
            grid.head_input(players[:1].expand((rows,) + players.shape[1:]), image), *(h[:1] for h in held)))
            for rows in (1, 2)]
        per_row = max(measured[1] - measured[0], 0) + players[:1].numel() * players.element_size()
        fixed = max(measured[0] - per_row, 0)
        if fixed + per_row > cfg.memory_budget:
            raise ValueError(
                f"memory_budget of {cfg.memory_budget / MiB:.1f} MiB is too small for one head evaluation "
                f"({(fixed + per_row) / MiB:.1f} MiB); raise memory_budget"
            )
        return (cfg.memory_budget - fixed) // per_row


def _allocated_bytes(fn: Callable[[], object]) -> int:
    """Bytes allocated by the ops of one call of ``fn``."""
    counter = _AllocationCounter()
    with counter:
        fn()
    return counter.bytes


def _identity_perm(n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device).view(1, n)


def _mean_and_standard_error(phi, phi_sq, k: int) -> tuple:
    """Estimates and their standard errors from sums of K marginal contributions and squares."""
    mean = phi / k
    var = (phi_sq / k - mean.square()).clamp_min(0) * (k / max(k - 1, 1))
    return mean, (var / k).sqrt()


def _relative_error(phi, phi_sq, k: int) -> torch.Tensor:
    """Per image: largest standard error over the largest |Shapley value|."""
    mean, std_error = _mean_and_standard_error(phi, phi_sq, k)
    return (std_error.amax(1) / mean.abs().amax(1).clamp_min(1e-12)).cpu()


def _runs(indices: List[int]) -> List[slice]:
    """Contiguous runs of image indices as slices, so good images are batched together."""
    runs, start = [], None
    for pos, i in enumerate(indices):
        if start is None:
            start = i
        if pos + 1 == len(indices) or indices[pos + 1] != i + 1:
            runs.append(slice(start, i + 1))
            start = None
    return runs
