"""Localisation (paper §4.2): the energy-based pointing game on hand-annotated boxes.

Each object of experiments/boxes.json (boxes drawn by hand on the bundled photos) is explained
for its annotated ImageNet class, as the paper explains the ground-truth class of ILSVRC boxes.
Boxes are mapped into the 224 x 224 model input with the same resize/crop as the photo, and each
method scores the share of its map's energy inside them (shapcam_ext.metrics.energy_pointing_game).

    python experiments/pointing_game.py            # all objects, K = 256 Shap-CAM permutations
    python experiments/pointing_game.py --quick    # the chelsea, coffee and rocket objects, K = 32
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common import (
    METHODS, MODEL, MapCache, box_to_input, class_probs, environment, load_lite0, load_photos,
    map_arguments, markdown_table, parse_map_arguments, random_map, save_json, save_map_grid,
)
from shapcam_ext.metrics import box_mask, energy_pointing_game

BOXES = Path(__file__).resolve().parent / "boxes.json"
QUICK_IMAGES = ["chelsea", "coffee", "rocket"]


def parse_args():
    p = map_arguments(__doc__, f"objects of {QUICK_IMAGES}", "pointing_game")
    p.add_argument("--boxes", default=str(BOXES), help="hand-annotated boxes (original-image pixels)")
    p.add_argument("--max-area", type=float, default=0.5,
                   help="the paper's subset: objects covering at most this share of the input")
    return parse_map_arguments(p, QUICK_IMAGES)


def save_figure(path, objects, photos, maps, scores):
    rows = [(photos[o["image"]].rgb, f"{o['image']}\n{o['label']} (box {o['area']:.0%})",
             [(maps[m][i], f"{m}\nenergy in box {scores[m][i]:.2f}") for m in METHODS])
            for i, o in enumerate(objects)]
    save_map_grid(path, rows, f"{MODEL}, layer bn2: energy-based pointing game on hand-drawn boxes",
                  boxes=[o["input_boxes"] for o in objects])


def main():
    args = parse_args()
    started = time.perf_counter()
    model, cfg, layer = load_lite0()
    annotation = json.loads(Path(args.boxes).read_text())
    objects = [o for o in annotation["objects"] if not args.images or o["image"] in args.images]
    photos = {p.name: p for p in load_photos(cfg, sorted({o["image"] for o in objects}))}
    size = cfg.input_size
    for obj in objects:
        obj["input_boxes"] = [box_to_input(b, photos[obj["image"]].size, cfg) for b in obj["boxes"]]
        obj["area"] = float(box_mask(size, obj["input_boxes"]).mean())
        x = photos[obj["image"]].x
        obj["probability"] = float(class_probs(model, x, [obj["class_index"]])[0])
        with torch.no_grad():
            obj["top1"] = int(model(x).argmax())

    cache = MapCache(Path(args.cache_dir) if args.cache_dir else None)
    settings = dict(n_permutations=args.n_permutations, seed=args.seed, scorecam_batch=args.scorecam_batch)
    maps = {m: [None] * len(objects) for m in METHODS}
    infos = {m: [None] * len(objects) for m in METHODS}
    jobs = [(m, i) for i in range(len(objects)) for m in METHODS]
    for method, i in tqdm(jobs, desc="maps", unit="map"):
        obj = objects[i]
        maps[method][i], infos[method][i] = cache.get(method, model, layer, photos[obj["image"]], obj["class_index"],
                                                      **settings)

    scores = {m: [energy_pointing_game(maps[m][i], o["input_boxes"]) for i, o in enumerate(objects)] for m in METHODS}
    rng = np.random.default_rng(args.seed)
    random_scores = np.array([[energy_pointing_game(random_map(size, 7, rng), o["input_boxes"]) for o in objects]
                              for _ in range(args.random_maps)])  # (maps, objects)
    small = np.array([o["area"] <= args.max_area for o in objects])

    def mean(values, subset):
        values = np.asarray(values)[..., subset]
        return float(values.mean()) * 100 if values.size else float("nan")

    rows = [[m, mean(scores[m], np.ones_like(small)), mean(scores[m], small),
             float(np.mean([inf["seconds"] for inf in infos[m]]))] for m in METHODS]
    rows.append(["Random 7x7", mean(random_scores, np.ones_like(small)), mean(random_scores, small), 0.0])
    rows.append(["Box area (uniform map)", mean([o["area"] for o in objects], np.ones_like(small)),
                 mean([o["area"] for o in objects], small), 0.0])
    header = ["method", f"proportion % (all {len(objects)})", f"proportion % (box <= {args.max_area:.0%}: {small.sum()})",
              "s/map"]
    table = markdown_table(header, rows)
    per_object = markdown_table(
        ["image", "class", "p(class)", "top-1?", "box area %"] + list(METHODS),
        [[o["image"], o["label"], o["probability"], "yes" if o["top1"] == o["class_index"] else "no", o["area"] * 100]
         + [scores[m][i] * 100 for m in METHODS] for i, o in enumerate(objects)],
    )
    print(f"\n{MODEL}, layer {layer}, {len(objects)} hand-annotated objects; Shap-CAM K = {args.n_permutations}")
    print(table)
    print()
    print(per_object)

    save_json(Path(args.out), {
        "experiment": "energy-based pointing game (paper §4.2)", "model": MODEL, "layer": layer,
        "settings": vars(args), "boxes_note": annotation["note"], "environment": environment(),
        "table_markdown": table, "per_object_markdown": per_object,
        "summary": {r[0]: {"all": r[1], "small": r[2]} for r in rows},
        "objects": [
            {**{k: o[k] for k in ("image", "label", "class_index", "boxes", "input_boxes", "area", "probability", "top1")},
             "energy": {m: scores[m][i] for m in METHODS}, "random_energy_mean": float(random_scores[:, i].mean()),
             "methods": {m: infos[m][i] for m in METHODS}}
            for i, o in enumerate(objects)
        ],
        "wall_seconds": time.perf_counter() - started,
    })
    save_figure(args.figure, objects, photos, maps, scores)
    print(f"wrote {args.out} and {args.figure} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
