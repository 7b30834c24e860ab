"""One record per image, printed on stdout the moment the image is done.

With ``--json`` each record is one line of JSON (JSON Lines), so an interrupted or failed run
still leaves a valid stream of what finished; otherwise it is a short text block. Every record
has the keys ``schema_version``, ``status`` (``"explained"``, ``"kept"`` or ``"failed"``),
``image``, ``png``, ``npz`` and ``error``; an explained image's record adds the model, layer,
target, top-5 classes, the run's figures and the signed map (see ``explain.explained_record``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from shapcam_ext.cli.outputs import Outputs

__all__ = ["SCHEMA_VERSION", "RecordPrinter", "new_record"]

SCHEMA_VERSION = 1


def new_record(status: str, image: Path, outputs: Optional[Outputs] = None, error: Optional[str] = None,
               **fields) -> dict:
    """A record with the keys every status has, then ``fields``.

    Args:
        status: ``"explained"``, ``"kept"`` (its outputs existed; nothing computed) or ``"failed"``.
        image: the input file.
        outputs: the image's output files (None when it failed).
        error: the one-line message of a failure.
        fields: the explanation's figures, for ``"explained"``.
    """
    return {
        "schema_version": SCHEMA_VERSION, "status": status, "image": str(image),
        "png": str(outputs.png) if outputs and outputs.png else None, "npz": str(outputs.npz) if outputs else None,
        "error": error, **fields,
    }


def _as_text(record: dict, position: str) -> str:
    lines = [f"[{position}] {record['image']}"]
    if record["status"] == "failed":
        return "\n".join(lines + [f"  failed   {record['error']}"])
    if record["status"] == "kept":
        files = " and ".join(record[kind] for kind in ("png", "npz") if record[kind])
        kept = f"  kept     {files} (already there; --overwrite recomputes)"
        return "\n".join(lines + [kept])
    for rank, entry in enumerate(record["top5"]):
        lines.append(f"  {'top-5' if rank == 0 else '':8} {entry['probability']:6.1%}  {entry['name']}")
    lines.append(f"  target   {record['target']['index']} {record['target']['name']} (softmax probability)")
    std_error = "undefined" if record["max_std_error"] is None else f"{record['max_std_error']:.2g}"
    lines.append(
        f"  run      {record['n_permutations']} permutations · max std error {std_error} · "
        f"efficiency gap {record['efficiency_gap']:.1e} · {record['seconds']:.3g} s · "
        f"layer {record['layer']} · {record['backend']} backend"
    )
    if record["compare"]:
        times = ", ".join(f"{method} {entry['seconds']:.1f} s" for method, entry in record["compare"].items())
        lines.append(f"  compare  {times}")
    lines.append(f"  saved    {', '.join(record[kind] for kind in ('png', 'npz') if record[kind])}")
    return "\n".join(lines)


class RecordPrinter:
    """Prints records on stdout as JSON Lines (``as_json``) or text, flushed one by one.

    Args:
        as_json: one compact JSON document per line instead of text blocks.
        total: the number of images of the run (text shows ``[i/total]``).
    """

    def __init__(self, as_json: bool, total: int):
        self.as_json = as_json
        self.total = total

    def print(self, record: dict, index: int) -> None:
        """Print the record of image ``index`` (0-based).

        Raises:
            ValueError: the record holds a non-finite number; JSON has no NaN, so one is a bug.
        """
        text = json.dumps(record, allow_nan=False) if self.as_json else _as_text(record, f"{index + 1}/{self.total}")
        # one write per record, so an interrupt cannot split a line; tqdm keeps it above any bar
        tqdm.write(text + "\n", file=sys.stdout, end="")
        sys.stdout.flush()  # a pipe must see each record as soon as it is done
