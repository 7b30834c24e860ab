"""Where each image's outputs go, and writing them so that nothing the user has is lost.

Every sample gets ``<key>_shapcam.png`` (the figure, unless figures are off) and
``<key>_shapcam.npz`` (the maps and the record) in the output folder, where the key is the
sample's unique name (its file stem, numbered when stems repeat; see
:class:`shapcam_ext.cli.datasets.Sample`). Files are written to a temporary name and renamed, so an
interrupted run never leaves a half-written output behind.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from shapcam_ext.cli.errors import CommandError
from shapcam_ext.engine import ShapleyResult

__all__ = ["Outputs", "check_out_folder", "plan_outputs", "write_array", "write_figure", "write_maps"]


@dataclass(frozen=True)
class Outputs:
    """The files one image's explanation writes (no figure: ``png`` is None)."""

    png: Optional[Path]
    npz: Path

    def files(self) -> list[Path]:
        """The files to write."""
        return [path for path in (self.png, self.npz) if path is not None]

    def existing(self) -> list[Path]:
        """Those of the files that are already there."""
        return [path for path in self.files() if path.exists()]


def check_out_folder(out: Path) -> None:
    """Check, before anything is computed, that the outputs can be written under ``out``.

    The folder itself is not created here: a run that fails to start leaves no trace.

    Raises:
        CommandError: ``out`` or one of its parents is a file, or the nearest existing folder
            is not writable.
    """
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file, not a folder; pass a folder (it is created if missing)")
    nearest = next(path for path in (out, *out.absolute().parents) if path.exists())
    if not nearest.is_dir():
        raise CommandError(f"--out {out}: {nearest} is a file, so the folder cannot be created; pass another folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise CommandError(f"--out {out}: no permission to write in {nearest}; pass a folder you can write to")


def plan_outputs(keys: Sequence[str], out: Path, figures: bool = True) -> list[Outputs]:
    """The outputs of each sample, in order, from the samples' unique keys; no PNG without ``figures``."""
    return [Outputs(out / f"{key}_shapcam.png" if figures else None, out / f"{key}_shapcam.npz") for key in keys]


def _write_atomically(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """``write`` into a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.part")  # open() applies the umask, as for any file
    try:
        with open(temporary, "wb") as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:  # an interrupt included: leave no partial file behind
        temporary.unlink(missing_ok=True)
        raise


def write_figure(figure, path: Path, dpi: int = 110) -> None:
    """Save a matplotlib figure as the PNG ``path``."""
    _write_atomically(path, lambda file: figure.savefig(file, format="png", dpi=dpi, facecolor="white"))


def write_array(path: Path, array: np.ndarray) -> None:
    """Save one array as the ``.npz`` file ``path`` (key ``map``), compressed."""
    _write_atomically(path, lambda file: np.savez_compressed(file, map=array))


def write_maps(path: Path, result: ShapleyResult, cam: np.ndarray, record: dict) -> None:
    """Save one explanation's arrays as the ``.npz`` file ``path``.

    Args:
        path: where to write.
        result: the image's ShapleyResult; its signed map and standard errors are saved as
            ``shapley`` and ``std_error`` (float64, h x w; std_error NaN when undefined).
        cam: the [0, 1] map at input resolution, as the overlay shows it, saved as ``cam``.
        record: the image's record, saved as the JSON text ``record`` (``np.load(path)["record"]``).

    Raises:
        ValueError: the record holds a non-finite number (JSON has no NaN).
    """
    metadata = json.dumps(record, allow_nan=False)
    arrays = {
        "shapley": result.shapley.numpy(),
        "std_error": (result.std_error if result.std_error is not None else torch.full_like(result.shapley, math.nan)
                      ).numpy(),
        "cam": cam.astype(np.float32), "record": np.array(metadata),
    }
    _write_atomically(path, lambda file: np.savez_compressed(file, **arrays))
