"""The Shapley estimator, in two phases: prepare a batch once, then estimate any layer's maps.

``prepare(x)`` runs the model once (a trunk shared by every target layer, see
:mod:`shapcam_ext.head`) and keeps its output and each layer's activation and held values.
``estimate(prepared, targets, layer)`` then plays the game of each run of good images at that
layer (:class:`~shapcam_ext.game.Game`): it picks the evaluation path (:mod:`shapcam_ext.paths`),
streams permutations in rounds (:mod:`shapcam_ext.sampling`), lets the path accumulate their
marginal contributions on the model's device (:mod:`shapcam_ext.statistics`), and stops when the
permutations are spent or the tolerance is met. Every public API (ShapCAM, the adapters, the CLI)
goes through these two calls, so one forward pass serves every layer and method of a batch.

With ``create_graph`` both phases record their autograd graph (the modules still in eval mode),
and the maps come back as differentiable functions of the model's parameters, the input and the
baseline, for the permutations drawn: a loss on them can be trained. What the graph keeps until
the backward is bounded and counted by the memory planner (:mod:`shapcam_ext.memory`): the trunk's
graph, the tensors the path holds (the activation, the baseline, the held values; a fast path's
tables), and per permutation its order and the worths of its prefixes; every chunk of head
evaluations (or round of a walk) is recomputed in the backward rather than kept. The self-check
and the cost probe stay out of the graph.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from shapcam_ext._backend import backend_info
from shapcam_ext.config import SamplingConfig
from shapcam_ext.game import Game
from shapcam_ext.head import ModelCuts, Prepared
from shapcam_ext.memory import MemoryPlanner, graph_bytes_per_permutation
from shapcam_ext.model_state import eval_semantics
from shapcam_ext.paths import Evaluator, Proof, evaluator_for, proof_of
from shapcam_ext.players import PlayerGrid
from shapcam_ext.results import BatchError, ShapleyResult
from shapcam_ext.sampling import ExhaustiveStream, PermutationStream
from shapcam_ext.statistics import MIN_UNITS_TO_STOP, RunningEstimate
from shapcam_ext.targets import Scorer, Target, resolve_targets

logger = logging.getLogger("shapcam_ext")

LONG_RUN_SECONDS = 60.0  # runs projected to take longer announce their cost first
# With a tolerance, a pilot of small Latin blocks (8 units of them, the fewest a stop check takes)
# projects how many permutations the tolerance needs, which sizes the blocks of the run.
PILOT_PERMUTATIONS = 64
NON_FINITE_ACTIVATION = "the target layer's activation has NaN or Inf values; check the input and the model's weights"
NON_FINITE_SCORE = ("the target's score is NaN or Inf for some coalitions (check the model's weights and the "
                    "target); no map was made")
NO_GRAPH = ("create_graph=True needs a batch prepared with its graph, or no gradient would reach the model before "
            "the target layer; prepare it with prepare(x, create_graph=True)")


def check_input(input_tensor, model: torch.nn.Module) -> None:
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


@contextmanager
def host_reads(device: torch.device) -> Iterator[None]:
    """The documented points where the engine reads device values back to the host (the setup of
    a batch, the stop checks, the results, the cost probe): allowed even when the caller runs under
    ``torch.cuda.set_sync_debug_mode("error")``, which the sampling rounds never trip."""
    if device.type != "cuda":
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


class ShapleyEngine:
    """Estimates Shap-CAM maps of one model at its target layers (``cuts``)."""

    def __init__(self, model: torch.nn.Module, cuts: ModelCuts, config: SamplingConfig,
                 reshape_transform=None, progress: bool = False):
        config.validate()
        self.model, self.cuts, self.config = model, cuts, config
        self.reshape_transform = reshape_transform
        self.progress = progress
        with eval_semantics(model):
            self.proofs = [proof_of(split, config.fast_path) for split in cuts.splits]

    # Under torch.compile both phases run eagerly (one graph break each): they switch module modes,
    # read the device back (stop checks, results) and time themselves, which would break a traced
    # graph dozens of times and recompile it on every batch.
    @torch.compiler.disable
    def prepare(self, input_tensor: torch.Tensor, create_graph: bool = False) -> Prepared:
        """Runs the model once on a batch, under eval semantics, for every target layer; with
        ``create_graph``, under autograd, so that a map's gradients reach the trunk.

        Raises:
            TypeError / ValueError: input the model cannot take, named with the fix.
        """
        check_input(input_tensor, self.model)
        with eval_semantics(self.model, grad=create_graph):
            return self.cuts.run(input_tensor)

    @torch.compiler.disable
    def estimate(self, prepared: Prepared, targets: Optional[Sequence[Target]] = None,
                 layer: int = 0, create_graph: bool = False) -> List[ShapleyResult]:
        """Shapley maps of a prepared batch at target layer ``layer`` (an index into the layers);
        with ``create_graph``, differentiable ones (see the module's docstring).

        Raises:
            BatchError: some images failed (non-finite activations or worths); its ``results``
                holds the others.
            TypeError / ValueError: targets or a layer index that cannot work, named; create_graph
                for a batch prepared without its graph.
        """
        if not isinstance(prepared, Prepared):
            raise TypeError(f"prepared must come from prepare(x), got {type(prepared).__name__}")
        if not 0 <= layer < len(self.proofs) or isinstance(layer, bool):
            raise ValueError(f"layer must index the {len(self.proofs)} target layer(s), got {layer!r}")
        if create_graph and not prepared.graph:
            raise ValueError(NO_GRAPH)
        start = time.perf_counter()
        cut = prepared.layers[layer]
        batch = prepared.input.shape[0]
        with eval_semantics(self.model, grad=create_graph):
            grid = PlayerGrid(cut.activation, self.reshape_transform, self.config.group_size)
            with host_reads(grid.players.device):
                targets = resolve_targets(targets, prepared.outputs, batch)
                finite = torch.isfinite(grid.players.flatten(1)).all(1).tolist()
            baseline = grid.baseline(self.config.baseline)
            failures = {i: NON_FINITE_ACTIVATION for i, ok in enumerate(finite) if not ok}
            results: List[Optional[ShapleyResult]] = [None] * batch
            for images in _runs([i for i, ok in enumerate(finite) if ok]):
                game = self._game(grid, cut.held, cut.head, cut.name, batch, targets, baseline, images, create_graph)
                run = _Run(self, game, self.proofs[layer], prepared.seconds + time.perf_counter() - start)
                for i, outcome in zip(range(images.start, images.stop), run.results()):
                    if isinstance(outcome, str):
                        failures[i] = outcome
                    else:
                        results[i] = outcome
        if failures:
            raise BatchError(dict(sorted(failures.items())), results)
        return results

    def _game(self, grid: PlayerGrid, held: tuple, head, name: str, batch: int, targets: List[Target],
              baseline: torch.Tensor, images: slice, create_graph: bool) -> Game:
        # Which held values are batched like the input (tensors of the head's batch); the rest
        # (None, flags, unbatched tensors) pass through unchanged.
        batched = tuple(isinstance(h, torch.Tensor) and h.dim() > 0 and h.shape[0] == batch for h in held)
        cfg = self.config
        n = grid.players.shape[-1] * grid.players.shape[-2]
        walked = math.factorial(n) if cfg.exact else cfg.permutations
        graph_bytes = walked * graph_bytes_per_permutation(images.stop - images.start, n) if create_graph else None
        return Game(
            layer=name, head=head, grid=grid, players=grid.players[images],
            baseline=baseline[images] if baseline.dim() else baseline,
            held=tuple(h[images] if b else h for h, b in zip(held, batched)), batched=batched,
            targets=tuple(targets[images]), images=images, scorer=Scorer(),
            planner=MemoryPlanner(cfg.memory_budget, cfg.batch_size, graph_bytes), permutations=cfg.permutations,
        )


class _Run:
    """The sampling run of one game: the ends, the path, the rounds, the stop checks, the results."""

    def __init__(self, engine: ShapleyEngine, game: Game, proof: Proof, seconds_before: float):
        self.engine, self.game, self.proof, self.config = engine, game, proof, engine.config
        self.clock = time.perf_counter() - seconds_before

    def results(self) -> list:
        """A ShapleyResult, or the failure message, per image of the game."""
        game, cfg = self.game, self.config
        report = _CostReport(game)
        with host_reads(game.device):  # the setup: the ends, the path and its check, the cost probe
            tick = _synchronized_clock(game.device)
            with torch.no_grad():  # reported as numbers
                ends = game.worth(torch.stack([game.base_map(), game.players], 1).flatten(0, 1))  # (b, 2)
            if not self.proof.walks_cheaply:  # else the walk and its check are quick whatever the head costs
                report.head_timed(_synchronized_clock(game.device) - tick, 2 * game.batch)
            evaluator = evaluator_for(game, self.proof)
            closed = evaluator.exact_values()
            if closed is not None:  # nothing to sample: zero permutations, zero standard errors
                estimate = RunningEstimate(game.batch, game.n, 1, game.device, True, game.planner.differentiable)
                estimate.total.copy_(closed.detach())
                if estimate.differentiable:
                    estimate.add_sums(closed)
                return self._results(estimate, ends, evaluator, None if cfg.tolerance is None else True)
            piloted = cfg.tolerance is not None and cfg.design == "latin" and not cfg.exact
            sampler = _Sampler(game, evaluator, cfg, PILOT_PERMUTATIONS if piloted else cfg.permutations, cfg.seed)
            if sampler.total > sampler.unit:
                report.probe(evaluator, sampler.schedule.projected_total, sampler.per_round, sampler.total)
        bar = tqdm(total=sampler.total, desc="permutations", unit="perm", disable=not self.engine.progress,
                   leave=False)
        with bar:
            sampler.run(bar, report, first_check_only=piloted)
            if piloted and not sampler.finished:
                # The pilot's first check projected what the tolerance needs: Latin blocks sized for
                # that many orders (several times fewer worth evaluations than small blocks) start a
                # fresh, independent run, unless the pilot's blocks are already that size.
                needed = sampler.schedule.projected_total
                main = _Sampler(game, evaluator, cfg, needed, _derived_seed(cfg.seed))
                if main.unit > sampler.unit:
                    bar.reset(main.total)
                    sampler = main
                sampler.run(bar, report)
        met = sampler.schedule.met()
        estimate = sampler.estimate
        if met is False:
            warnings.warn(f"shapcam_ext: the tolerance {cfg.tolerance} was not met at {game.layer!r} within "
                          f"{estimate.permutations} permutations (the cap); raise n_permutations, or accept the "
                          "larger error its standard errors show", RuntimeWarning, stacklevel=5)
        with host_reads(game.device):
            return self._results(estimate, ends, evaluator, met)

    def _results(self, estimate: RunningEstimate, ends: torch.Tensor, evaluator: Evaluator,
                 met: Optional[bool]) -> list:
        game = self.game
        mean = estimate.mean()
        se = estimate.std_error()
        finite = (torch.isfinite(mean).all(1) & torch.isfinite(estimate.total_sq).all(1)
                  & torch.isfinite(ends).all(1)).tolist()
        mean, ends = mean.cpu(), ends.double().cpu()
        # a differentiable map stays on the model's device, where a loss on it runs
        maps = estimate.differentiable_mean() if estimate.differentiable else mean
        se = None if se is None else se.cpu()
        seconds = time.perf_counter() - self.clock
        h, w = game.players.shape[-2:]
        out: list = []
        for i in range(game.batch):
            if not finite[i]:
                out.append(NON_FINITE_SCORE)
                continue
            empty, full = ends[i].tolist()
            shapley = maps[i].view(h, w)
            out.append(ShapleyResult(
                shapley=shapley,
                std_error=None if se is None else se[i].view(h, w),
                value_full=full,
                value_empty=empty,
                efficiency_gap=abs(float(mean[i].sum()) - (full - empty)),
                n_permutations=estimate.permutations,
                units=estimate.units,
                backend=backend_info()["backend"],
                seconds=seconds,
                layer=game.layer,
                target=game.targets[i],
                feature_map=game.grid.to_map(shapley),
                path=evaluator.path,
                tolerance_met=met,
            ))
        return out


class _Sampler:
    """One stream of permutations and its running estimate, sampled in rounds up to the cap.

    ``block_permutations``: the run length the stream's Latin blocks are sized for (the cap, or a
    tolerance's projected need); ``total``: the cap, in whole units.
    """

    def __init__(self, game: Game, evaluator: Evaluator, cfg: SamplingConfig, block_permutations: int,
                 seed: Optional[int]):
        self.game, self.evaluator = game, evaluator
        self.stream = (ExhaustiveStream(game.n, game.device) if cfg.exact
                       else PermutationStream(game.n, cfg.antithetic, seed, game.device, cfg.design,
                                              min(block_permutations, cfg.permutations)))
        self.unit = unit = self.stream.unit_size
        self.total = self.stream.total if self.stream.exhaustive else -(-cfg.permutations // unit) * unit
        self.estimate = RunningEstimate(game.batch, game.n, unit, game.device, self.stream.exhaustive,
                                        game.planner.differentiable)
        self.per_round = max(unit, evaluator.permutations_per_round(unit) // unit * unit)
        self.schedule = _StopSchedule(cfg.tolerance, unit, self.total)
        self.finished = False

    def run(self, bar, report: "_CostReport", first_check_only: bool = False) -> None:
        """Samples until the cap or a stop (``finished``), or (``first_check_only``) until the first
        stop check. The rounds never read the device; only the stop checks do."""
        estimate, schedule = self.estimate, self.schedule
        while estimate.permutations < self.total:
            count = min(self.per_round, self.total - estimate.permutations,
                        schedule.next_check - estimate.permutations)
            self.evaluator.accumulate(self.stream.take(count), estimate)
            estimate.permutations += count
            bar.update(count)
            if estimate.permutations >= schedule.next_check:
                with host_reads(self.game.device):
                    if schedule.stop(estimate):
                        break
                report.projected(schedule.projected_total)
                if first_check_only:
                    return
        self.finished = True


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
        self.stopped = False

    def stop(self, estimate: RunningEstimate) -> bool:
        if self.tolerance is None:
            return False
        bound = estimate.relative_error_bound()
        # NaN: the run has already failed; finishing it would not help.
        if bool(((bound < self.tolerance) | bound.isnan()).all()):
            self.stopped = True
            return True
        worst = float(bound.nan_to_num(nan=0.0).max())
        done = estimate.permutations
        needed = done * (worst / self.tolerance) ** 2 * 1.1 if math.isfinite(worst) else self.total
        self.projected_total = self._whole_units(min(max(needed, done + self.unit), self.total))
        self.next_check = self._whole_units(min(self.projected_total, 4 * done))
        return False

    def met(self) -> Optional[bool]:
        """Whether the run met its tolerance (None without one). A run whose cap came before any
        check, or at a check that failed, did not."""
        if self.tolerance is None:
            return None
        return self.stopped

    def _whole_units(self, permutations: float) -> int:
        return min(self.total, int(-(-permutations // self.unit) * self.unit))


class _CostReport:
    """Announces a long run's cost before it starts, from small timed pieces.

    First, from the two ends' head evaluations, unless a cheap walk is proven: when one
    permutation on the generic path (the probe, or an incremental walk's check) would itself take
    long, the whole generic projection is logged at once. Then a probe times the chosen path on one and on a batch of permutations (kept
    out of the estimate), a call's fixed cost and each permutation's, and the run's projection is
    logged if long: without a tolerance at once, with one
    at the first stop check, which projects how many permutations it needs. Device work is timed
    with a synchronisation around the probe only, so projections hold on CUDA too.
    """

    def __init__(self, game: Game):
        self.game = game
        self.per_permutation: Optional[float] = None
        self.done = False

    def head_timed(self, seconds: float, rows: int) -> None:
        g = self.game
        first = seconds / rows * g.coalitions_per_permutation
        if first * 10 > LONG_RUN_SECONDS:
            logger.warning(
                "Shap-CAM at %r: %d image(s), %d players: each permutation scores %d coalitions, %s on the generic "
                "path (%.3g ms per head evaluation, measured), so up to %s for %d permutations; checking for a "
                "faster exact path first. Lower n_permutations, set tolerance or group_size, or pick a coarser layer",
                g.layer, g.batch, g.n, g.n + 1, _duration(first), 1e3 * seconds / rows,
                _duration(first * g.permutations), g.permutations)

    @torch.no_grad()  # a timing, never part of a differentiable map's graph
    def probe(self, evaluator: Evaluator, projected_total: Optional[int], per_round: int, total: int) -> None:
        """Times the path on one order, then on a batch of them (at most a round, and a sixteenth of
        the run): the two separate a call's fixed cost from each permutation's."""
        g = self.game
        sizes = sorted({1, max(1, min(per_round, total // 16))})
        seconds = []
        for permutations in sizes:
            scratch = RunningEstimate(g.batch, g.n, 1, g.device)
            perms = torch.arange(g.n, device=g.device).expand(permutations, g.n).contiguous()
            tick = _synchronized_clock(g.device)
            evaluator.accumulate(perms, scratch)
            seconds.append(_synchronized_clock(g.device) - tick)
        if len(sizes) == 1:
            self.fixed, self.per_permutation = 0.0, seconds[0]
        else:
            self.per_permutation = max(seconds[1] - seconds[0], 0.0) / (sizes[1] - sizes[0])
            self.fixed = max(seconds[0] - self.per_permutation, 0.0)
        self.per_round, self.path = per_round, evaluator.path
        self.projected(projected_total)

    def projected(self, projected_total: Optional[int]) -> None:
        if self.done or projected_total is None or self.per_permutation is None:
            return
        self.done = True
        remaining = -(-projected_total // self.per_round) * self.fixed + projected_total * self.per_permutation
        if remaining <= LONG_RUN_SECONDS:
            return
        g = self.game
        logger.warning(
            "Shap-CAM at %r: %d image(s), %d players, %d permutations on the %s path: projected %s (%.3g ms per "
            "permutation, measured); lower n_permutations, set tolerance or group_size, or pick a coarser layer",
            g.layer, g.batch, g.n, projected_total, self.path, _duration(remaining),
            1e3 * remaining / projected_total, extra={"projected_seconds": remaining})


def _synchronized_clock(device: torch.device) -> float:
    """perf_counter after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        with host_reads(device):
            torch.cuda.synchronize(device)
    return time.perf_counter()


def _derived_seed(seed: Optional[int]) -> Optional[int]:
    """A second, independent seed from a run's seed (the golden-ratio increment of splitmix64)."""
    return None if seed is None else (seed + 0x9E3779B97F4A7C15) % 2**64


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"about {seconds:.0f} s"
    if seconds < 7200:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


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


__all__ = ["BatchError", "ShapleyEngine", "ShapleyResult", "check_input", "host_reads"]
