"""Two revisions of shapcam_ext timed in one run: no path may get slower.

Each revision is checked out in a temporary worktree (its extension built there, or copied when
its C++/CUDA sources equal this checkout's), and the same scenarios, through the public API
only (``ShapCAM(model, [layer], n_permutations=K, seed=0).explain(x, targets)``), run in worker
processes that alternate between the revisions, so that load from other jobs hits both alike.
Weights are random (timing does not depend on them); workers run one thread unless
OMP_NUM_THREADS says otherwise. Medians and the head/base ratio per scenario
go to bench/results/revisions_cpu.json and are printed as a table.

    python bench/bench_revisions.py --base 6b00bbc [--head WORKTREE] [--rounds 5] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, model, layer, input size, K): one per evaluation path, and the fixed cost of a short call
SCENARIOS = [
    ("lite0 bn2, K=16 (fixed cost)", "timm:tf_efficientnet_lite0", "bn2", 224, 16),
    ("lite0 bn2, K=1024 (pooled-linear)", "timm:tf_efficientnet_lite0", "bn2", 224, 1024),
    ("lite0 blocks.5, K=128 (incremental)", "timm:tf_efficientnet_lite0", "blocks.5", 224, 128),
    ("resnet50 layer4.2.conv3, K=64 (pooled-linear, held skip)", "tv:resnet50", "layer4.2.conv3", 224, 64),
    ("vgg16 features.29, K=8 (local-pool-linear)", "tv:vgg16", "features.29", 112, 8),
    ("mobilenet_v3_large features, K=64 (pooled)", "tv:mobilenet_v3_large", "features", 224, 64),
    ("resnet18 layer4, K=16, no fast path (generic)", "tv:resnet18", "layer4", 224, 16),
]
QUICK = {0, 2, 6}


def worker(scenario: int, repeats: int) -> None:
    """Runs one scenario in this process's shapcam_ext and prints its median seconds as JSON."""
    import timm
    import torch
    import torchvision

    from shapcam_ext import ShapCAM
    from shapcam_ext.targets import ClassifierOutputSoftmaxTarget

    name, model_name, layer, size, k = SCENARIOS[scenario]
    torch.manual_seed(0)
    source, arch = model_name.split(":")
    model = (timm.create_model(arch) if source == "timm" else torchvision.models.get_model(arch)).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        target = [ClassifierOutputSoftmaxTarget(int(model(x).argmax()))]
    cam = ShapCAM(model, [layer], n_permutations=k, seed=0, fast_path="no fast path" not in name)
    cam.explain(x, target)  # warm-up
    seconds = []
    for _ in range(repeats):
        tick = time.perf_counter()
        path = cam.explain(x, target)[0].path
        seconds.append(time.perf_counter() - tick)
    print(json.dumps({"seconds": statistics.median(seconds), "path": path}))


def checkout(revision: str, into: Path) -> Path:
    """A worktree of ``revision`` with a compiled extension."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(into), revision], check=True)
    same_sources = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", revision, "--", "csrc", "setup.py"]).returncode == 0
    built = list((ROOT / "shapcam_ext").glob("_C*.so"))
    if same_sources and built:
        shutil.copy(built[0], into / "shapcam_ext")
    else:
        env = {**os.environ, "SHAPCAM_NO_CUDA": "1", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=into, env=env, check=True,
                       stdout=subprocess.DEVNULL)
    return into


def timed(tree: Path, scenario: int, repeats: int) -> dict:
    # One thread unless told otherwise: on a machine shared with other jobs, two OpenMP threads wait
    # on each other whenever one core is taken, and a call can take ten times as long.
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(scenario),
                          "--repeats", str(repeats)], env=env, cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=False, default="6b00bbc", help="the revision to compare against")
    parser.add_argument("--head", type=Path, default=ROOT, help="the checkout to time (default: this one)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two revisions per scenario")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per worker (median)")
    parser.add_argument("--quick", action="store_true", help=f"only scenarios {sorted(QUICK)}")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "revisions_cpu.json")
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.repeats)
        return
    scratch = Path(tempfile.mkdtemp(prefix="shapcam_base_"))
    base = checkout(args.base, scratch / "base")
    try:
        rows = []
        for i, (name, *_rest) in enumerate(SCENARIOS):
            if args.quick and i not in QUICK:
                continue
            runs = {"base": [], "head": []}
            paths = {}
            for _ in range(args.rounds):
                for label, tree in (("base", base), ("head", args.head)):
                    result = timed(tree, i, args.repeats)
                    runs[label].append(result["seconds"])
                    paths[label] = result["path"]
            row = {"scenario": name, **{f"{k}_seconds": statistics.median(v) for k, v in runs.items()},
                   "base_path": paths["base"], "head_path": paths["head"]}
            row["head_over_base"] = row["head_seconds"] / row["base_seconds"]
            rows.append(row)
            print(f"{name}: base {row['base_seconds'] * 1e3:.1f} ms ({paths['base']}), head "
                  f"{row['head_seconds'] * 1e3:.1f} ms ({paths['head']}), head/base {row['head_over_base']:.2f}",
                  flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "base": args.base, "head": subprocess.run(["git", "-C", str(args.head), "rev-parse", "--short", "HEAD"],
                                                  capture_output=True, text=True).stdout.strip(),
        "machine": platform.processor() or platform.machine(), "threads": os.environ.get("OMP_NUM_THREADS", "1"),
        "rounds": args.rounds, "repeats": args.repeats, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
