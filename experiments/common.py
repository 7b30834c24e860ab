"""What the distillation experiment shares with the results folder: where results go, the environment,
JSON and markdown output. (The ImageNet experiments are ``shapcam evaluate`` commands; see README.md.)"""
from __future__ import annotations

import json
import platform
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python experiments/x.py` from the repository root
    sys.path.insert(0, str(ROOT))

warnings.filterwarnings("ignore", message="shapcam_ext: the compiled library")  # reported once below

import shapcam_ext  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    return {
        "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "shapcam_ext": shapcam_ext.__version__, "shapcam_backend": shapcam_ext.backend_info()["backend"],
        "cpu": platform.processor() or platform.machine(),
    }


def save_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
