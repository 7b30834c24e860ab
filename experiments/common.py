"""Shared pieces of the ImageNet-model experiments: the real model, the bundled photos, the CAM
methods under comparison, a map cache, box geometry and figure helpers.

Every method is run through its pytorch-grad-cam-style call, so all maps obey one contract:
(H, W) float32 in [0, 1] at input resolution (ReLU, per-image min-max, bilinear upsampling).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python experiments/x.py` from the repository root
    sys.path.insert(0, str(ROOT))

warnings.filterwarnings("ignore", message="shapcam_ext: the compiled library")  # reported once below

import shapcam_ext  # noqa: E402
from shapcam_ext import ClassifierOutputSoftmaxTarget, ShapCAM  # noqa: E402
from shapcam_ext.postprocess import scale_cam_image  # noqa: E402
from shapcam_ext.cli.images import bundled_photos, load_image  # noqa: E402
from shapcam_ext.cli.layers import default_layer  # noqa: E402
from shapcam_ext.cli.models import load_model  # noqa: E402
from shapcam_ext.cli.preprocessing import PreprocessConfig, preprocess, to_display_rgb  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("GradCAM", "GradCAM++", "ScoreCAM", "ShapCAM")
MODEL = "tf_efficientnet_lite0"  # the only model with real ImageNet weights offline


@dataclass
class Photo:
    name: str
    size: tuple[int, int]  # (width, height) of the original file
    x: torch.Tensor  # (1, 3, H, W) model input
    rgb: np.ndarray  # (H, W, 3) float32 in [0, 1], aligned with x


def load_lite0() -> tuple[torch.nn.Module, PreprocessConfig, str]:
    """The real EfficientNet-Lite0 (eval mode), its preprocessing and its target layer name (bn2)."""
    model, cfg = load_model(MODEL)
    return model, cfg, default_layer(MODEL, model)


def load_photos(cfg: PreprocessConfig, names: Optional[list[str]] = None) -> list[Photo]:
    photos = bundled_photos()
    out = []
    for name in names or list(photos):
        img = load_image(photos[name])
        out.append(Photo(name, img.size, preprocess(img, cfg), to_display_rgb(img, cfg)))
    return out


@torch.no_grad()
def class_probs(model: torch.nn.Module, x: torch.Tensor, classes: list[int]) -> np.ndarray:
    """Softmax probability of classes[i] for image x[i]."""
    probs = model(x).softmax(-1)
    return probs[torch.arange(len(classes)), torch.tensor(classes)].double().numpy()


def environment() -> dict:
    return {
        "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "shapcam_ext": shapcam_ext.__version__, "shapcam_backend": shapcam_ext.backend_info()["backend"],
        "cpu": platform.processor() or platform.machine(),
    }


# --------------------------------------------------------------------------------- methods


def _gradcam_map(cls, model, layer, x, category, batch_size):
    """A pytorch-grad-cam method with its default target, the class logit (as in its papers)."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with cls(model=model, target_layers=[layer]) as cam:
        cam.batch_size = batch_size  # only ScoreCAM reads it: masked copies per forward pass
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(category)])[0], {}


def _shapcam_map(model, layer, x, category, n_permutations, seed):
    """Shap-CAM of the softmax probability (the paper's Y^c) with antithetic permutation pairs.

    explain() gives the diagnostics; the map goes through the same post-processing as
    ShapCAM.__call__ (ReLU, min-max, resize), so it is computed once.
    """
    cam = ShapCAM(model, target_layers=[layer], n_permutations=n_permutations, seed=seed)
    result = cam.explain(x, [ClassifierOutputSoftmaxTarget(category)])[0]
    size = (x.shape[-1], x.shape[-2])
    heat = result.cam_image(size)
    info = {
        "value_full": result.value_full, "value_empty": result.value_empty,
        "shapley_sum": float(result.shapley.sum()), "efficiency_gap": result.efficiency_gap,
        "max_abs_shapley": float(result.shapley.abs().max()), "max_std_error": result.max_std_error,
        "n_permutations": result.n_permutations, "backend": result.backend,
        "negative_share": float(result.shapley.clamp_max(0).abs().sum() / result.shapley.abs().sum()),
    }
    return heat, info


