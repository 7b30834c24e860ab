"""The Shapley estimator: sampled permutations of feature-map positions, walked through the head.

One engine serves every public API (ShapCAM, the torchcam and Captum adapters, the CLI). For a
batch it runs the trunk once; then, for each run of images, it streams permutations in rounds,
evaluates the masked prefixes of each permutation with the head (or walks a proven fast path)
and accumulates the marginal contributions with the compiled ops, on the model's device, until
the permutations are spent or the tolerance is met.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from shapcam_ext import fastpath, ops
from shapcam_ext._backend import backend_info
from shapcam_ext.config import SamplingConfig
from shapcam_ext.head import SplitModel
from shapcam_ext.memory import MemoryPlanner, cost_per_unit
from shapcam_ext.model_state import eval_semantics
from shapcam_ext.players import PlayerGrid
from shapcam_ext.postprocess import scale_cam_image
from shapcam_ext.sampling import ExhaustiveStream, PermutationStream
from shapcam_ext.statistics import MIN_UNITS_TO_STOP, RunningEstimate
from shapcam_ext.targets import Scorer, Target, resolve_targets

logger = logging.getLogger("shapcam_ext")

LONG_RUN_SECONDS = 60.0  # runs projected to take longer announce their cost first


@dataclass(repr=False)
class ShapleyResult:
    """Shap-CAM of one image at one target layer.

    shapley: (H, W) signed Shapley value of each player (float64, CPU); sums to
        value_full - value_empty up to ``efficiency_gap``. With group_size g, one value per
        g x g cell of the feature map.
    std_error: (H, W) standard error of each value over independent units (a Latin block or an
        antithetic pair counts as one); zeros for exact enumeration; None when undefined (a single
        unit).
    value_full / value_empty: the target's score with every / no position kept.
    path: how the coalitions were evaluated: "generic" (the head on masked maps), or an exact
        fast path: "pooled-linear", "pooled", "local-pool-linear", or for heads that mix positions
        locally before their pool, "incremental-table" or "incremental-recompute".
    feature_map: (h, w) the values over the feature map's positions (a grouped player's value
        on each of its positions), for display.
    """

    shapley: torch.Tensor
    std_error: Optional[torch.Tensor]
    value_full: float
    value_empty: float
    efficiency_gap: float
    n_permutations: int
    backend: str
    seconds: float
    layer: str
    target: Target
    feature_map: torch.Tensor = field(default=None)
    path: str = "generic"

    @property
    def max_std_error(self) -> Optional[float]:
        """The largest standard error, or None when it is undefined."""
        return None if self.std_error is None else float(self.std_error.max())

    def cam_image(self, size: Optional[tuple] = None) -> np.ndarray:
        """The map as ShapCAM returns it: ReLU, min-max to [0, 1], resized to size = (width, height)."""
        return scale_cam_image(self.feature_map[None].clamp_min(0), size)[0]

    def __repr__(self) -> str:
        h, w = self.shapley.shape
        se = "undefined" if self.std_error is None else f"{self.max_std_error:.2g}"
        return (f"ShapleyResult(layer={self.layer!r}, {h}x{w} players, path={self.path!r}, "
                f"sum={self.value_full - self.value_empty:+.4g} (full {self.value_full:.4g}, empty "
                f"{self.value_empty:.4g}), K={self.n_permutations}, max SE {se}, {self.seconds:.3g} s)")


class BatchError(ValueError):
    """Some images of a batch failed; ``results`` holds the others (None where failed)."""

    def __init__(self, failures: dict, results: list):
        lines = "; ".join(f"image {i}: {msg}" for i, msg in failures.items())
        super().__init__(f"{len(failures)} of {len(results)} images failed ({lines})")
        self.failures = failures
        self.results = results


def check_input(input_tensor: Any, model: torch.nn.Module) -> None:
    """Raises TypeError / ValueError (one line, naming the fix) for input the model cannot take."""
    if not isinstance(input_tensor, torch.Tensor):
        fix = "torch.from_numpy(x)" if isinstance(input_tensor, np.ndarray) else "torch.as_tensor(x)"
        raise TypeError(f"input_tensor must be a torch.Tensor, got {type(input_tensor).__name__}; convert it "
                        f"with {fix} (a batch: (B, C, H, W))")
    if input_tensor.dim() == 0 or input_tensor.shape[0] == 0:
        raise ValueError(f"input_tensor has no images (shape {tuple(input_tensor.shape)}); pass a batch of at "
                         "least one, e.g. x[None] for a single (C, H, W) image")
    param = next(model.parameters(), None)
    if param is not None and param.device != input_tensor.device:
        raise ValueError(
            f"input_tensor is on {input_tensor.device} but the model's parameters are on {param.device}; "
            f"move the input with input_tensor.to('{param.device}')"
        )


class ShapleyEngine:
    """Estimates Shap-CAM maps for one split model (one target layer)."""

    def __init__(self, model: torch.nn.Module, split: SplitModel, config: SamplingConfig,
                 reshape_transform=None, progress: bool = False):
        config.validate()
        self.model = model
        self.split = split
        self.config = config
        self.reshape_transform = reshape_transform
        self.progress = progress
        # The head's fast pattern, or None with the reason it is not proven.
        with eval_semantics(model):
            self.fast_pattern, self.fast_reason = (
                fastpath.prove(split) if config.fast_path else (None, "fast_path=False"))

    def explain(self, input_tensor: torch.Tensor, targets: Optional[Sequence[Target]] = None) -> tuple:
        """Shapley maps of a batch, under eval semantics (the model's modes are restored).

        Returns (results, outputs): one ShapleyResult per image and the model's output.

        Raises:
            BatchError: some images failed (non-finite activations or worths); its ``results``
                holds the others.
            TypeError / ValueError: input, targets or settings that cannot work, named.
        """
        check_input(input_tensor, self.model)
        start = time.perf_counter()
        with eval_semantics(self.model):
            trunk = self.split.trunk(input_tensor)
            batch = input_tensor.shape[0]
            outputs = self.split.head(trunk.activation, *trunk.held)
            targets = resolve_targets(targets, outputs, batch)
            grid = PlayerGrid(trunk.activation, self.reshape_transform, self.config.group_size)
            baseline = grid.baseline(self.config.baseline)
            finite = torch.isfinite(grid.players.flatten(1)).all(1).tolist()
            failures = {
                i: "the target layer's activation has NaN or Inf values; check the input and the model's weights"
                for i, ok in enumerate(finite) if not ok
            }
            results: List[Optional[ShapleyResult]] = [None] * batch
            for images in _runs([i for i, ok in enumerate(finite) if ok]):
                group = _ImageGroup(self, grid, trunk.held, batch, targets, baseline, images)
                for i, outcome in zip(range(images.start, images.stop), group.run(start)):
                    if isinstance(outcome, str):
                        failures[i] = outcome
                    else:
                        results[i] = outcome
        if failures:
            raise BatchError(dict(sorted(failures.items())), results)
        return results, outputs


class _ImageGroup:
    """One run of images explained together: they share permutations and head chunks."""

    def __init__(self, engine: ShapleyEngine, grid: PlayerGrid, held: tuple, batch: int,
                 targets: List[Target], baseline: torch.Tensor, images: slice):
        self.engine, self.grid, self.images = engine, grid, images
        self.config = engine.config
        self.players = grid.players[images]
        # Which held values are batched like the input (tensors of the head's batch); the rest
        # (None, flags, unbatched tensors) pass through unchanged.
        self.batched = tuple(isinstance(h, torch.Tensor) and h.dim() > 0 and h.shape[0] == batch for h in held)
        self.held = _select_images(held, self.batched, images)
        self.targets = targets[images]
        self.baseline = baseline[images] if baseline.dim() else baseline
        self.batch = images.stop - images.start
        self.n = self.players.shape[-1] * self.players.shape[-2]
        self.device = self.players.device
        self.scorer = Scorer()
        self.planner = MemoryPlanner(self.config.memory_budget, self.config.batch_size)

    def worth(self, masked: torch.Tensor, sub: slice) -> torch.Tensor:
        """Scores (len(sub), rows per image) of masked player grids of images ``sub`` of this group."""
        absolute = slice(self.images.start + sub.start, self.images.start + sub.stop)
        images = sub.stop - sub.start
        out = self.engine.split.head(self.grid.head_input(masked, absolute),
                                     *_select_images(self.held, self.batched, sub))
        return self.scorer(self.targets[sub], out, masked.shape[0] // images)

    def run(self, start: float) -> list:
        """A ShapleyResult, or the failure message, per image of the group."""
        cfg = self.config
        everyone = slice(0, self.batch)
        base_map = self.baseline.expand_as(self.players)
        ends = self.worth(torch.stack([base_map, self.players], 1).flatten(0, 1), everyone)  # (b, 2)
        stream = (ExhaustiveStream(self.n, self.device) if cfg.exact
                  else PermutationStream(self.n, cfg.antithetic, cfg.seed, self.device, cfg.design, cfg.permutations))
        estimate = RunningEstimate(self.batch, self.n, stream.unit_size, self.device, stream.exhaustive)
        unit = stream.unit_size
        total = stream.total if stream.exhaustive else -(-cfg.permutations // unit) * unit
        walk = None
        if self.engine.fast_pattern is not None:
            walk = fastpath.prepare(self.engine.fast_pattern, self.engine.split.head, self.grid, self.players,
                                    self.held, self.targets, self.baseline, self.planner, self.scorer, total)
        accumulate = walk if walk is not None else _GenericPath(self)
        per_round = max(unit, accumulate.permutations_per_round(unit) // unit * unit)
        schedule = _StopSchedule(cfg.tolerance, unit, total)
        announcer = _CostAnnouncer(self, accumulate.coalitions_per_permutation)
        if total > unit:
            announcer.probe(accumulate, schedule.projected_total)
        bar = tqdm(total=total, desc="permutations", unit="perm", disable=not self.engine.progress, leave=False)
        with bar:
            while estimate.permutations < total:
                count = min(per_round, total - estimate.permutations, schedule.next_check - estimate.permutations)
                perms = stream.take(count)
                tick = time.perf_counter()
                accumulate(perms, estimate)
                estimate.permutations += count
                bar.update(count)
                seconds = time.perf_counter() - tick
                if estimate.permutations >= schedule.next_check and schedule.stop(estimate):
                    break
                announcer.observe(count, seconds, schedule.projected_total)
        return self._results(estimate, ends, walk, start)

    def _results(self, estimate: RunningEstimate, ends: torch.Tensor, walk, start: float) -> list:
        mean = estimate.mean()
        se = estimate.std_error()
        finite = (torch.isfinite(mean).all(1) & torch.isfinite(estimate.total_sq).all(1)
                  & torch.isfinite(ends).all(1)).tolist()
        mean, ends = mean.cpu(), ends.double().cpu()
        se = None if se is None else se.cpu()
        seconds = time.perf_counter() - start
        h, w = self.players.shape[-2:]
        out: list = []
        for i in range(self.batch):
            if not finite[i]:
                out.append("the target's score is NaN or Inf for some coalitions (check the model's weights and "
                           "the target); no map was made")
                continue
            empty, full = ends[i].tolist()
            shapley = mean[i].view(h, w)
            out.append(ShapleyResult(
                shapley=shapley,
                std_error=None if se is None else se[i].view(h, w),
                value_full=full,
                value_empty=empty,
                efficiency_gap=abs(float(mean[i].sum()) - (full - empty)),
                n_permutations=estimate.permutations,
                backend=backend_info()["backend"],
                seconds=seconds,
                layer=self.engine.split.layer_name,
                target=self.targets[i],
                feature_map=self.grid.to_map(shapley),
                path="generic" if walk is None else walk.path,
            ))
        return out


class _GenericPath:
    """Runs the head on the masked prefixes of each permutation, in chunks under the budget.

    Whole permutations of several images go together when they fit; otherwise fewer images, then
    fewer permutations, then a range of prefix lengths per chunk.
    """

    def __init__(self, group: _ImageGroup):
        self.group = group
        n, players = group.n, group.players
        self.coalitions_per_permutation = group.batch * (n + 1)

        def run(rows: int):
            masked = players[:1].expand((rows,) + players.shape[1:]).contiguous()
            return lambda: group.worth(masked, slice(0, 1))

        if group.planner.batch_size is not None:
            self.rows = group.planner.batch_size
        else:
            fixed, per_row = cost_per_unit(run)
            self.rows = group.planner.head_rows(per_row + players[:1].numel() * players.element_size(), fixed)

    def permutations_per_round(self, unit: int) -> int:
        """A round's prefix values (B, K, n+1) in float64 and its permutations stay under the budget."""
        g = self.group
        per_permutation = (g.batch * (g.n + 1) + g.n) * 8
        return g.planner.units(per_permutation * unit, what="the prefix values of one unit of permutations") * unit

    def __call__(self, perms: torch.Tensor, estimate: RunningEstimate) -> None:
        g = self.group
        b, n, k = g.batch, g.n, perms.shape[0]
        values = torch.empty(b, k, n + 1, dtype=torch.float64, device=g.device)
        ranks = ops.permutation_ranks(perms)
        per_group = max(1, min(b, self.rows // (n + 1)))
        for i0 in range(0, b, per_group):
            sub = slice(i0, min(b, i0 + per_group))
            images = sub.stop - sub.start
            base = g.baseline[sub] if g.baseline.dim() else g.baseline
            prefixes = max(1, min(n + 1, self.rows // images))
            per_chunk = max(1, self.rows // (images * (n + 1)))
            for k0 in range(0, k, per_chunk):
                k1 = min(k, k0 + per_chunk)
                for t0 in range(0, n + 1, prefixes):
                    t1 = min(n + 1, t0 + prefixes)
                    masked = ops.masked_prefixes(g.players[sub], base, ranks, (k0, k1), (t0, t1))
                    values[sub, k0:k1, t0:t1] = g.worth(masked, sub).view(images, k1 - k0, t1 - t0)
        ops.scatter_marginals_(values, ranks, estimate.total, estimate.total_sq, estimate.unit_size)


class _StopSchedule:
    """When to check the tolerance: each check reads the estimate back from the device, so checks
    are few. After the first, the next is where the error, shrinking like 1/sqrt(K), should meet
    the tolerance, at most four times further on.

    ``projected_total``: the permutations the run is expected to take; None until the first check
    of a run with a tolerance.
    """

    def __init__(self, tolerance: Optional[float], unit: int, total: int):
        self.tolerance, self.unit, self.total = tolerance, unit, total
        self.next_check = total if tolerance is None else min(total, MIN_UNITS_TO_STOP * unit)
        self.projected_total: Optional[int] = total if tolerance is None else None

    def stop(self, estimate: RunningEstimate) -> bool:
        if self.tolerance is None:
            return False
        bound = estimate.relative_error_bound()
        # NaN: the run has already failed; finishing it would not help.
        if bool(((bound < self.tolerance) | bound.isnan()).all()):
            return True
        worst = float(bound.nan_to_num(nan=0.0).max())
        done = estimate.permutations
        needed = done * (worst / self.tolerance) ** 2 * 1.1 if math.isfinite(worst) else self.total
        self.projected_total = self._whole_units(min(max(needed, done + self.unit), self.total))
        self.next_check = self._whole_units(min(self.projected_total, 4 * done))
        return False

    def _whole_units(self, permutations: float) -> int:
        return min(self.total, int(-(-permutations // self.unit) * self.unit))


class _CostAnnouncer:
    """Logs the projected cost of a long run once, from the time its rounds take.

    Without a tolerance the run's length is known at once; with one it is known at the first
    stop check, which projects how many permutations the tolerance needs.
    """

    def __init__(self, group: _ImageGroup, coalitions_per_permutation: int):
        self.group, self.per_permutation = group, coalitions_per_permutation
        self.seconds, self.permutations, self.done = 0.0, 0, False

    def probe(self, accumulate, projected_total: Optional[int]) -> None:
        """Times one permutation (the identity order), kept out of the estimate, so that a long
        run is announced before its first round, however large the sampling design's units."""
        g = self.group
        scratch = RunningEstimate(g.batch, g.n, 1, g.device)
        tick = time.perf_counter()
        accumulate(torch.arange(g.n, device=g.device)[None], scratch)
        self.observe(1, time.perf_counter() - tick, projected_total)

    def observe(self, permutations: int, seconds: float, projected_total: Optional[int]) -> None:
        self.seconds += seconds
        self.permutations += permutations
        if self.done or projected_total is None:
            return
        self.done = True
        remaining = self.seconds / self.permutations * (projected_total - self.permutations)
        if remaining <= LONG_RUN_SECONDS:
            return
        g = self.group
        per_coalition = self.seconds / (self.permutations * self.per_permutation)
        logger.warning(
            "Shap-CAM at %r: %d image(s), %d players: %d permutations x %d coalitions = %.3g coalition "
            "evaluations, projected %s more (%.3g ms each, measured); lower n_permutations, set tolerance or "
            "group_size, or pick a coarser layer", g.engine.split.layer_name, g.batch, g.n, projected_total, g.n + 1,
            projected_total * self.per_permutation, _duration(remaining), 1e3 * per_coalition)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"about {seconds:.0f} s"
    if seconds < 7200:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


def _select_images(held: tuple, batched: tuple, images: slice) -> tuple:
    """Held values for some images: the batched ones are sliced, the others pass through."""
    return tuple(h[images] if is_batched else h for h, is_batched in zip(held, batched))


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


__all__ = ["BatchError", "ShapleyEngine", "ShapleyResult", "check_input"]
