"""An evaluation's results: per-method summaries, a markdown table laid out like the paper's, a figure.

The table has one column per method, in the order of the paper's Table 1, and one row per metric
(Tables 1-3 of the paper put the methods in columns too). The best value of each metric row is in
bold (unless all are equal). The pointing-game rows follow §4.2: all samples with boxes of their explained class, and the
paper's subset, samples with a single box covering at most ``max_box_area`` of the input.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from shapcam_ext.cli.methods import METHODS
from shapcam_ext.metrics import average_drop, increase_in_confidence

__all__ = ["evaluation_figure", "markdown_table", "summarise"]


def _mean(values: list) -> Optional[float]:
    return float(np.mean(values)) if values else None


def summarise(records: Sequence[dict], method: str, keep_fractions: Sequence[float], max_box_area: float) -> dict:
    """One method's figures over its scored records.

    Returns:
        ``images``, ``failed``, ``seconds_per_image``; per keep fraction ``average_drop`` and
        ``increase_in_confidence`` (%); ``deletion_auc``, ``insertion_auc``; ``pointing_game`` and
        ``pointing_game_subset`` (%), with ``boxes`` and ``boxes_subset`` (their sample counts) and
        ``box_area`` (% of the input that a uniform map would score). None where nothing was measured.
    """
    mine = [r for r in records if r["method"] == method]
    scored = [r for r in mine if r["status"] == "scored"]
    summary: dict = {"images": len(scored), "failed": len(mine) - len(scored),
                     "seconds_per_image": _mean([r["seconds"] for r in scored])}
    for keep in keep_fractions:
        pairs = [(r["probability"], r["explanation_probability"][f"{keep:g}"]) for r in scored
                 if f"{keep:g}" in r.get("explanation_probability", {})]
        y, o = zip(*pairs) if pairs else ((), ())
        summary[f"average_drop@{keep:g}"] = average_drop(y, o) if pairs else None
        summary[f"increase_in_confidence@{keep:g}"] = increase_in_confidence(y, o) if pairs else None
    for name in ("deletion_auc", "insertion_auc"):
        summary[name] = _mean([r[name] for r in scored if name in r])
    boxed = [r for r in scored if r.get("energy") is not None]
    subset = [r for r in boxed if r["box_count"] == 1 and r["box_area"] <= max_box_area]
    for suffix, chosen in (("", boxed), ("_subset", subset)):
        energy = _mean([r["energy"] for r in chosen])
        summary[f"pointing_game{suffix}"] = None if energy is None else 100 * energy
        summary[f"boxes{suffix}"] = len(chosen)
        area = _mean([r["box_area"] for r in chosen])
        summary[f"box_area{suffix}"] = None if area is None else 100 * area
    return summary


def _rows(summaries: dict, keep_fractions: Sequence[float], max_box_area: float) -> list[tuple[str, str, bool]]:
    """(summary key, row title, higher is better) of the rows that have a value for some method."""
    rows = []
    for keep in keep_fractions:
        where = "" if keep == 1 else f", top {keep:.0%} of the map"
        rows += [(f"average_drop@{keep:g}", f"Average Drop (%){where} ↓", False),
                 (f"increase_in_confidence@{keep:g}", f"Increase in Confidence (%){where} ↑", True)]
    any_summary = next(iter(summaries.values()))
    rows += [("deletion_auc", "Deletion AUC ↓", False), ("insertion_auc", "Insertion AUC ↑", True),
             ("pointing_game", f"Energy pointing game (%), {any_summary['boxes']} samples with boxes ↑", True),
             ("pointing_game_subset", f"Energy pointing game (%), one box ≤ {max_box_area:.0%} of the image: "
                                      f"{any_summary['boxes_subset']} samples ↑", True)]
    return [row for row in rows if any(s[row[0]] is not None for s in summaries.values())]


def _cell(value: Optional[float], digits: int, best: bool) -> str:
    if value is None:
        return "–"
    text = f"{value:.{digits}f}"
    return f"**{text}**" if best else text


def markdown_table(summaries: dict, keep_fractions: Sequence[float], max_box_area: float) -> str:
    """The table: one column per method (``summaries``: method name -> :func:`summarise`), one row per metric."""
    methods = [m for m in METHODS if m in summaries]
    lines = ["| Method | " + " | ".join(METHODS[m].title for m in methods) + " |",
             "|---|" + "---|" * len(methods)]
    for key, title, higher in _rows(summaries, keep_fractions, max_box_area):
        values = [summaries[m][key] for m in methods]
        digits = 3 if key.endswith("auc") else 2
        present = [round(v, digits) for v in values if v is not None]
        target = (max if higher else min)(present) if len(set(present)) > 1 else math.nan  # no bold for a tie of all
        lines.append(f"| {title} | " + " | ".join(
            _cell(v, digits, v is not None and round(v, digits) == target) for v in values) + " |")
    lines.append("| images scored (failed) | " + " | ".join(
        f"{summaries[m]['images']}" + (f" ({summaries[m]['failed']})" if summaries[m]["failed"] else "")
        for m in methods) + " |")
    lines.append("| seconds per image | " + " | ".join(
        _cell(summaries[m]["seconds_per_image"], 3, False) for m in methods) + " |")
    return "\n".join(lines)


def evaluation_figure(rows: list[tuple[np.ndarray, str, list, list[tuple[str, np.ndarray]]]]):
    """One row per sample: the input as the model sees it, then each method's overlay, boxes drawn on all.

    Args:
        rows: per sample (rgb (H, W, 3) in [0, 1], title, boxes in input pixels, [(method title, map), ...]).

    Returns:
        A matplotlib Figure on an Agg canvas.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from shapcam_ext.cli.overlay import heatmap_overlay

    columns = 1 + max(len(panels) for *_, panels in rows)
    fig = Figure(figsize=(2.2 * columns, 2.4 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for ax_row, (rgb, title, boxes, panels) in zip(axes, rows):
        images = [(rgb, title)] + [(heatmap_overlay(rgb, heat), name) for name, heat in panels]
        for j, (ax, (image, name)) in enumerate(zip(ax_row, images)):
            ax.imshow(image)
            ax.set_title(name, fontsize=7)
            for x0, y0, x1, y1 in boxes:
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, linewidth=1.2,
                                       edgecolor="lime" if j == 0 else "white"))
        for ax in ax_row:
            ax.set_axis_off()
    return fig
