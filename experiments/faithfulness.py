"""Faithfulness (paper §4.1): Average Drop and Increase in Confidence on real photos.

Each bundled photo is explained for the real EfficientNet-Lite0's top-1 class by Grad-CAM,
Grad-CAM++, Score-CAM (pytorch-grad-cam) and Shap-CAM, all on layer bn2. The photo is multiplied
by each map (shapcam_ext.metrics.explanation_input), optionally keeping only the map's top
pixels, and the class probability on that input (O) is compared with the original one (Y).

    python experiments/faithfulness.py            # all photos, K = 256 Shap-CAM permutations
    python experiments/faithfulness.py --quick    # 3 photos, K = 32
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common import (
    METHODS, MODEL, MapCache, class_probs, environment, load_lite0, load_photos, markdown_table,
    map_arguments, parse_map_arguments, random_map, save_json, save_map_grid,
)
from shapcam_ext.metrics import average_drop, explanation_input, increase_in_confidence
from shapcam_ext.cli.models import imagenet_classes

QUICK_IMAGES = ["chelsea", "coffee", "rocket"]


def parse_args():
    p = map_arguments(__doc__, f"photos {QUICK_IMAGES}", "faithfulness")
    p.add_argument("--keep-fractions", type=float, nargs="*", default=[1.0, 0.5, 0.2],
                   help="fractions of each map's pixels kept positive (1.0 = the whole map, Grad-CAM++'s protocol)")
    return parse_map_arguments(p, QUICK_IMAGES)


def scores_under(model, cfg, photos, classes, maps, keep) -> np.ndarray:
    """O for each photo: the class probability on the photo seen through its map."""
    x = torch.cat([p.x for p in photos])
    masked = explanation_input(x, np.stack(maps), cfg.mean, cfg.std, keep_fraction=None if keep >= 1 else keep)
    return class_probs(model, masked, classes)


def save_figure(path, photos, labels, maps, scores, y, keep):
    rows = [(photo.rgb, f"{photo.name}\n{labels[i]} Y={y[i]:.2f}",
             [(maps[m][i], f"{m}\nO={scores[m][i]:.2f} (keep {keep:g})") for m in METHODS])
            for i, photo in enumerate(photos)]
    save_map_grid(path, rows, f"{MODEL} (real ImageNet weights), layer bn2: maps for the top-1 class")


def main():
    args = parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    model, cfg, layer = load_lite0()
    photos = load_photos(cfg, args.images)
    names = imagenet_classes()
    x = torch.cat([p.x for p in photos])
    with torch.no_grad():
        top = model(x).softmax(-1).max(-1)
    classes, y = top.indices.tolist(), top.values.double().numpy()
    labels = [names[c] for c in classes]

    cache = MapCache(Path(args.cache_dir) if args.cache_dir else None)
    settings = dict(n_permutations=args.n_permutations, seed=args.seed, scorecam_batch=args.scorecam_batch)
    maps = {m: [] for m in METHODS}
    infos = {m: [] for m in METHODS}
    jobs = [(m, i) for i in range(len(photos)) for m in METHODS]
    for method, i in tqdm(jobs, desc="maps", unit="map"):
        heat, info = cache.get(method, model, layer, photos[i], classes[i], **settings)
        maps[method].append(heat)
        infos[method].append(info)

    rng = np.random.default_rng(args.seed)
    size = tuple(x.shape[-2:])
    random_sets = [[random_map(size, 7, rng) for _ in photos] for _ in range(args.random_maps)]

    per_keep = {}
    for keep in tqdm(args.keep_fractions, desc="keep fractions"):
        o = {m: scores_under(model, cfg, photos, classes, maps[m], keep) for m in METHODS}
        rand = [scores_under(model, cfg, photos, classes, maps_r, keep) for maps_r in random_sets]
        summary = {m: {"average_drop": average_drop(y, o[m]), "increase_in_confidence": increase_in_confidence(y, o[m])}
                   for m in METHODS}
        drops = [average_drop(y, r) for r in rand]
        incs = [increase_in_confidence(y, r) for r in rand]
        summary["Random 7x7"] = {"average_drop": float(np.mean(drops)), "average_drop_std": float(np.std(drops)),
                                 "increase_in_confidence": float(np.mean(incs)),
                                 "increase_in_confidence_std": float(np.std(incs))}
        per_keep[keep] = {"summary": summary, "O": {m: o[m].tolist() for m in METHODS}}

    header = ["method"] + [f"{k} keep {f:g}" for f in args.keep_fractions for k in ("AD%", "IC%")] + ["s/image"]
    rows = []
    for method in (*METHODS, "Random 7x7"):
        row = [method]
        for keep in args.keep_fractions:
            s = per_keep[keep]["summary"][method]
            row += [s["average_drop"], s["increase_in_confidence"]]
        seconds = [inf["seconds"] for inf in infos[method]] if method in infos else [0.0]
        row.append(float(np.mean(seconds)))
        rows.append(row)
    table = markdown_table(header, rows)
    print(f"\n{MODEL}, layer {layer}, {len(photos)} photos, top-1 class; Shap-CAM K = {args.n_permutations}")
    print(table)
    cached = sum(inf["cached"] for m in METHODS for inf in infos[m])
    if cached:
        print(f"({cached} maps came from the cache {args.cache_dir}; their seconds are those of the run that made them)")

    save_json(Path(args.out), {
        "experiment": "faithfulness (paper §4.1)", "model": MODEL, "layer": layer, "settings": vars(args),
        "targets": {"GradCAM": "logit (pytorch-grad-cam default)", "GradCAM++": "logit", "ScoreCAM": "logit",
                    "ShapCAM": "softmax probability"},
        "environment": environment(), "table_markdown": table,
        "summary": {str(k): v["summary"] for k, v in per_keep.items()},
        "images": [
            {"name": p.name, "class_index": classes[i], "label": labels[i], "Y": float(y[i]),
             "O": {str(k): {m: per_keep[k]["O"][m][i] for m in METHODS} for k in args.keep_fractions},
             "methods": {m: infos[m][i] for m in METHODS}}
            for i, p in enumerate(photos)
        ],
        "wall_seconds": time.perf_counter() - started,
    })
    keep = args.keep_fractions[0]
    save_figure(args.figure, photos, labels, maps, {m: per_keep[keep]["O"][m] for m in METHODS}, y, keep)
    print(f"wrote {args.out} and {args.figure} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
