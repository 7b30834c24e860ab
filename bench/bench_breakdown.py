"""Where a step of the incremental walk goes on 196-player maps, and what a permutation costs now
against the code of a base commit and the generic path, in one run (issue 16.4 and 16.2).

Games, one image each (the scikit-image cat at 224 x 224, the softmax probability of the top
class; the timing does not depend on the weights, and only Lite0's are real):

* ``lite0-blocks.4``: EfficientNet-Lite0 cut after blocks.4 (112 x 14 x 14, n = 196);
* ``resnet50-layer3``: ResNet-50 cut after layer3 (1024 x 14 x 14, n = 196);
* ``convnext-features.7.1``: ConvNeXt-T before its last block (768 x 7 x 7, n = 49), where a
  7 x 7 depthwise convolution reaches the whole map from its centre;
* ``swin-t-norm2``: Swin-T at ``layers[-1].blocks[-1].norm2`` (49 tokens, pytorch-grad-cam's
  reshape_transform); ``vit-s-norm2``: ViT-S/16 with ``global_pool='avg'`` at
  ``blocks[-1].norm2`` (196 patch tokens and the class token): per-token heads.

For each game and code (``today``: the base commit's code exported with ``git archive``, with this
checkout's compiled library; ``new``: this checkout) a fresh worker process times the path the
engine chooses (its ``accumulate`` on the same latin antithetic permutations, set-up excluded and
reported apart), and ``generic`` times the generic path of this checkout on the first quarter of
those permutations. Repeats are interleaved, times are medians, every ratio is taken within this
run. Then the static breakdown (per recomputed layer: the box the old walk recomputed, the mean
count of sites the new one does, flops per position) and a timed run of each code's walk per layer.

    python bench/bench_breakdown.py [--k 32] [--repeats 3] [--baseline main] [--games ...] [--quick]

Writes bench/results/breakdown_cpu.json and bench/results/breakdown_cpu.md.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GAMES = ["lite0-blocks.4", "resnet50-layer3", "convnext-features.7.1", "swin-t-norm2", "vit-s-norm2"]
GOAL = {"lite0-blocks.4": 3.0, "resnet50-layer3": 3.0, "swin-t-norm2": 20.0}  # new vs today, per permutation


# ------------------------------------------------------------------------------ the worker


def build(game: str):
    """(model, input, layer, reshape_transform) of a game, with the shapcam_ext on sys.path."""
    import timm
    import torch
    import torchvision
    from shapcam_ext.cli.images import bundled_photos, load_image
    from shapcam_ext.cli.models import load_model
    from shapcam_ext.cli.preprocessing import preprocess

    lite0, cfg = load_model("tf_efficientnet_lite0")
    x = preprocess(load_image(bundled_photos()["chelsea"]), cfg)
    torch.manual_seed(0)
    if game == "lite0-blocks.4":
        return lite0, x, "blocks.4", None
    if game == "resnet50-layer3":
        return torchvision.models.resnet50().eval(), x, "layer3", None
    if game == "convnext-features.7.1":
        return torchvision.models.convnext_tiny().eval(), x, "features.7.1", None
    if game == "swin-t-norm2":
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
        return model, x, "layers.3.blocks.1.norm2", lambda t: t.reshape(t.shape[0], 7, 7, t.shape[-1]).permute(0, 3, 1, 2)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, global_pool="avg").eval()
    return model, x, "blocks.11.norm2", lambda t: t[:, 1:].reshape(t.shape[0], 14, 14, t.shape[-1]).permute(0, 3, 1, 2)


def worker(game: str, variant: str, k: int, per_layer: bool) -> dict:
    """Times one path of one game in this process (``variant``: ``walk``, the chosen path, or ``generic``)."""
    import torch
    import shapcam_ext
    from shapcam_ext import ShapCAM
    from shapcam_ext.game import Game
    from shapcam_ext.memory import MemoryPlanner
    from shapcam_ext.paths import GenericPath, evaluator_for
    from shapcam_ext.players import PlayerGrid
    from shapcam_ext.sampling import PermutationStream
    from shapcam_ext.statistics import RunningEstimate
    from shapcam_ext.targets import ClassifierOutputSoftmaxTarget, Scorer

    torch.set_num_threads(1)
    model, x, layer, transform = build(game)
    with torch.no_grad():
        category = int(model(x).argmax())
        cam = ShapCAM(model, [layer], transform, n_permutations=k)
        cut = cam.engine.prepare(x).layers[0]
        grid = PlayerGrid(cut.activation, transform)
        game_ = Game(layer=layer, head=cut.head, grid=grid, players=grid.players, baseline=grid.baseline(0.0),
                     held=cut.held, batched=tuple(isinstance(h, torch.Tensor) and h.dim() > 0 for h in cut.held),
                     targets=(ClassifierOutputSoftmaxTarget(category),), images=slice(0, 1), scorer=Scorer(),
                     planner=MemoryPlanner(1 << 30, None), permutations=k)
        stream = PermutationStream(game_.n, True, 0, "cpu", "latin", total=k)
        perms = stream.take(-(-k // stream.unit_size) * stream.unit_size)
        start = time.perf_counter()
        evaluator = GenericPath(game_) if variant == "generic" else evaluator_for(game_, cam.engine.proofs[0])
        setup = time.perf_counter() - start
        quarter = max(2, len(perms) // 4)  # the generic path walks these; the walks go on to all
        if variant == "generic":
            perms = perms[:quarter]
        per_node = _instrument(evaluator) if per_layer else None
        estimate = RunningEstimate(1, game_.n, 1, "cpu")
        start = time.perf_counter()
        evaluator.accumulate(perms[:quarter], estimate)
        seconds = time.perf_counter() - start
        first = (estimate.total[0] / quarter).tolist()  # the map of the permutations both paths walk
        if len(perms) > quarter:
            start = time.perf_counter()
            evaluator.accumulate(perms[quarter:], estimate)
            seconds += time.perf_counter() - start
    result = {"game": game, "variant": variant, "code": str(Path(shapcam_ext.__file__).parents[1]),
              "path": evaluator.path, "n": game_.n, "k": len(perms), "setup": setup, "seconds": seconds,
              "per_permutation": seconds / len(perms), "map_of_first_quarter": first}
    if per_node is not None:
        result["per_layer"] = _layers(evaluator, per_node, len(perms))
    return result


def _instrument(evaluator) -> dict:
    """Times every node a recompute walk runs at each step (either code's step class)."""
    if not hasattr(evaluator, "plan"):
        return {}
    from shapcam_ext.paths import recompute

    times: dict = collections.defaultdict(float)
    step = recompute._Step
    for method in ("compute", "patch", "write"):  # this checkout's steps compute; the old ones patch and write
        if hasattr(step, method):
            setattr(step, method, _timed(getattr(step, method), times))
    return times


def _timed(method, times: dict):
    def run(self, node, *args):
        start = time.perf_counter()
        out = method(self, node, *args)
        times[node.name] += time.perf_counter() - start
        return out

    return run


def _layers(evaluator, times: dict, k: int) -> list[dict]:
    """Per recomputed node: the seconds per permutation it took and, with this checkout's walk, its
    geometry (the old walk's box, the mean count of sites) and flops."""
    if not hasattr(evaluator, "plan"):
        return []
    import torch
    from shapcam_ext.paths import recompute

    plan, rows = evaluator.plan, []
    for node in evaluator.order:
        row = {"node": node.name, "seconds_per_permutation": times.get(node.name, 0.0) / k}
        if hasattr(recompute, "Sites"):
            value = plan.values[node]
            box = value.axes[0].box * value.axes[1].box
            sites = recompute.Sites(value.axes, plan.size, torch.device("cpu")).mean
            whole = any(read.kind == recompute.WHOLE for read in evaluator.reads[node].values())
            row.update(channels=value.channels, kernel=list(value.conv.kernel) if value.conv else [1, 1],
                       groups=value.conv.module.groups if value.conv else 1, area=value.area, box=box, sites=sites,
                       mflop_full=value.flops * value.area / 1e6, mflop_box=value.flops * box / 1e6,
                       mflop_sites=value.flops * (value.area if whole else sites) / 1e6)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ the driver


def export(ref: str, where: Path) -> Path:
    """The package of commit ``ref`` under ``where``, with this checkout's compiled library (the ops
    are the same; a base whose csrc/ differs would need its own build)."""
    archive = where / "base.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), ref, "shapcam_ext"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(where, filter="data")
    for library in (ROOT / "shapcam_ext").glob("_C*.so"):
        (where / "shapcam_ext" / library.name).write_bytes(library.read_bytes())
    changed = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", ref, "--", "csrc"]).returncode
    if changed:
        print(f"warning: csrc/ differs from {ref}; today's code runs this checkout's compiled ops")
    return where


def run_worker(code: Path, game: str, variant: str, k: int, per_layer: bool = False) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(code), TQDM_DISABLE="1")
    command = [sys.executable, "-W", "ignore", str(Path(__file__).resolve()), "--worker", game, variant, str(k)]
    if per_layer:
        command.append("--per-layer")
    out = subprocess.run(command, env=env, capture_output=True, text=True, cwd=str(code))
    if out.returncode:
        raise RuntimeError(f"worker {game} {variant} in {code} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=32, help="permutations each walk times (the generic path: a quarter)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default="main", help="the commit whose code is 'today'")
    parser.add_argument("--games", nargs="+", default=GAMES, choices=GAMES)
    parser.add_argument("--quick", action="store_true", help="K = 8, one repeat (a smoke run)")
    parser.add_argument("--worker", nargs=3, metavar=("GAME", "VARIANT", "K"), help=argparse.SUPPRESS)
    parser.add_argument("--per-layer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        game, variant, k = args.worker
        print(json.dumps(worker(game, variant, int(k), args.per_layer)))
        return
    k, repeats = (8, 1) if args.quick else (args.k, args.repeats)
    load_start = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base = export(args.baseline, Path(tmp))
        runs = collections.defaultdict(list)
        for _ in range(repeats):  # interleaved, so that a change of load hits every variant alike
            for game in args.games:
                for name, code, variant in (("today", base, "walk"), ("new", ROOT, "walk"), ("generic", ROOT, "generic")):
                    runs[game, name].append(run_worker(code, game, variant, k))
        layers = {game: {name: run_worker(code, game, "walk", k, per_layer=True).get("per_layer", [])
                         for name, code in (("today", base), ("new", ROOT))}
                  for game in args.games if runs[game, "new"][0]["path"].startswith("incremental")}
    results = {"machine": {"cpu": _cpu(), "threads": 1, "load_at_start": load_start, "load_at_end": os.getloadavg(),
                           "seconds": time.perf_counter() - started},
               "command": " ".join(["python bench/bench_breakdown.py", *sys.argv[1:]]), "baseline": args.baseline,
               "k": k, "repeats": repeats, "games": {}}
    for game in args.games:
        entry = {}
        for name in ("today", "new", "generic"):
            rows = runs[game, name]
            entry[name] = {"path": rows[0]["path"], "k": rows[0]["k"], "n": rows[0]["n"],
                           "per_permutation": statistics.median(r["per_permutation"] for r in rows),
                           "all": [r["per_permutation"] for r in rows],
                           "setup": statistics.median(r["setup"] for r in rows)}
        new_map, generic_map = (runs[game, name][0]["map_of_first_quarter"] for name in ("new", "generic"))
        entry["max_abs_difference_new_vs_generic"] = max(abs(a - b) for a, b in zip(new_map, generic_map))
        entry["today_over_new"] = entry["today"]["per_permutation"] / entry["new"]["per_permutation"]
        entry["generic_over_new"] = entry["generic"]["per_permutation"] / entry["new"]["per_permutation"]
        entry["map_scale"] = max(abs(v) for v in new_map)
        entry["layers"] = layers.get(game, {})
        results["games"][game] = entry
    out = ROOT / "bench" / "results" / "breakdown_cpu.json"
    out.write_text(json.dumps(results, indent=2))
    (ROOT / "bench" / "results" / "breakdown_cpu.md").write_text(report(results))
    print(report(results))


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def report(results: dict) -> str:
    m = results["machine"]
    lines = ["# Incremental walks on 196-player maps, and per-token heads: where a permutation's time goes",
             "", f"Command: `{results['command']}`", "",
             f"Machine: {m['cpu']}, 1 thread, shared: load average {m['load_at_start'][0]:.1f} at start, "
             f"{m['load_at_end'][0]:.1f} at end ({m['seconds'] / 60:.0f} min). 'today' is the code of "
             f"`{results['baseline']}`, 'new' this checkout, each in its own process, {results['repeats']} "
             f"interleaved repeats, medians; K = {results['k']} latin antithetic permutations per walk, the "
             "first quarter of them for the generic path.", "",
             "| game | n | today | per permutation | new | per permutation | generic path per permutation "
             "| today / new | generic / new | goal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for game, e in results["games"].items():
        goal = GOAL.get(game)
        met = "" if goal is None else f"{goal:g}x: {'met' if e['today_over_new'] >= goal else 'missed'}"
        lines.append(f"| {game} | {e['new']['n']} | {e['today']['path']} | {_fmt(e['today']['per_permutation'])} | "
                     f"{e['new']['path']} | {_fmt(e['new']['per_permutation'])} | "
                     f"{_fmt(e['generic']['per_permutation'])} | {e['today_over_new']:.2f}x | "
                     f"{e['generic_over_new']:.1f}x | {met} |")
    lines += ["", "Set-up (the walk's tables, plan and self-check; once per run): "
              + "; ".join(f"{g} {_fmt(e['new']['setup'])} new, {_fmt(e['today']['setup'])} today"
                          for g, e in results["games"].items()), "",
              "Maps on the same permutations (the generic path's quarter): max |new - generic| " + "; ".join(
                  f"{g} {e['max_abs_difference_new_vs_generic']:.1e} (map scale {e['map_scale']:.2g})"
                  for g, e in results["games"].items())]
    for game, codes in ((g, e["layers"]) for g, e in results["games"].items() if e["layers"]):
        new = {row["node"]: row for row in codes["new"]}
        old = {row["node"]: row for row in codes["today"]}
        lines += ["", f"## {game}: per recomputed layer", "",
                  "Box: the positions the old walk recomputed at every step; sites: the mean count the new walk "
                  "computes (the indices whose footprint holds the entering position, cut by the map's edge; a "
                  "grouped convolution whose patches would outweigh its input runs on the whole map, and a batch "
                  "norm after a convolution is folded into it). Seconds per permutation from a timed run of each "
                  "walk.", "",
                  "| layer | kernel / groups | channels | map | box | sites | MFLOP per step: full map / box / sites "
                  "| today s/perm | new s/perm | new GFLOP/s |", "|---|---|---|---|---|---|---|---|---|---|"]
        totals = collections.Counter()
        for name, row in new.items():
            before = old.get(name, {}).get("seconds_per_permutation", 0.0)
            after = row["seconds_per_permutation"]
            steps = results["games"][game]["new"]["n"]
            rate = row["mflop_sites"] * steps / after / 1e3 if after else 0.0
            kernel = "x".join(map(str, row["kernel"]))
            lines.append(f"| {name} | {kernel} / {row['groups']} | {row['channels']} | {row['area']} | {row['box']} | "
                         f"{row['sites']:.1f} | {row['mflop_full']:.1f} / {row['mflop_box']:.1f} / "
                         f"{row['mflop_sites']:.1f} | {before:.3f} | {after:.3f} | {rate:.0f} |")
            totals.update({"full": row["mflop_full"], "box": row["mflop_box"], "sites": row["mflop_sites"],
                           "today": before, "new": after})
        lines.append(f"| all | | | | | | {totals['full']:.0f} / {totals['box']:.0f} / {totals['sites']:.0f} | "
                     f"{totals['today']:.3f} | {totals['new']:.3f} | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
