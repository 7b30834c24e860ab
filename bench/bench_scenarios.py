"""Benchmarks of the exact fast head paths, in one process so that every ratio shares one machine.

Scenario 1  EfficientNet-Lite0 (real weights), chelsea.png at 224x224, layer bn2 (n = 49): the
            time each method needs to reach 2% relative L2 error against a converged reference,
            for shapcam_ext (fast path), shapcam_ext (generic path), a plain PyTorch loop and
            Captum's ShapleyValueSampling on the same head; pytorch-grad-cam's GradCAM and
            ScoreCAM for scale. Also where the fast path's time goes.
Scenario 2  VGG16 features.29 (n = 196), K permutations, the same permutations for every method:
            the fast path against the generic paths, and the maps' agreement.
Scenario 3  The pooled Lite0 head at 224, 448 and 896 (n = 49, 196, 784): how the time grows.

    python bench/bench_scenarios.py [--device cpu|cuda] [--quick] [--scenarios 1 2 3]

Prints tables; writes bench/results/scenarios_<device>.json and
bench/results/error_vs_time_<device>.png. --quick shrinks every ladder (a smoke run).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # ScoreCAM's progress bars

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shapcam_ext import ShapCAM, backend_info, paths  # noqa: E402
from shapcam_ext.game import Game  # noqa: E402
from shapcam_ext.cli.images import bundled_photos, load_image  # noqa: E402
from shapcam_ext.cli.models import load_model  # noqa: E402
from shapcam_ext.cli.preprocessing import preprocess  # noqa: E402
from shapcam_ext.memory import MemoryPlanner  # noqa: E402
from shapcam_ext.players import PlayerGrid  # noqa: E402
from shapcam_ext.sampling import PermutationStream  # noqa: E402
from shapcam_ext.statistics import RunningEstimate  # noqa: E402
from shapcam_ext.targets import ClassifierOutputSoftmaxTarget, Scorer  # noqa: E402

GOAL = 0.02  # relative L2 error


# ------------------------------------------------------------------------------ helpers


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device: str, repeats: int = 1):
    """(median seconds over ``repeats`` calls, last result)."""
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def rel_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    estimate, reference = estimate.double().cpu().flatten(), reference.double().cpu().flatten()
    return float((estimate - reference).norm() / reference.norm())


def permutations(n: int, k: int, seed: int, design: str = "latin") -> torch.Tensor:
    """The engine's permutations for this seed and design (antithetic), so every method can share them:
    K rounded up to whole units, as the engine rounds it."""
    stream = PermutationStream(n, True, seed, "cpu", design, total=k)
    return stream.take(-(-k // stream.unit_size) * stream.unit_size)


def spatial_keep(keep: torch.Tensor, h: int, w: int, group_size: int = 1) -> torch.Tensor:
    """(rows, players) kept players -> (rows, 1, h, w) kept positions: player i is the i-th
    group_size x group_size cell in row-major order, as shapcam_ext's PlayerGrid groups them."""
    g = group_size
    cells = keep.reshape(-1, 1, -(-h // g), -(-w // g))
    if g == 1:
        return cells
    return cells.repeat_interleave(g, -2).repeat_interleave(g, -1)[..., :h, :w]


@torch.no_grad()
def pytorch_loop(trunk: Callable, head: Callable, x: torch.Tensor, category: int, perms: torch.Tensor,
                 rows: int, group_size: int = 1) -> torch.Tensor:
    """The obvious implementation: mask with torch.where, run the head on every prefix, difference.

    Returns the Shapley map of the softmax probability of ``category``, one value per player
    (a group_size x group_size cell of the (h, w) map, see spatial_keep).
    """
    act = trunk(x)  # (1, C, h, w)
    h, w = act.shape[-2:]
    n = perms.shape[1]
    perms = perms.to(act.device)
    ranks = torch.empty_like(perms).scatter_(1, perms, torch.arange(n, device=act.device).expand_as(perms))
    lengths = torch.arange(n + 1, device=act.device)
    phi = torch.zeros(n, dtype=torch.float64, device=act.device)
    per_chunk = max(1, rows // (n + 1))
    for k0 in range(0, perms.shape[0], per_chunk):
        r = ranks[k0:k0 + per_chunk]
        keep = spatial_keep(r[:, None, :] < lengths[None, :, None], h, w, group_size)  # (k*(n+1), 1, h, w)
        values = head(torch.where(keep, act, 0.0)).softmax(-1)[:, category].double().view(r.shape[0], n + 1)
        phi.index_add_(0, perms[k0:k0 + per_chunk].flatten(), (values[:, 1:] - values[:, :-1]).flatten())
    return (phi / perms.shape[0]).view(-(-h // group_size), -(-w // group_size)).cpu()


def captum_shapley(head: Callable, act: torch.Tensor, category: int, samples: int, seed: int) -> torch.Tensor:
    from captum.attr import ShapleyValueSampling

    class Probabilities(nn.Module):
        def forward(self, a):
            return head(a).softmax(-1)

    h, w = act.shape[-2:]
    # one group per position, broadcast over channels (an expanded mask costs Captum a Python loop per element)
    mask = torch.arange(h * w, device=act.device).view(1, 1, h, w)
    torch.manual_seed(seed)
    with torch.no_grad():
        attr = ShapleyValueSampling(Probabilities()).attribute(
            act, baselines=0.0, target=category, feature_mask=mask, n_samples=samples,
            perturbations_per_eval=h * w + 1, show_progress=False)
    return attr[0, 0].cpu()


def time_to_goal(points: list[dict], goal: float = GOAL) -> dict:
    """K and seconds at which the error ladder crosses ``goal``.

    Interpolates log-error against log-K between the bracketing rungs and the time linearly in K;
    beyond the last rung, extrapolates with error ~ K^-1/2 and time ~ K (marked as such).
    """
    points = sorted(points, key=lambda p: p["k"])
    if points[0]["error"] <= goal:
        return {"k": points[0]["k"], "seconds": points[0]["seconds"], "how": "first rung already below"}
    for lo, hi in zip(points, points[1:]):
        if hi["error"] <= goal:
            frac = math.log(lo["error"] / goal) / math.log(lo["error"] / hi["error"])
            k = math.exp(math.log(lo["k"]) + frac * math.log(hi["k"] / lo["k"]))
            seconds = lo["seconds"] + (k - lo["k"]) / (hi["k"] - lo["k"]) * (hi["seconds"] - lo["seconds"])
            return {"k": k, "seconds": seconds, "how": "interpolated"}
    last = points[-1]
    k = last["k"] * (last["error"] / goal) ** 2
    return {"k": k, "seconds": last["seconds"] * k / last["k"], "how": "extrapolated"}


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in row] for row in [header] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for j, row in enumerate(cells):
        print("  " + "  ".join(c.ljust(widths[i]) for i, c in enumerate(row)))
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))


def fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def lite0(device: str, size: int = 224):
    model, cfg = load_model("tf_efficientnet_lite0")
    cfg = dataclasses.replace(cfg, input_size=(size, size))
    x = preprocess(load_image(bundled_photos()["chelsea"]), cfg)
    return model.to(device), x.to(device)


# ---------------------------------------------------------------------------- scenario 1


def scenario_1(device: str, quick: bool) -> dict:
    from pytorch_grad_cam import GradCAM, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget as GradCAMTarget

    model, x = lite0(device)
    with torch.no_grad():
        category = int(model(x).argmax())
    target = [ClassifierOutputSoftmaxTarget(category)]
    trunk, head = model.forward_features, model.forward_head
    n = 49
    ladder = [100, 400] if quick else [100, 200, 400, 800, 1200, 1600]
    seeds = [1, 2] if quick else [1, 2, 3]  # the same seeds give every method the same permutations
    reference_k = 4000 if quick else 20000

    reference_seconds, reference = timed(
        lambda: ShapCAM(model, ["bn2"], n_permutations=reference_k, seed=10**6).explain(x, target)[0], device)
    print(f"reference: fast path, K = {reference_k} antithetic, {fmt(reference_seconds)}; "
          f"path {reference.path}; efficiency gap {reference.efficiency_gap:.2e}")
    reference = reference.shapley

    methods: dict[str, list[dict]] = {}

    def ladder_for(name: str, run: Callable[[int, int], torch.Tensor], ks: list[int], seed_list: list[int],
                   stop_below_goal: bool = True, repeats: int = 1):
        """Error (RMS over seeds) and median time (over seeds x repeats) per K; slow methods stop at
        the first rung below 2%."""
        points = []
        for k in ks:
            errors, times = [], []
            for seed in seed_list:
                seconds, phi = timed(lambda: run(k, seed), device, repeats)
                errors.append(rel_error(phi, reference))
                times.append(seconds)
            points.append({"k": k, "seconds": statistics.median(times), "seconds_all": times,
                           "error": math.sqrt(statistics.fmean(e * e for e in errors)), "errors": errors})
            print(f"  {name:28s} K={k:5d}  {fmt(points[-1]['seconds']):>10s}  error {points[-1]['error']:.4f}")
            if stop_below_goal and points[-1]["error"] <= GOAL:
                break
        methods[name] = points

    cams = {}

    def shapcam(fast: bool):
        def run(k, seed):
            key = (fast, k, seed)
            if key not in cams:  # tracing the model is setup, not explanation time
                cams[key] = ShapCAM(model, ["bn2"], n_permutations=k, seed=seed, fast_path=fast)
            return cams[key].explain(x, target)[0].shapley
        return run

    for fast in (True, False):  # warm-up: first calls allocate and load code
        shapcam(fast)(100, 0)
    ladder_for("shapcam_ext fast path", shapcam(True), ladder, seeds, stop_below_goal=False, repeats=3)
    ladder_for("shapcam_ext generic", shapcam(False), ladder, seeds)
    ladder_for("pytorch loop", lambda k, s: pytorch_loop(trunk, head, x, category, permutations(n, k, s), 1000),
               ladder, seeds)
    with torch.no_grad():
        act = trunk(x)
    captum_ladder = [100, 400] if quick else [250, 1000, 2000]  # not antithetic: needs more permutations
    ladder_for("captum ShapleyValueSampling",
               lambda k, s: (trunk(x), captum_shapley(head, act, category, k, s))[1], captum_ladder, [1])

    gradcam = GradCAM(model=model, target_layers=[model.bn2])
    gradcam(input_tensor=x, targets=[GradCAMTarget(category)])  # warm-up
    gradcam_seconds, _ = timed(lambda: gradcam(input_tensor=x, targets=[GradCAMTarget(category)]), device, 7)
    scorecam = ScoreCAM(model=model, target_layers=[model.bn2])
    scorecam_seconds, _ = timed(lambda: scorecam(input_tensor=x, targets=[GradCAMTarget(category)]), device, 1)
    with torch.no_grad():
        trunk_seconds, _ = timed(lambda: trunk(x), device, 7)
        forward_seconds, _ = timed(lambda: model(x), device, 7)

    goals = {name: time_to_goal(points) for name, points in methods.items()}
    fast_goal = goals["shapcam_ext fast path"]
    stages = fast_stages(model, "bn2", x, target, round(fast_goal["k"] / 2) * 2, device)
    rows = [[name, f"{g['k']:.0f}", fmt(g["seconds"]), g["how"],
             f"{g['seconds'] / fast_goal['seconds']:.1f}x"] for name, g in goals.items()]
    rows += [["pytorch-grad-cam GradCAM", "-", fmt(gradcam_seconds), "no error (not Shapley)",
              f"{gradcam_seconds / fast_goal['seconds']:.2f}x"],
             ["pytorch-grad-cam ScoreCAM", "-", fmt(scorecam_seconds), "no error (not Shapley)",
              f"{scorecam_seconds / fast_goal['seconds']:.1f}x"]]
    print_table(f"Scenario 1: EfficientNet-Lite0 bn2 (n = 49), chelsea 224, class {category}; "
                f"time to {GOAL:.0%} relative L2 error ({device})",
                ["method", "K at 2%", "time at 2%", "how", "time / fast path"], rows)
    targets = {
        "fast path at 2% <= GradCAM / 2": fast_goal["seconds"] <= gradcam_seconds / 2,
        "Captum at 2% >= 100x fast path": goals["captum ShapleyValueSampling"]["seconds"] >= 100 * fast_goal["seconds"],
    }
    print_table(f"Where the fast path's time goes at K = {stages['k']} ({device}, {backend_info()['backend']} ops)",
                ["stage", "time"], [
                    ["prepare(): the model's one forward pass", fmt(stages["trunk"])],
                    ["head on the activation, for scale", fmt(stages["head"])],
                    ["path: front on 2 maps, deltas, self-check (1 permutation, 3 head rows)", fmt(stages["prepare"])],
                    [f"walk: {stages['path']}, {stages['k']} permutations", fmt(stages["walk"])],
                    ["estimate(): the ends (2 head rows), path, probe, walk", fmt(stages["estimate"])],
                    ["whole explain()", fmt(stages["explain"])],
                    ["model forward, for scale", fmt(forward_seconds)],
                    ["GradCAM, for scale", fmt(gradcam_seconds)]])
    for name, ok in targets.items():
        print(f"  target {name}: {'met' if ok else 'NOT met'}")
    return {"category": category, "reference_k": reference_k, "reference_seconds": reference_seconds,
            "ladders": methods, "time_to_goal": goals, "gradcam_seconds": gradcam_seconds,
            "scorecam_seconds": scorecam_seconds, "trunk_seconds": trunk_seconds,
            "forward_seconds": forward_seconds, "fast_path_stages": stages, "targets": targets}


def fast_stages(model, layer: str, x, targets, k: int, device: str, repeats: int = 5) -> dict:
    """The engine's stages run one by one as it runs them: medians of ``repeats``."""
    cam = ShapCAM(model, [layer], n_permutations=k, seed=1)
    engine = cam.engine
    cfg = engine.config
    with torch.no_grad():
        prepare_s, prepared = timed(lambda: cam.prepare(x), device, repeats)
        cut = prepared.layers[0]
        grid = PlayerGrid(cut.activation)
        head_s, _ = timed(lambda: cut.head(cut.activation, *cut.held), device, repeats)
        game = Game(layer=layer, head=cut.head, grid=grid, players=grid.players, baseline=grid.baseline(cfg.baseline),
                    held=cut.held, batched=(True,) * len(cut.held), targets=tuple(targets), images=slice(0, 1),
                    scorer=Scorer(), planner=MemoryPlanner(cfg.memory_budget, cfg.batch_size), permutations=k)
        # as the engine's run calls it: the walk's tables and its self-check
        path_s, walk = timed(lambda: paths.evaluator_for(game, engine.proofs[0]), device, repeats)
        perms = permutations(game.n, k, 1).to(x.device)

        def walk_all():
            walk.accumulate(perms, RunningEstimate(1, game.n, 1, x.device))  # timing only: any unit size dividing K

        walk_s, _ = timed(walk_all, device, repeats)
        estimate_s, _ = timed(lambda: cam.estimate(prepared, targets), device, repeats)
        total_s, _ = timed(lambda: cam.explain(x, targets), device, repeats)
    return {"k": k, "path": walk.path, "trunk": prepare_s, "head": head_s, "prepare": path_s, "walk": walk_s,
            "estimate": estimate_s, "explain": total_s}


def growth(seconds: list[float], sizes: list[int]) -> list[str]:
    """Exponent e of seconds ~ n^e between consecutive sizes."""
    return [""] + [f"n^{math.log(b / a) / math.log(nb / na):.2f}"
                   for a, b, na, nb in zip(seconds, seconds[1:], sizes, sizes[1:])]


# ---------------------------------------------------------------------------- scenario 2


def scenario_2(device: str, quick: bool) -> dict:
    model, cfg = load_model("vgg16")  # random weights: none ship offline; timing does not depend on them
    model = model.to(device)
    x = preprocess(load_image(bundled_photos()["chelsea"]), cfg).to(device)
    layer, k, seed = "features.29", (10 if quick else 100), 0
    with torch.no_grad():
        category = int(model(x).argmax())
    target = [ClassifierOutputSoftmaxTarget(category)]
    trunk = model.features[:30]

    def head(a):
        return model.classifier(torch.flatten(model.avgpool(model.features[30](a)), 1))

    n = 196
    perms = permutations(n, k, seed)
    fast_cam = ShapCAM(model, [layer], n_permutations=k, seed=seed)
    generic_cam = ShapCAM(model, [layer], n_permutations=k, seed=seed, fast_path=False, batch_size=2 * (n + 1))
    default_cam = ShapCAM(model, [layer], n_permutations=2, seed=seed, fast_path=False)
    fast_cam.explain(x, target)  # warm-up
    fast_s, fast = timed(lambda: fast_cam.explain(x, target)[0], device, 3)
    loop_s, loop_phi = timed(lambda: pytorch_loop(trunk, head, x, category, perms, 2 * (n + 1)), device)
    generic_s, generic = timed(lambda: generic_cam.explain(x, target)[0], device)
    default_s, _ = timed(lambda: default_cam.explain(x, target)[0], device)
    scale = float(generic.shapley.abs().max())
    agreement = {
        "fast vs generic, max |diff| / max |phi|": float((fast.shapley - generic.shapley).abs().max()) / scale,
        "pytorch loop vs generic, max |diff| / max |phi|": float((loop_phi - generic.shapley).abs().max()) / scale,
    }
    rows = [["shapcam_ext fast path", fast.path, fmt(fast_s), "1.0x"],
            ["pytorch loop (where + head, 394 rows/chunk)", "generic", fmt(loop_s), f"{loop_s / fast_s:.1f}x"],
            ["shapcam_ext generic (batch_size=394)", generic.path, fmt(generic_s), f"{generic_s / fast_s:.1f}x"],
            ["shapcam_ext generic (default memory_budget), 2 perms x K/2", "generic", fmt(default_s * k / 2),
             f"{default_s * k / 2 / fast_s:.1f}x"]]
    print_table(f"Scenario 2: VGG16 {layer} (n = {n}), K = {k}, same permutations ({device})",
                ["method", "path", "time", "time / fast path"], rows)
    for name, value in agreement.items():
        print(f"  {name}: {value:.2e}")
    met = loop_s >= 5 * fast_s
    verdict = ("met" if met else "NOT met") if k == 100 else "not judged (it is set at K = 100)"
    print(f"  target fast path >= 5x faster than the pure-PyTorch generic path: {verdict}")
    return {"k": k, "category": category, "fast_seconds": fast_s, "pytorch_loop_seconds": loop_s,
            "generic_seconds": generic_s, "generic_default_budget_seconds_extrapolated": default_s * k / 2,
            "agreement": agreement, "target_met": met}


# ---------------------------------------------------------------------------- scenario 3


def scenario_3(device: str, quick: bool) -> dict:
    sizes = [224, 448, 896]
    k_fast, k_generic = (50, 4) if quick else (400, 16)
    results = []
    for size in sizes:
        model, x = lite0(device, size)
        with torch.no_grad():
            category = int(model(x).argmax())
        target = [ClassifierOutputSoftmaxTarget(category)]
        stages = fast_stages(model, "bn2", x, target, k_fast, device, repeats=3)
        generic_cam = ShapCAM(model, ["bn2"], n_permutations=k_generic, seed=0, fast_path=False)
        generic_s, generic = timed(lambda: generic_cam.explain(x, target)[0], device)
        results.append({"size": size, "n": generic.shapley.numel(), "fast": stages,
                        "fast_walk_per_permutation": stages["walk"] / k_fast,
                        "generic_seconds": generic_s, "generic_per_permutation": generic_s / k_generic})
    ns = [r["n"] for r in results]
    columns = {
        "trunk": [r["fast"]["trunk"] for r in results],
        "prepare": [r["fast"]["prepare"] for r in results],
        "walk / perm": [r["fast_walk_per_permutation"] for r in results],
        "generic / perm": [r["generic_per_permutation"] for r in results],
    }
    grown = {name: growth(values, ns) for name, values in columns.items()}
    rows = [[r["size"], r["n"], fmt(r["fast"]["explain"])]
            + [f"{fmt(columns[c][i])} {grown[c][i]}".strip() for c in columns]
            + [f"{columns['generic / perm'][i] / columns['walk / perm'][i]:.0f}x"]
            for i, r in enumerate(results)]
    print_table(f"Scenario 3: Lite0 bn2 at growing inputs; fast K = {k_fast} ({results[0]['fast']['path']}), "
                f"generic K = {k_generic} ({device})",
                ["input", "n", f"fast explain() K={k_fast}", "trunk", "fast prepare", "fast walk / perm",
                 "generic / perm", "generic / fast walk"], rows)
    return {"k_fast": k_fast, "k_generic": k_generic, "sizes": results, "growth": grown}


# ---------------------------------------------------------------------------------- plot


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s1 = results["scenarios"].get("1")
    if s1 is None:
        return
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, points in s1["ladders"].items():
        ax.plot([p["seconds"] for p in points], [p["error"] for p in points], "o-", label=name)
    for name, key, style in (("GradCAM (time only)", "gradcam_seconds", ":"),
                             ("ScoreCAM (time only)", "scorecam_seconds", "-.")):
        ax.axvline(s1[key], color="gray", linestyle=style, label=name)
    ax.axhline(GOAL, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("seconds per explanation (median)")
    ax.set_ylabel("relative L2 error vs converged reference")
    ax.set_title(f"EfficientNet-Lite0 bn2, n = 49 ({results['device']}, {results['backend']['backend']} ops)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="short ladders and small K: a smoke run")
    parser.add_argument("--scenarios", nargs="+", default=["1", "2", "3"], choices=["1", "2", "3"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    warnings.filterwarnings("ignore", message=".*compiled library could not be loaded.*")
    torch.manual_seed(0)
    results = {
        "device": args.device, "quick": args.quick, "torch": torch.__version__, "backend": backend_info(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                    "load_average_start": os.getloadavg()},
        "command": " ".join([Path(sys.executable).name] + sys.argv), "scenarios": {},
    }
    print(f"device {args.device}, torch {torch.__version__}, ops backend {results['backend']['backend']}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    runners = {"1": scenario_1, "2": scenario_2, "3": scenario_3}
    for name in args.scenarios:
        results["scenarios"][name] = runners[name](args.device, args.quick)
    results["machine"]["load_average_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = args.device + ("_quick" if args.quick else "")
    json_path = args.out / f"scenarios_{suffix}.json"
    json_path.write_text(json.dumps(results, indent=2, default=float))
    png_path = args.out / f"error_vs_time_{suffix}.png"
    plot(results, png_path)
    print(f"\nwrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
