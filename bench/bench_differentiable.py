"""What a differentiable map costs: the backward against the forward, and peak memory.

EfficientNet-Lite0 with its real ImageNet weights, the scikit-image cat at 224 x 224, the softmax
probability of its top class, at ``bn2`` (1280 x 7 x 7; the pooled-linear walk) and cut after
``blocks.5`` (192 x 7 x 7; an incremental walk, which the cost model picks per K), K = 64 and 256
permutations (seed 0). Per configuration:

* map: ``explain(x, targets)``, no graph (what a map costs today);
* forward: ``explain(x, targets, create_graph=True)``, the map with its graph (trunk included);
* backward: ``torch.autograd.backward`` of a loss on that map, to the model's parameters;

times are medians of the repeats, in one process per configuration. Peak memory is the growth of
the process's peak resident set over what it held once the model, the photo and a warm-up map
were loaded (``ru_maxrss``), in a fresh process for the map alone and for the map with its graph
and backward, twice: with glibc's malloc as it comes, and with its mmap threshold fixed at
128 KiB (``MALLOC_MMAP_THRESHOLD_``), which returns every freed large block to the system, so that
the peak is what was alive rather than what the heap kept (the differentiable recompute walk's
many mid-sized allocations grow glibc's heap by about 185 MB per round otherwise, with nothing
alive in it). torch runs on --threads threads.

    python bench/bench_differentiable.py [--threads 1] [--repeats 3] [--quick]

Prints a table; writes bench/results/differentiable_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench_scenarios import ROOT, lite0, print_table

from shapcam_ext import ShapCAM, backend_info  # noqa: E402  (bench_scenarios puts the checkout first)
from shapcam_ext.targets import ClassifierOutputSoftmaxTarget  # noqa: E402

LAYERS = ("bn2", "blocks.5")
LIVE = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)}  # peak resident memory = peak live memory
PERMUTATIONS = (64, 256)
MODES = ("map", "graph")  # the map alone; the map with its graph, then the backward


def measure(layer: str, k: int, mode: str, repeats: int) -> dict:
    """One configuration, in this process: median seconds of each phase, and the peak memory growth."""
    model, x = lite0("cpu")
    with torch.no_grad():
        targets = [ClassifierOutputSoftmaxTarget(int(model(x).argmax()))]
    cam = ShapCAM(model, [layer], n_permutations=k, seed=0)
    cam.explain(x, targets)  # warm-up: the first call pays one-off costs (allocator, kernels)
    held = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times: dict[str, list[float]] = {"map": [], "forward": [], "backward": []}
    path = None
    for _ in range(repeats):
        if mode == "map":
            tick = time.perf_counter()
            path = cam.explain(x, targets)[0].path
            times["map"].append(time.perf_counter() - tick)
            continue
        tick = time.perf_counter()
        result = cam.explain(x, targets, create_graph=True)[0]
        times["forward"].append(time.perf_counter() - tick)
        loss = (result.shapley * torch.linspace(-1, 1, result.shapley.numel()).view_as(result.shapley)).sum()
        tick = time.perf_counter()
        loss.backward()
        times["backward"].append(time.perf_counter() - tick)
        model.zero_grad(set_to_none=True)
        path = result.path
        del result, loss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - held
    return {"layer": layer, "K": k, "mode": mode, "path": path, "peak_bytes": peak,
            **{f"{phase}_s": statistics.median(values) for phase, values in times.items() if values}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="K = 64 only, one repeat")
    p.add_argument("--child", nargs=3, metavar=("LAYER", "K", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        layer, k, mode = args.child
        print(json.dumps(measure(layer, int(k), mode, args.repeats)))
        return
    ks, repeats = (PERMUTATIONS[:1], 1) if args.quick else (PERMUTATIONS, args.repeats)
    started, load = time.perf_counter(), os.getloadavg()

    def child(layer: str, k: int, mode: str, env: dict) -> dict:  # a fresh process each: ru_maxrss only grows
        out = subprocess.run([sys.executable, __file__, "--child", layer, str(k), mode, "--threads", str(args.threads),
                              "--repeats", str(repeats)], check=True, capture_output=True, text=True,
                             env={**os.environ, **env}).stdout
        return json.loads(out.strip().splitlines()[-1])

    results = []
    for layer in LAYERS:
        for k in ks:
            plain, graph = (child(layer, k, mode, {}) for mode in MODES)
            live_plain, live_graph = (child(layer, k, mode, LIVE)["peak_bytes"] for mode in MODES)
            results.append({
                "layer": layer, "K": k, "path": graph["path"], "map_s": plain["map_s"],
                "forward_s": graph["forward_s"], "backward_s": graph["backward_s"],
                "backward_over_forward": graph["backward_s"] / graph["forward_s"],
                "backward_over_map": graph["backward_s"] / plain["map_s"],
                "peak_map_MiB": live_plain / 2**20, "peak_graph_MiB": live_graph / 2**20,
                "peak_rss_map_MiB": plain["peak_bytes"] / 2**20, "peak_rss_graph_MiB": graph["peak_bytes"] / 2**20,
            })
    print_table(f"Differentiable maps, Lite0, {args.threads} thread(s), medians of {repeats}; peaks in MiB "
                "(live; in parentheses, resident with glibc's default malloc)",
                ["layer", "K", "path", "map s", "forward s", "backward s", "bwd/fwd", "bwd/map", "peak map",
                 "peak graph+bwd"],
                [[r["layer"], r["K"], r["path"], f"{r['map_s']:.3f}", f"{r['forward_s']:.3f}",
                  f"{r['backward_s']:.3f}", f"{r['backward_over_forward']:.2f}", f"{r['backward_over_map']:.2f}",
                  f"{r['peak_map_MiB']:.0f} ({r['peak_rss_map_MiB']:.0f})",
                  f"{r['peak_graph_MiB']:.0f} ({r['peak_rss_graph_MiB']:.0f})"] for r in results])
    payload = {
        "benchmark": "differentiable Shap-CAM maps: backward vs forward, peak memory (Lite0, chelsea)",
        "threads": args.threads, "repeats": repeats, "load_average_before": load, "load_average_after": os.getloadavg(),
        "backend": backend_info(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "results": results, "wall_seconds": time.perf_counter() - started,
    }
    out = ROOT / "bench" / "results" / "differentiable_cpu.json"
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
