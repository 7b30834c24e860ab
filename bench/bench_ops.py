"""Microbenchmark of the compiled shapcam ops against their pure-PyTorch references.

Both run in the same process on the same inputs; times are medians of torch.utils.benchmark's
blocked_autorange with torch's default thread count. The references are called directly
(shapcam_ext.reference, without the argument checks the fallback path adds), so the speedups
are conservative. Prints a table and writes JSON to bench/results/ops_<device>.json.

    python bench/bench_ops.py [--device cuda] [--out PATH] [--min-run-time 0.3]

masked_prefixes writes K*(n+1) maps of C*h*w values; where that exceeds --chunk-mib (default
256 MiB) the benchmark takes all K permutations but only the first prefix lengths that fit, the
chunk a streaming caller would produce. The table's `maps` column says how many were written.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch
from torch.utils import benchmark

from shapcam_ext import reference
from shapcam_ext._backend import backend_info

# Peak DRAM bandwidth (TB/s) of the cards we are lent, matched against the device name.
PEAK_TBPS = {"H200": 4.8, "H100 PCIe": 2.0, "H100": 3.35, "A100-SXM4-80GB": 2.04, "A100": 1.56}
MAP_SHAPES = [(512, 7, 7), (1280, 7, 7), (512, 14, 14)]
PERMUTATIONS = [8, 64, 256]
CLASSES = 1000


def median_seconds(fn, min_run_time: float) -> float:
    fn()  # warm-up: allocator, caches, lazy initialisation
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def random_perms(k: int, n: int, device: str) -> torch.Tensor:
    return torch.argsort(torch.rand(k, n), dim=1).to(device)


def bench_masked_prefixes(c, h, w, k, device, chunk_bytes, min_run_time):
    n = h * w
    acts = torch.randn(c, h, w, device=device)
    base = acts.mean((1, 2), keepdim=True)
    perms = random_perms(k, n, device)
    map_bytes = c * n * acts.element_size()
    prefixes = max(1, min(n + 1, chunk_bytes // (k * map_bytes)))
    args = (acts, base, perms, 0, k, 0, prefixes)
    compiled = median_seconds(lambda: torch.ops.shapcam.masked_prefixes(*args), min_run_time)
    ref = median_seconds(lambda: reference.masked_prefixes(*args), min_run_time)
    maps = k * prefixes
    moved = maps * map_bytes + 2 * map_bytes + perms.numel() * 8  # written, then read once
    row = dict(op="masked_prefixes", shape=f"{c}x{h}x{w}", K=k, maps=f"{maps}/{k * (n + 1)}",
               mib=round(maps * map_bytes / 2**20, 1), compiled_ms=compiled * 1e3, reference_ms=ref * 1e3)
    row["GB/s"] = moved / compiled / 1e9
    return row


def bench_scatter_marginals(n, k, device, min_run_time):
    values = torch.randn(k, n + 1, device=device)
    perms = random_perms(k, n, device)
    phi, phi_sq = torch.zeros(n, device=device), torch.zeros(n, device=device)
    compiled = median_seconds(lambda: torch.ops.shapcam.scatter_marginals_(values, perms, phi, phi_sq), min_run_time)
    ref = median_seconds(lambda: reference.scatter_marginals_(values, perms, phi, phi_sq), min_run_time)
    return dict(op="scatter_marginals_", shape=f"n={n}", K=k, compiled_ms=compiled * 1e3, reference_ms=ref * 1e3)


def bench_linear_walk(n, k, device, min_run_time):
    start = torch.randn(1, CLASSES, device=device)
    deltas = torch.randn(1, n, CLASSES, device=device) / n
    perms = random_perms(k, n, device)
    classes = torch.tensor([7], device=device)
    phi, phi_sq = torch.zeros(1, n, device=device), torch.zeros(1, n, device=device)
    args = (start, deltas, perms, classes, True, phi, phi_sq)
    compiled = median_seconds(lambda: torch.ops.shapcam.linear_walk_(*args), min_run_time)
    ref = median_seconds(lambda: reference.linear_walk_(*args), min_run_time)
    return dict(op="linear_walk_ (softmax)", shape=f"n={n},M={CLASSES}", K=k, compiled_ms=compiled * 1e3,
                reference_ms=ref * 1e3)


def format_table(rows, with_bandwidth: bool) -> str:
    columns = ["op", "shape", "K", "maps", "mib", "compiled_ms", "reference_ms", "speedup"]
    if with_bandwidth:
        columns.append("GB/s")
    cells = [[fmt(row.get(col, "")) for col in columns] for row in rows]
    widths = [max(len(col), *(len(c[i]) for c in cells)) for i, col in enumerate(columns)]
    line = lambda values: " | ".join(v.rjust(wd) for v, wd in zip(values, widths))  # noqa: E731
    return "\n".join([line(columns), "-+-".join("-" * wd for wd in widths), *map(line, cells)])


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", help="JSON path (default bench/results/ops_<device>.json)")
    parser.add_argument("--chunk-mib", type=int, default=256, help="cap on one masked_prefixes output")
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds timed per measurement")
    args = parser.parse_args()

    info = backend_info()
    if info["backend"] != "compiled" or not info[f"{args.device}_kernels"]:
        print(f"the compiled {args.device} kernels are not available: {info}", file=sys.stderr)
        return 1
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda needs a GPU", file=sys.stderr)
        return 1
    torch.manual_seed(0)

    rows = []
    for c, h, w in MAP_SHAPES:
        for k in PERMUTATIONS:
            rows.append(bench_masked_prefixes(c, h, w, k, args.device, args.chunk_mib << 20, args.min_run_time))
    for n in sorted({h * w for _, h, w in MAP_SHAPES}):
        for k in PERMUTATIONS:
            rows.append(bench_scatter_marginals(n, k, args.device, args.min_run_time))
        for k in PERMUTATIONS:
            rows.append(bench_linear_walk(n, k, args.device, args.min_run_time))
    for row in rows:
        row["speedup"] = row["reference_ms"] / row["compiled_ms"]
        if args.device == "cpu":
            row.pop("GB/s", None)

    meta = dict(device=args.device, torch=torch.__version__, threads=torch.get_num_threads(),
                machine=platform.processor() or platform.machine(), chunk_mib=args.chunk_mib)
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
        meta["device_name"] = name
        meta["peak_TB/s"] = next((tbps for key, tbps in PEAK_TBPS.items() if key in name), None)
    print(f"shapcam ops, compiled vs reference: {meta}")
    print(format_table(rows, with_bandwidth=args.device == "cuda"))
    if meta.get("peak_TB/s"):
        best = max(r["GB/s"] for r in rows if "GB/s" in r)
        print(f"masked_prefixes best {best:.0f} GB/s = {best / 1e3 / meta['peak_TB/s']:.0%} of the "
              f"{meta['device_name']} peak {meta['peak_TB/s']} TB/s")
    slower = [f"{r['op']} {r['shape']} K={r['K']}" for r in rows if r["speedup"] <= 1]
    print("compiled ahead on every shape" if not slower else f"compiled NOT ahead on: {slower}")

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"ops_{args.device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)
    print(f"wrote {out}")
    return 0 if not slower else 2


if __name__ == "__main__":
    sys.exit(main())
