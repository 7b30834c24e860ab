"""Shap-CAM on the real EfficientNet-Lite0 and the scikit-image cat: error against a converged
reference at K = 64, 256 and 1024 permutations, with and without antithetic pairs.

    python bench/bench_convergence.py [--reference-permutations 20000] [--repeats 3]

Prints a table, writes bench/results/convergence_<device>.json and the converged map as
bench/results/convergence_map.png. Times are medians over --repeats runs of ShapCAM.explain
(trunk, head evaluations and accumulation, one image).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from shapcam_ext import ShapCAM, backend_info  # noqa: E402
from shapcam_ext.cli.images import bundled_photos, load_image  # noqa: E402
from shapcam_ext.cli.models import imagenet_classes, load_model  # noqa: E402
from shapcam_ext.cli.preprocessing import preprocess  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def relative_l2(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate - reference).norm() / reference.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-permutations", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model, cfg = load_model("tf_efficientnet_lite0")
    model = model.to(args.device)
    x = preprocess(load_image(bundled_photos()["chelsea"]), cfg).to(args.device)

    reference = ShapCAM(model, ["bn2"], n_permutations=args.reference_permutations, seed=12345).explain(x)[0]
    category = reference.target.category
    print(f"target: {imagenet_classes()[category]} (p = {reference.value_full:.3f}); reference K = "
          f"{reference.n_permutations}, max SE {reference.max_std_error:.2e}, path {reference.path}")

    rows = []
    for antithetic in (False, True):
        for k in (64, 256, 1024):
            times, errors = [], []
            for repeat in range(args.repeats):
                cam = ShapCAM(model, ["bn2"], n_permutations=k, antithetic=antithetic, seed=repeat)
                result = cam.explain(x)[0]
                times.append(result.seconds)
                errors.append(relative_l2(result.shapley, reference.shapley))
            rows.append({
                "permutations": k, "antithetic": antithetic, "median_seconds": statistics.median(times),
                "median_relative_l2": statistics.median(errors), "efficiency_gap": result.efficiency_gap,
                "max_std_error": result.max_std_error, "path": result.path,
            })

    print(f"\n{'K':>6} {'antithetic':>10} {'time (s)':>10} {'rel. L2 error':>14} {'efficiency gap':>15}")
    for r in rows:
        print(f"{r['permutations']:>6} {str(r['antithetic']):>10} {r['median_seconds']:>10.4f} "
              f"{100 * r['median_relative_l2']:>13.2f}% {r['efficiency_gap']:>15.1e}")

    RESULTS.mkdir(exist_ok=True)
    report = {
        "backend": backend_info(), "device": args.device, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "class": imagenet_classes()[category],
        "value_full": reference.value_full, "value_empty": reference.value_empty,
        "reference_permutations": reference.n_permutations, "reference_map": reference.shapley.tolist(),
        "rows": rows,
    }
    (RESULTS / f"convergence_{args.device}.json").write_text(json.dumps(report, indent=2))
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    limit = float(reference.shapley.abs().max())
    image = ax.imshow(reference.shapley, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_title(f"Shap-CAM, layer bn2, K={reference.n_permutations}\n{imagenet_classes()[category]}", fontsize=9)
    ax.axis("off")
    fig.colorbar(image, ax=ax, label="Shapley value (Δ probability)")
    fig.tight_layout()
    fig.savefig(RESULTS / "convergence_map.png", dpi=120)
    print(f"\nwrote {RESULTS / f'convergence_{args.device}.json'} and {RESULTS / 'convergence_map.png'}")


if __name__ == "__main__":
    main()
