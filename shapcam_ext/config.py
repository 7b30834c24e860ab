"""How the Shapley values are sampled: the one source of the settings, their defaults, their
validation and their help text.

``ShapCAM``, the adapters and the CLI all build a :class:`SamplingConfig`; the CLI derives its
sampling options (flag, default, help) from the fields' metadata, so a default is written once.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from shapcam_ext.sampling import DESIGNS

MiB = 1 << 20
DEFAULT_PERMUTATIONS = 256  # a fixed-K run
DEFAULT_PERMUTATION_CAP = 4096  # the cap of a run with a tolerance
MAX_SEED = 2**64


def _setting(default: Any, help: str, flag: Optional[str] = None, metavar: Optional[str] = None) -> Any:
    """A field with its help text; ``flag``: the CLI option that sets it (None: not on the CLI)."""
    return field(default=default, metadata={"help": help, "flag": flag, "metavar": metavar})


@dataclass(frozen=True)
class SamplingConfig:
    """How the Shapley values are estimated. Every field's meaning is its ``help`` metadata (below).

    Build one with keywords, or change one with ``dataclasses.replace(config, seed=3)``; either way
    :meth:`validate` (called by every consumer) names a bad setting and its fix.
    """

    n_permutations: Optional[int] = _setting(
        None, "permutations to sample, rounded up to whole units (a Latin block, an antithetic pair); with a "
              f"tolerance, the cap. Default {DEFAULT_PERMUTATIONS}, or {DEFAULT_PERMUTATION_CAP} with a tolerance",
        "--permutations", "K")
    design: str = _setting(
        "latin", "how permutations are drawn: 'latin' stratifies them by position with randomised Latin squares "
                 "(several times fewer permutations for the same error), 'iid' draws them independently",
        "--design")
    antithetic: bool = _setting(True, "follow each permutation by its reverse", "--antithetic")
    seed: Optional[int] = _setting(
        0, "seeds the permutations, an int in [0, 2**64); the same seed gives bit-identical maps on the CPU; "
           "None draws a fresh seed", "--seed", "S")
    tolerance: Optional[float] = _setting(
        None, "stop once every image's relative L2 error is below it with 90% confidence", "--tolerance", "E")
    exact: bool = _setting(False, "average over all n! orders instead of sampling (n <= 8 players)")
    baseline: Any = _setting(
        0.0, "value of removed positions: a finite number, or a tensor broadcastable to (C, h, w)", "--baseline",
        "VALUE")
    group_size: int = _setting(
        1, "g: each g x g cell of the feature map is one player (for large maps); the map then holds one "
           "value per cell", "--group-size", "G")
    memory_budget: int = _setting(1024 * MiB, "bytes one chunk of work may allocate")
    batch_size: Optional[int] = _setting(None, "head evaluations per chunk; overrides the budget-derived size")
    fast_path: bool = _setting(
        True, "take an exact shortcut when the head's graph proves one (see shapcam_ext.paths); False forces "
              "the generic path")

    @property
    def permutations(self) -> int:
        """The permutations to run (the cap with a tolerance)."""
        if self.n_permutations is not None:
            return self.n_permutations
        return DEFAULT_PERMUTATION_CAP if self.tolerance is not None else DEFAULT_PERMUTATIONS

    def replace(self, **overrides: Any) -> "SamplingConfig":
        """A copy with ``overrides``, validated.

        Raises:
            TypeError: an unknown setting (named, with the known ones), or a bad type.
            ValueError: a value out of range.
        """
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown sampling setting(s) {', '.join(unknown)}; the settings are "
                            f"{', '.join(sorted(known))}")
        config = dataclasses.replace(self, **overrides)
        config.validate()
        return config

    def validate(self) -> None:
        """Raises TypeError for a wrong type, ValueError for a value out of range; each names the
        setting and what it should be."""
        if self.n_permutations is not None:
            _check_int("n_permutations", self.n_permutations, minimum=1)
        _check_int("group_size", self.group_size, minimum=1)
        _check_int("memory_budget", self.memory_budget, minimum=1, unit="bytes")
        if self.batch_size is not None:
            _check_int("batch_size", self.batch_size, minimum=1)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
            if self.seed >= MAX_SEED:
                raise ValueError(f"seed must be below 2**64, got {self.seed}; pass a smaller seed")
        if self.design not in DESIGNS:
            raise ValueError(f"design must be one of {', '.join(map(repr, DESIGNS))}, got {self.design!r}")
        for name in ("antithetic", "exact", "fast_path"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.tolerance is not None:
            if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, numbers.Real):
                raise TypeError(f"tolerance must be a number, got {type(self.tolerance).__name__}")
            if not 0 < self.tolerance < math.inf:
                raise ValueError(f"tolerance must be > 0, got {self.tolerance}; use None for a fixed n_permutations")
            if self.exact:
                raise ValueError("exact=True has no sampling error to stop on; drop tolerance (or exact)")
        baseline = torch.as_tensor(self.baseline) if not isinstance(self.baseline, torch.Tensor) else self.baseline
        if not baseline.is_floating_point() and baseline.dtype not in (torch.int64, torch.int32, torch.bool):
            raise TypeError(f"baseline must be a number or a float tensor, got {baseline.dtype}")
        if not bool(torch.isfinite(baseline.float()).all()):
            raise ValueError("baseline has NaN or Inf values; pass a finite baseline (0 removes a position)")


def _check_int(name: str, value: Any, minimum: int, unit: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int{' number of ' + unit if unit else ''}, got "
                        f"{type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


__all__ = ["DEFAULT_PERMUTATIONS", "DEFAULT_PERMUTATION_CAP", "MAX_SEED", "SamplingConfig"]
