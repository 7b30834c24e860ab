"""ViT-S/16 and DeiT-S at ``blocks[-1].norm1`` (n = 196 tokens; issue 16): the class-token walk
against the generic path on the same permutations, its time to 2% error, and pytorch-grad-cam's
GradCAM on the same layer with the same reshape_transform.

No ViT weights install offline, so the weights are random, in two settings that bracket how hard
the game is (the time per permutation does not depend on them, the error does):

* ``timm-init``: timm's initialisation as constructed: near-uniform attention, a nearly additive game;
* ``peaked``: every weight drawn at unit scale (std fan_in^-1/2, vectors std 1/2) and every block's
  queries and keys 2x larger: attention logits of std ~4, peaked attention, tokens that compete.

Per model and setting, on scikit-image's cat with timm's preprocessing, the softmax probability of
the top class:

* per permutation: the generic path's time on one antithetic pair (seed 0), the walk's on the same
  permutations and the largest difference of their maps; the walk's time per permutation at
  K = 512 (rounded up to whole latin blocks), where its set-up (trunk, self-check, memory plan) is
  amortised;
* error ladder: K = 2, 8, 32, ..., 2048 (the default latin antithetic design) until the error is
  below half the goal; the relative L2 error of the signed map from pairs of seeds, without a reference
  (bench_estimators --pairs' method: for independent seeds E||phi_a - phi_b||^2 = 2 MSE(K), MSE the sum
  over players of the sample variance over seeds; ||phi||^2 = ||mean over seeds||^2 - MSE / seeds); time:
  the median over seeds of one explain call (trunk included, tracing excluded); time to 2%
  interpolated on the ladder, extrapolated past it as error ~ K^-1/2 (bench_scenarios.time_to_goal);
* GradCAM: the median of 7 calls after a warm-up.

    python bench/bench_tokens.py [--quick] [--models vit_small_patch16_224 deit_small_patch16_224] [--seeds 4]

Run with OMP_NUM_THREADS=1 on a shared machine (recorded, with the load average, in the JSON).
Prints tables; writes bench/results/tokens_cpu.json and tokens_cpu.md (_quick with --quick).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import warnings

import torch

from bench_estimators import mse_pairs
from bench_scenarios import ROOT, fmt, print_table, time_to_goal, timed

from shapcam_ext import ShapCAM, backend_info  # noqa: E402  (bench_scenarios puts the checkout first)
from shapcam_ext.cli.images import bundled_photos, load_image  # noqa: E402
from shapcam_ext.cli.models import load_model  # noqa: E402
from shapcam_ext.cli.preprocessing import preprocess  # noqa: E402
from shapcam_ext.targets import ClassifierOutputSoftmaxTarget  # noqa: E402

GOAL = 0.02
MODELS = ("vit_small_patch16_224", "deit_small_patch16_224")
SETTINGS = ("timm-init", "peaked")
LADDER, LADDER_QUICK = (2, 8, 32, 128, 512, 2048), (2, 8, 32)
WALK_K = 512  # the walk's time per permutation is taken at this K
PEAKED_QK = 2.0  # how much larger the peaked setting's queries and keys are


def reshape_transform(tensor: torch.Tensor, size: int = 14) -> torch.Tensor:
    """pytorch-grad-cam's ViT reshape_transform: the class token dropped, 196 tokens as 14 x 14."""
    return tensor[:, 1:, :].reshape(tensor.size(0), size, size, tensor.size(2)).permute(0, 3, 1, 2)


def vit(name: str, setting: str):
    """(model, input): random weights in ``setting``; scikit-image's cat, timm's preprocessing."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random weights": that is the point here
        model, cfg = load_model(f"timm:{name}")
    if setting == "peaked":
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0, param.shape[-1] ** -0.5 if param.dim() > 1 else 0.5)
            for block in model.blocks:  # the qkv Linear's first 2C output rows are the queries and keys
                block.attn.qkv.weight[:2 * block.attn.qkv.in_features] *= PEAKED_QK
    return model, preprocess(load_image(bundled_photos()["chelsea"]), cfg)


def explain(model, x, target, **settings):
    """(seconds of one explain call, its result); the ShapCAM is built (traced) outside the time."""
    cam = ShapCAM(model, [model.blocks[-1].norm1], reshape_transform, **settings)
    return timed(lambda: cam.explain(x, target)[0], "cpu")


def per_permutation(model, x, target) -> dict:
    """The walk and the generic path on the same antithetic pair (seed 0): their maps' difference
    and the generic path's time per permutation; the walk's at K = WALK_K, its set-up amortised."""
    walk_s, walk = explain(model, x, target, n_permutations=2, seed=0)
    generic_s, generic = explain(model, x, target, n_permutations=2, seed=0, fast_path=False)
    assert walk.path == "class-token-attention" and generic.path == "generic", (walk.path, generic.path)
    long_s, long = explain(model, x, target, n_permutations=WALK_K, seed=0)
    return {"k": 2, "walk_seconds": walk_s, "generic_seconds": generic_s,
            "generic_per_permutation": generic_s / 2, "walk_per_permutation": long_s / long.n_permutations,
            "walk_k": long.n_permutations,
            "max_abs_difference": float((walk.shapley - generic.shapley).abs().max()),
            "map_scale": float(generic.shapley.abs().max())}


def ladder(model, x, target, ks, seeds: int) -> list[dict]:
    """Rungs of the walk's error ladder, up to the first whose error is below half the goal."""
    points = []
    for k in ks:
        runs = [explain(model, x, target, n_permutations=k, seed=seed) for seed in range(1, seeds + 1)]
        phi = [{"phi": r.shapley.double().flatten().tolist()} for _, r in runs]
        mse = mse_pairs(phi)
        norm_sq = float(torch.tensor([p["phi"] for p in phi], dtype=torch.float64).mean(0).square().sum()) - mse / seeds
        seconds = statistics.median(s for s, _ in runs)
        k_run = runs[0][1].n_permutations
        points.append({"k": k_run, "seconds": seconds, "per_permutation": seconds / k_run,
                       "error": (mse / norm_sq) ** 0.5, "path": runs[0][1].path, "seeds": seeds})
        print(f"    K = {k_run:5d}: error {points[-1]['error']:.2%} (pairs of {seeds} seeds), {fmt(seconds)} "
              f"({fmt(seconds / k_run)} per permutation)", flush=True)
        if points[-1]["error"] < GOAL / 2:
            break
    return points


