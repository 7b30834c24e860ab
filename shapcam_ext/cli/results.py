"""An evaluation's folder: its settings, one JSON line per (sample, method), and each map.

``run.json`` holds the settings the results depend on; ``records.jsonl`` one record per scored or
failed (sample, method), appended as they finish; ``maps/<key>__<method>.npz`` each map (float16,
written before its record, so a record's map always exists). An interrupted run leaves at worst
one torn last line, which resuming drops. A later record of a pair supersedes an earlier one
(a failure retried on resume).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from shapcam_ext.cli.errors import CommandError
from shapcam_ext.cli.outputs import write_array

__all__ = ["ResultStore"]

REPORT_FILES = ("evaluation.json", "evaluation.md", "evaluation.png")


class ResultStore:
    """The files of one evaluation in ``out``."""

    def __init__(self, out: Path):
        self.out = out
        self.settings_path = out / "run.json"
        self.records_path = out / "records.jsonl"
        self.maps = out / "maps"

    def map_path(self, key: str, method: str) -> Path:
        """Where the map of ``key`` by ``method`` is saved."""
        return self.maps / f"{key}__{method}.npz"

    def check(self, resume: bool, overwrite: bool) -> None:
        """Before anything is computed: an existing evaluation needs --resume or --overwrite.

        Raises:
            CommandError: ``out`` holds an evaluation and neither flag is given, or both are.
        """
        if resume and overwrite:
            raise CommandError("--resume continues the evaluation in --out and --overwrite replaces it; pass one")
        if (self.settings_path.exists() or self.records_path.exists()) and not (resume or overwrite):
            raise CommandError(f"--out {self.out} holds an evaluation; pass --resume to continue it or --overwrite "
                               "to start over (or another --out)")

    def start(self, settings: dict, resume: bool) -> Optional[str]:
        """Begin (or, with ``resume``, continue) the evaluation; returns why it cannot, or None.

        Starting over removes this store's files (only those). Resuming needs the settings the
        results were made with; the methods may differ (new ones are computed, others ignored).
        """
        if resume and not self.settings_path.exists() and self.records_path.exists():
            return (f"--resume: {self.records_path} has no {self.settings_path.name} beside it, so its settings are "
                    "unknown; pass --overwrite to start over")
        if resume and self.settings_path.exists():
            stored = json.loads(self.settings_path.read_text())
            changed = sorted(k for k in set(stored) | set(settings)
                             if k != "methods" and stored.get(k) != settings.get(k))
            if changed:
                return (f"--resume: {', '.join(f'{k} was {stored.get(k)!r}, now {settings.get(k)!r}' for k in changed)};"
                        " pass the same settings, or --overwrite to start over")
            self._drop_torn_line()
        else:
            for path in (self.settings_path, self.records_path, *(self.out / name for name in REPORT_FILES)):
                path.unlink(missing_ok=True)
            shutil.rmtree(self.maps, ignore_errors=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.settings_path.write_text(json.dumps(settings, indent=2) + "\n")
        return None

    def _drop_torn_line(self) -> None:
        if not self.records_path.exists():
            return
        data = self.records_path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.records_path, "r+b") as file:
                file.truncate(data.rfind(b"\n") + 1)

    def records(self) -> list[dict]:
        """The latest record of each (key, method), in file order of first appearance."""
        latest: dict = {}
        if self.records_path.exists():
            for line in self.records_path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a torn last line
                    continue
                latest[(record["key"], record["method"])] = record
        return list(latest.values())

    def scored(self) -> set[tuple[str, str]]:
        """The (key, method) pairs with a scored record."""
        return {(r["key"], r["method"]) for r in self.records() if r["status"] == "scored"}

    def add(self, records: Iterable[dict], maps: Iterable[tuple[str, str, np.ndarray]]) -> None:
        """Save maps (key, method, (H, W) float16 array), then append their records as JSON lines, in one write."""
        for key, method, heat in maps:
            write_array(self.map_path(key, method), heat)
        text = "".join(json.dumps(record, allow_nan=False) + "\n" for record in records)
        if text:
            with open(self.records_path, "a") as file:
                file.write(text)