def compute_map(method: str, model, layer_name: str, x: torch.Tensor, category: int, *,
                n_permutations: int, seed: int, scorecam_batch: int) -> tuple[np.ndarray, dict]:
    """One method's (H, W) map for one image and class, plus diagnostics (incl. seconds)."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM

    layer = dict(model.named_modules())[layer_name]
    start = time.perf_counter()
    if method == "ShapCAM":
        heat, info = _shapcam_map(model, layer, x, category, n_permutations, seed)
    else:
        cls = {"GradCAM": GradCAM, "GradCAM++": GradCAMPlusPlus, "ScoreCAM": ScoreCAM}[method]
        heat, info = _gradcam_map(cls, model, layer, x, category, scorecam_batch)
    info["seconds"] = time.perf_counter() - start
    return np.asarray(heat, dtype=np.float32), info


def random_map(size: tuple[int, int], grid: int, rng: np.random.Generator) -> np.ndarray:
    """A reference map: uniform noise on a grid x grid lattice (the feature-map size), upsampled like a CAM."""
    noise = torch.from_numpy(rng.random((1, grid, grid)))
    return scale_cam_image(noise, (size[1], size[0]))[0]


class MapCache:
    """Maps on disk keyed by everything that determines them, so the two ImageNet experiments share work.

    Maps are rounded to float16 (steps of at most 5e-4 in [0, 1]) whether cached or fresh.
    """

    def __init__(self, folder: Optional[Path]):
        self.folder = folder
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def get(self, method, model, layer_name, photo: Photo, category, **settings) -> tuple[np.ndarray, dict]:
        # only Shap-CAM's settings change a map (ScoreCAM's batch size does not)
        relevant = {k: settings[k] for k in ("n_permutations", "seed")} if method == "ShapCAM" else {}
        key = json.dumps([MODEL, layer_name, photo.name, category, method, relevant], sort_keys=True)
        path = None if self.folder is None else self.folder / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"
        if path is not None and path.is_file():
            stored = np.load(path, allow_pickle=False)
            return stored["map"].astype(np.float32), {**json.loads(str(stored["info"])), "cached": True}
        heat, info = compute_map(method, model, layer_name, photo.x, category, **settings)
        heat = heat.astype(np.float16)  # stored at half precision; rounded the same way when fresh,
        if path is not None:            # so a cached and a fresh run give identical tables
            np.savez_compressed(path, map=heat, info=json.dumps(info), key=key)
        return heat.astype(np.float32), {**info, "cached": False}


# ---------------------------------------------------------------------------------- boxes


def box_to_input(box, image_size: tuple[int, int], cfg: PreprocessConfig) -> list[float]:
    """Map a box (x0, y0, x1, y1) in original-image pixels into the model input's pixels.

    Mirrors shapcam_ext.cli.preprocessing's resize + centre crop ("squash" or "center" mode) and clips to the crop.
    """
    width, height = image_size
    in_h, in_w = cfg.input_size
    scale = [math.floor(in_h / cfg.crop_pct), math.floor(in_w / cfg.crop_pct)]
    if cfg.crop_mode == "squash":
        new_h, new_w = scale
    elif scale[0] == scale[1]:  # shorter side to scale, aspect kept (torchvision int-size resize)
        short, long = (height, width) if height <= width else (width, height)
        new_short, new_long = scale[0], int(scale[0] * long / short)
        new_h, new_w = (new_short, new_long) if height <= width else (new_long, new_short)
    else:
        factor = max(scale[0] / height, scale[1] / width)
        new_h, new_w = round(height * factor), round(width * factor)
    top, left = int(round((new_h - in_h) / 2.0)), int(round((new_w - in_w) / 2.0))
    x0, y0, x1, y1 = box
    sx, sy = new_w / width, new_h / height
    return [float(np.clip(x0 * sx - left, 0, in_w)), float(np.clip(y0 * sy - top, 0, in_h)),
            float(np.clip(x1 * sx - left, 0, in_w)), float(np.clip(y1 * sy - top, 0, in_h))]


# --------------------------------------------------------------------------------- figures


def overlay(rgb: np.ndarray, heat: np.ndarray) -> np.ndarray:
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(rgb, heat, use_rgb=True, image_weight=0.5)


def save_map_grid(path, rows: list, title: str, boxes: Optional[list] = None) -> None:
    """One row per image: the photo, then one overlay per method.

    rows: (rgb, row title, [(heat map, panel title), ...]) per image; boxes: per row, boxes
    drawn on every panel (lime on the photo, white on the overlays).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cols = 1 + len(rows[0][2])
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.3 * len(rows)), squeeze=False)
    for i, (rgb, row_title, panels) in enumerate(rows):
        axes[i, 0].imshow(rgb)
        axes[i, 0].set_title(row_title, fontsize=7)
        for j, (heat, panel_title) in enumerate(panels, 1):
            axes[i, j].imshow(overlay(rgb, heat))
            axes[i, j].set_title(panel_title, fontsize=7)
        for j, ax in enumerate(axes[i]):
            for x0, y0, x1, y1 in (boxes[i] if boxes else []):
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                                       edgecolor="lime" if j == 0 else "white", linewidth=1.5))
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the suptitle
    fig.savefig(path, dpi=90)
    plt.close(fig)


def map_arguments(description: str, quick_help: str, name: str) -> argparse.ArgumentParser:
    """The options both ImageNet experiments share: which photos, how maps are made, where results go."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", nargs="*", help="photo names (default: all bundled photos)")
    p.add_argument("--n-permutations", type=int, default=256, help="Shap-CAM permutations K per image")
    p.add_argument("--seed", type=int, default=0, help="Shap-CAM permutation seed")
    p.add_argument("--random-maps", type=int, default=20, help="random 7x7 reference maps per image")
    p.add_argument("--scorecam-batch", type=int, default=64, help="masked inputs per ScoreCAM forward pass")
    p.add_argument("--cache-dir", default="/tmp/shapcam_experiments_cache", help="map cache ('' disables it)")
    p.add_argument("--quick", action="store_true", help=f"{quick_help}, K = 32, 5 random maps")
    p.add_argument("--out", default=str(RESULTS / f"{name}.json"))
    p.add_argument("--figure", default=str(RESULTS / f"{name}_maps.png"))
    return p


def parse_map_arguments(p: argparse.ArgumentParser, quick_images: list) -> argparse.Namespace:
    args = p.parse_args()
    if args.quick:
        args.images = args.images or quick_images
        args.n_permutations, args.random_maps = 32, 5
    return args


def save_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
