"""Microbenchmark of the compiled shapcam ops against their pure-PyTorch references.

Both run in the same process on the same inputs; times are medians of torch.utils.benchmark's
blocked_autorange with torch's default thread count. The references are called directly
(shapcam_ext.reference, without the argument checks the fallback path adds), so the speedups
are conservative. Prints a table and writes JSON to bench/results/ops_<device>.json.

    python bench/bench_ops.py [--device cuda] [--out PATH] [--min-run-time 0.3] [--quick]

--quick times the first map shape at K = 8 and 64 only, 0.1 s per measurement, and writes
bench/results/ops_<device>_quick.json.

A round validates and inverts its permutations once (permutation_ranks, its own rows); the ops
that take ranks (masked_prefixes, scatter_marginals_) are timed on given ranks.

masked_prefixes writes K*(n+1) maps of C*h*w values; where that exceeds --chunk-mib (default
256 MiB) the benchmark takes all K permutations but only the first prefix lengths that fit, the
chunk a streaming caller would produce. The table's `maps` column says how many were written.
On CUDA its GB/s are set against the GPU's peak memory bandwidth (from the device's memory
clock and bus width, else a table of the cards we are lent).

linear_walk_ runs on float32 logits (walked in float) and on float64 logits (walked in double):
the cost of the precision policy's choice (csrc/shapcam_math.h). linear_walk_backward (float32)
is set against autograd through the reference walk.
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

# Peak DRAM bandwidth (TB/s) of the cards we are lent, matched against the device name (the
# first key it contains), for when the device does not report its memory clock and bus width.
PEAK_TBPS = {"H200": 4.8, "H100 NVL": 3.9, "H100 PCIe": 2.0, "H100": 3.35, "A100-SXM4-80GB": 2.04, "A100": 1.56}
MAP_SHAPES = [(512, 7, 7), (1280, 7, 7), (512, 14, 14)]
PERMUTATIONS = [8, 64, 256]
CLASSES = 1000


def median_seconds(fn, min_run_time: float) -> float:
    fn()  # warm-up: allocator, caches, lazy initialisation
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def random_perms(k: int, n: int, device: str) -> torch.Tensor:
    return torch.argsort(torch.rand(k, n), dim=1).to(device)


def bench_permutation_ranks(n, k, device, min_run_time):
    perms = random_perms(k, n, device)
    compiled = median_seconds(lambda: torch.ops.shapcam.permutation_ranks(perms), min_run_time)
    ref = median_seconds(lambda: reference.permutation_ranks(perms), min_run_time)
    return dict(op="permutation_ranks", shape=f"n={n}", K=k, compiled_ms=compiled * 1e3, reference_ms=ref * 1e3)


def bench_masked_prefixes(c, h, w, k, device, chunk_bytes, min_run_time):
    n = h * w
    acts = torch.randn(c, h, w, device=device)
    base = acts.mean((1, 2), keepdim=True)
    ranks = reference.permutation_ranks(random_perms(k, n, device))
    map_bytes = c * n * acts.element_size()
    prefixes = max(1, min(n + 1, chunk_bytes // (k * map_bytes)))
    args = (acts, base, ranks, 0, k, 0, prefixes)
    compiled = median_seconds(lambda: torch.ops.shapcam.masked_prefixes(*args), min_run_time)
    ref = median_seconds(lambda: reference.masked_prefixes(*args), min_run_time)
    maps = k * prefixes
    moved = maps * map_bytes + 2 * map_bytes + ranks.numel() * 8  # written, then read once
    row = dict(op="masked_prefixes", shape=f"{c}x{h}x{w}", K=k, maps=f"{maps}/{k * (n + 1)}",
               mib=round(maps * map_bytes / 2**20, 1), compiled_ms=compiled * 1e3, reference_ms=ref * 1e3)
    row["GB/s"] = moved / compiled / 1e9
    return row


def bench_scatter_marginals(n, k, device, min_run_time):
    values = torch.randn(k, n + 1, device=device)
    ranks = reference.permutation_ranks(random_perms(k, n, device))
    phi, phi_sq = torch.zeros(n, device=device), torch.zeros(n, device=device)
    compiled = median_seconds(lambda: torch.ops.shapcam.scatter_marginals_(values, ranks, phi, phi_sq), min_run_time)
    ref = median_seconds(lambda: reference.scatter_marginals_(values, ranks, phi, phi_sq), min_run_time)
    return dict(op="scatter_marginals_", shape=f"n={n}", K=k, compiled_ms=compiled * 1e3, reference_ms=ref * 1e3)


def bench_linear_walk(n, k, device, min_run_time, dtype=torch.float32):
    """The softmax walk of ``dtype`` logits into accumulators of the same dtype."""
    start = torch.randn(1, CLASSES, device=device, dtype=dtype)
    deltas = torch.randn(1, n, CLASSES, device=device, dtype=dtype) / n
    perms = random_perms(k, n, device)
    classes = torch.tensor([7], device=device)
    phi, phi_sq = torch.zeros(1, n, device=device, dtype=dtype), torch.zeros(1, n, device=device, dtype=dtype)
    args = (start, deltas, perms, classes, True, phi, phi_sq)
    compiled = median_seconds(lambda: torch.ops.shapcam.linear_walk_(*args), min_run_time)
    ref = median_seconds(lambda: reference.linear_walk_(*args), min_run_time)
    return dict(op="linear_walk_ (softmax)", shape=f"n={n},M={CLASSES},{str(dtype)[6:]}", K=k,
                compiled_ms=compiled * 1e3, reference_ms=ref * 1e3)


def bench_linear_walk_backward(n, k, device, min_run_time):
    """Both gradients of the float32 softmax walk, summed in float64 as the engine sums."""
    start = torch.randn(1, CLASSES, device=device)
    deltas = torch.randn(1, n, CLASSES, device=device) / n
    perms = random_perms(k, n, device)
    classes = torch.tensor([7], device=device)
    grad = torch.randn(1, n, device=device, dtype=torch.float64)
    args = (grad, start, deltas, perms, classes, True, [True, True])
    compiled = median_seconds(lambda: torch.ops.shapcam.linear_walk_backward(*args), min_run_time)
    ref = median_seconds(lambda: reference.linear_walk_backward(*args), min_run_time)
    return dict(op="linear_walk_backward", shape=f"n={n},M={CLASSES},float32", K=k,
                compiled_ms=compiled * 1e3, reference_ms=ref * 1e3)


def peak_bandwidth(name: str):
    """(TB/s, how it was found) of the current GPU's memory: double data rate times the bus width
    where torch reports the memory clock, else PEAK_TBPS, else (None, why)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e12, f"2 x {clock_khz / 1e3:.0f} MHz x {bus_bits} bits"
    for key, tbps in PEAK_TBPS.items():
        if key in name:
            return tbps, f"datasheet ({key})"
    return None, "unknown: the device reports no memory clock and is not in PEAK_TBPS"