def gradcam_seconds(model, x, category: int) -> float:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=[model.blocks[-1].norm1], reshape_transform=reshape_transform) as cam:
        targets = [ClassifierOutputTarget(category)]
        cam(input_tensor=x, targets=targets)  # warm-up
        return timed(lambda: cam(input_tensor=x, targets=targets), "cpu", 7)[0]


def run(name: str, setting: str, ks, seeds: int) -> dict:
    model, x = vit(name, setting)
    with torch.no_grad():
        category = int(model(x).argmax())
    target = [ClassifierOutputSoftmaxTarget(category)]
    print(f"\n== {name} ({setting}), blocks[-1].norm1, n = 196, class {category}", flush=True)
    gradcam = gradcam_seconds(model, x, category)
    pair = per_permutation(model, x, target)
    print(f"  GradCAM {fmt(gradcam)}; generic path {fmt(pair['generic_per_permutation'])} per permutation; "
          f"same permutations: max |walk - generic| {pair['max_abs_difference']:.2e} of {pair['map_scale']:.2e}",
          flush=True)
    points = ladder(model, x, target, ks, seeds)
    walk = pair["walk_per_permutation"]
    goal = time_to_goal(points, GOAL)
    return {"model": name, "setting": setting, "category": category, "gradcam_seconds": gradcam,
            "same_permutations": pair, "ladder": points, "walk_per_permutation": walk,
            "generic_over_walk": pair["generic_per_permutation"] / walk, "to_2%": goal,
            "to_2%_over_gradcam": goal["seconds"] / gradcam}


HEADER = ["model", "weights", "GradCAM", "generic / permutation", "walk / permutation (K)", "generic / walk",
          "K to 2%", "time to 2%", "time to 2% / GradCAM", "same permutations: largest difference / map"]


def rows(results: list[dict]) -> list[list]:
    return [[r["model"], r["setting"], fmt(r["gradcam_seconds"]), fmt(r["same_permutations"]["generic_per_permutation"]),
             f"{fmt(r['walk_per_permutation'])} ({r['same_permutations']['walk_k']})", f"{r['generic_over_walk']:.0f}x",
             f"{r['to_2%']['k']:.0f} ({r['to_2%']['how']})", fmt(r["to_2%"]["seconds"]),
             f"{r['to_2%_over_gradcam']:.1f}x",
             f"{r['same_permutations']['max_abs_difference'] / r['same_permutations']['map_scale']:.1e}"]
            for r in results]


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [
        "# The class-token walk on ViT-S/16 and DeiT-S (bench/bench_tokens.py)", "",
        __doc__.split("\n\n", 1)[1].split("    python")[0].strip(), "",
        f"Machine: {machine['cpu']}, {machine['threads']} thread(s), torch {machine['torch']}, backend "
        f"{machine['backend']}; load average before / after: {machine['load_before']} / {machine['load_after']} "
        "(2 cores shared with other jobs: absolute times are noisy, ratios are within one run).", "",
        "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows(results["runs"])]
    lines += ["", "Goals (issue 16): generic / walk per permutation >= 100x; moonshot: 2% within 30x GradCAM's time.", ""]
    for r in results["runs"]:
        lines.append(f"- {r['model']} ({r['setting']}): {r['generic_over_walk']:.0f}x cheaper per permutation "
                     f"({'met' if r['generic_over_walk'] >= 100 else 'MISSED'}); 2% in {r['to_2%_over_gradcam']:.1f}x "
                     f"GradCAM's time ({'met' if r['to_2%_over_gradcam'] <= 30 else 'missed'}).")
    lines += ["", "Error ladders:", ""]
    for r in results["runs"]:
        lines.append(f"- {r['model']} ({r['setting']}): " + "; ".join(
            f"K = {p['k']}: {p['error']:.2%} in {fmt(p['seconds'])}" for p in r["ladder"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short ladder (a smoke run)")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--seeds", type=int, default=4, help="seeds per rung (pairs of seeds give the error)")
    args = parser.parse_args()
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "backend": backend_info()["backend"],
               "load_before": " ".join(f"{v:.1f}" for v in os.getloadavg())}
    runs = [run(name, setting, LADDER_QUICK if args.quick else LADDER, args.seeds)
            for name in args.models for setting in args.settings]
    machine["load_after"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    results = {"machine": machine, "goal": GOAL, "runs": runs}
    print_table("Class-token walk, blocks[-1].norm1 (n = 196)", HEADER, rows(runs))
    stem = ROOT / "bench" / "results" / ("tokens_cpu_quick" if args.quick else "tokens_cpu")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    stem.with_suffix(".md").write_text(markdown(results))
    print(f"\nwrote {stem.relative_to(ROOT)}.json and .md")


if __name__ == "__main__":
    main()