def format_table(rows, with_bandwidth: bool) -> str:
    columns = ["op", "shape", "K", "maps", "mib", "compiled_ms", "reference_ms", "speedup"]
    if with_bandwidth:
        columns += ["GB/s", "of_peak"]
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
    parser.add_argument("--quick", action="store_true", help="the first map shape, K = 8 and 64, 0.1 s each")
    args = parser.parse_args()
    shapes, permutations = (MAP_SHAPES[:1], PERMUTATIONS[:2]) if args.quick else (MAP_SHAPES, PERMUTATIONS)
    if args.quick:
        args.min_run_time = 0.1

    info = backend_info()
    if info["backend"] != "compiled" or not info[f"{args.device}_kernels"]:
        print(f"the compiled {args.device} kernels are not available: {info}", file=sys.stderr)
        return 1
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda needs a GPU", file=sys.stderr)
        return 1
    torch.manual_seed(0)

    rows, walk_ms = [], {}
    for c, h, w in shapes:
        for k in permutations:
            rows.append(bench_masked_prefixes(c, h, w, k, args.device, args.chunk_mib << 20, args.min_run_time))
    for n in sorted({h * w for _, h, w in shapes}):
        for k in permutations:
            rows.append(bench_permutation_ranks(n, k, args.device, args.min_run_time))
        for k in permutations:
            rows.append(bench_scatter_marginals(n, k, args.device, args.min_run_time))
        for dtype in (torch.float32, torch.float64):
            for k in permutations:
                rows.append(bench_linear_walk(n, k, args.device, args.min_run_time, dtype))
                walk_ms[n, k, dtype] = rows[-1]["compiled_ms"]
        for k in permutations:
            rows.append(bench_linear_walk_backward(n, k, args.device, args.min_run_time))
    for row in rows:
        row["speedup"] = row["reference_ms"] / row["compiled_ms"]
        if args.device == "cpu":
            row.pop("GB/s", None)

    meta = dict(device=args.device, torch=torch.__version__, threads=torch.get_num_threads(),
                machine=platform.processor() or platform.machine(), chunk_mib=args.chunk_mib, quick=args.quick)
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
        meta["device_name"] = name
        meta["peak_TB/s"], meta["peak_from"] = peak_bandwidth(name)
        if meta["peak_TB/s"]:
            for row in rows:
                if "GB/s" in row:
                    row["of_peak"] = row["GB/s"] / 1e3 / meta["peak_TB/s"]
    meta["double_walk_cost"] = {f"n={n},K={k}": walk_ms[n, k, torch.float64] / walk_ms[n, k, torch.float32]
                                for n, k, dtype in walk_ms if dtype == torch.float32}
    print(f"shapcam ops, compiled vs reference: {meta}")
    print(format_table(rows, with_bandwidth=args.device == "cuda"))
    if meta.get("peak_TB/s"):
        best = max(rows, key=lambda r: r.get("GB/s", 0))
        print(f"masked_prefixes best {best['GB/s']:.0f} GB/s = {best['of_peak']:.0%} of the {meta['device_name']} "
              f"peak {meta['peak_TB/s']:.2f} TB/s ({meta['peak_from']})")
    costs = meta["double_walk_cost"].values()
    print(f"linear_walk_: the double walk takes {min(costs):.1f}x to {max(costs):.1f}x the float walk's time")
    slower = [f"{r['op']} {r['shape']} K={r['K']}" for r in rows if r["speedup"] <= 1]
    print("compiled ahead on every shape" if not slower else f"compiled NOT ahead on: {slower}")

    name = f"ops_{args.device}{'_quick' if args.quick else ''}.json"  # a quick run keeps the full one
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)
    print(f"wrote {out}")
    return 0 if not slower else 2


if __name__ == "__main__":
    sys.exit(main())
