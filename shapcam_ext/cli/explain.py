"""The ``shapcam`` command: explain images with Shap-CAM, and report the installation.

``shapcam explain`` loads one model, then explains each image in turn: one PNG figure per image
and the model's top classes and the run's figures on stdout (or one JSON document with
``--json``). Expected failures (unknown model or layer, unreadable weights or images) print one
``error:`` line on stderr; the other images are still explained and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

import shapcam_ext
from shapcam_ext.cli import distributed
from shapcam_ext._backend import backend_info

if TYPE_CHECKING:
    from shapcam_ext.cli.preprocessing import PreprocessConfig

DEFAULT_PERMUTATIONS = 256
DEFAULT_PERMUTATION_CAP = 4096  # with --tolerance
DEFAULT_OUT = "shapcam_out"
SCORECAM_BATCH = 64

# --compare name -> (pytorch-grad-cam class, panel title)
COMPARE_METHODS = {
    "gradcam": ("GradCAM", "Grad-CAM"),
    "gradcam++": ("GradCAMPlusPlus", "Grad-CAM++"),
    "scorecam": ("ScoreCAM", "Score-CAM"),
}

# What a run may fail on without it being a bug: bad names, files, settings, devices, NaNs.
EXPECTED_ERRORS = (ValueError, OSError, RuntimeError)


class SetupError(Exception):
    """A problem with the model, layer, weights or device: no image can be explained."""


# ---------------------------------------------------------------------------------- arguments


def _positive(kind: type) -> Callable[[str], object]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def _target(text: str):
    if text == "top":
        return None
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a class index (0, 1, ...) or 'top', got {text!r}")


def _methods(text: str) -> list[str]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in COMPARE_METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method {', '.join(unknown) or text!r}; choose from {', '.join(COMPARE_METHODS)}"
        )
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    from shapcam_ext.cli.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(
        prog="shapcam", description="Shap-CAM: Shapley values of a layer's feature-map positions as saliency maps."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{explain,info}")

    explain = commands.add_parser(
        "explain", help="explain images and write one PNG figure per image",
        description="Explain images with Shap-CAM. Without IMAGE arguments, the photos bundled with "
                    "scikit-image, matplotlib and scikit-learn are explained.",
    )
    explain.add_argument("images", nargs="*", metavar="IMAGE", help="image files (default: the bundled photos)")
    explain.add_argument("--model", default=DEFAULT_MODEL,
                         help=f"torchvision or timm model name, optionally 'timm:' or 'torchvision:' "
                              f"prefixed (default: {DEFAULT_MODEL}, with real ImageNet weights)")
    explain.add_argument("--weights", metavar="PATH", help="local state-dict checkpoint, loaded with weights_only=True")
    explain.add_argument("--layer", help="target layer's qualified name (default: the model's last feature map)")
    explain.add_argument("--target", type=_target, default=None, metavar="CLASS|top",
                         help="class index to explain, or 'top' for each image's top class (default)")
    explain.add_argument("--permutations", type=_positive(int), metavar="K",
                         help=f"permutations to sample (default {DEFAULT_PERMUTATIONS}; "
                              f"the cap with --tolerance, default {DEFAULT_PERMUTATION_CAP})")
    explain.add_argument("--tolerance", type=_positive(float), metavar="E",
                         help="sample until max std error / max |value| < E")
    explain.add_argument("--antithetic", action=argparse.BooleanOptionalAction, default=True,
                         help="pair each permutation with its reverse (default: on)")
    explain.add_argument("--seed", type=int, default=0, help="permutation seed (default 0)")
    explain.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    explain.add_argument("--compare", type=_methods, default=[], metavar="METHODS",
                         help=f"comma-separated pytorch-grad-cam methods to add as panels: {','.join(COMPARE_METHODS)}")
    explain.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), metavar="DIR",
                         help=f"folder for the PNG figures (default {DEFAULT_OUT})")
    explain.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    explain.set_defaults(run=run_explain)

    info = commands.add_parser("info", help="show the version, the active backend and the device")
    info.set_defaults(run=run_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``shapcam`` and ``python -m shapcam_ext``; returns the exit status.

    0 on success, 1 if anything failed, 2 for a usage error (argparse exits with it).
    """
    args = build_parser().parse_args(argv)
    return args.run(args)


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------- info


def run_info(args: argparse.Namespace) -> int:
    info = backend_info()
    if info["backend"] == "compiled":
        kernels = ", ".join(device for device in ("cpu", "cuda") if info[f"{device}_kernels"]) or "none"
        backend = f"compiled (kernels: {kernels})"
    else:
        backend = "reference (pure-PyTorch ops; the compiled library is not loaded)"
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    if info["cuda_available"]:
        device = f"cuda available: {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} device(s))"
    else:
        device = "cpu only (torch.cuda.is_available() is False)"
    print(f"shapcam_ext {shapcam_ext.__version__}")
    print(f"backend  {backend}")
    print(f"torch    {torch.__version__} ({build})")
    print(f"device   {device}")
    return 0


# ------------------------------------------------------------------------------------ explain


@dataclass
class Session:
    """Everything loaded once and shared by the images of one ``explain`` run."""

    args: argparse.Namespace
    model: torch.nn.Module
    preprocess: "PreprocessConfig"
    layer: str
    cam: shapcam_ext.ShapCAM
    class_names: Optional[list[str]]
    n_classes: int
    device: torch.device

    def class_name(self, index: int) -> str:
        return self.class_names[index] if self.class_names else f"class {index}"


def _open_session(args: argparse.Namespace) -> Session:
    """Loads the model and builds the explainer; raises SetupError naming what is wrong."""
    from shapcam_ext.cli.models import default_layer, imagenet_classes, load_model

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"--device cuda: CUDA is not available to torch {torch.__version__}; use --device cpu")
    device = torch.device(args.device)
    try:
        model, preprocess = load_model(args.model, args.weights)
    except EXPECTED_ERRORS as err:
        raise SetupError(f"model {args.model!r}: {err}") from err
    model.to(device)
    try:
        layer = args.layer or default_layer(args.model, model, preprocess.input_size)
        cam = shapcam_ext.ShapCAM(
            model, [layer],
            n_permutations=args.permutations or (DEFAULT_PERMUTATION_CAP if args.tolerance else DEFAULT_PERMUTATIONS),
            tolerance=args.tolerance, antithetic=args.antithetic, seed=args.seed,
            progress=sys.stderr.isatty(),
        )
        with torch.no_grad():
            n_classes = model(torch.zeros(1, 3, *preprocess.input_size, device=device)).shape[-1]
    except EXPECTED_ERRORS as err:
        raise SetupError(f"model {args.model!r}: {err}") from err
    if args.target is not None and args.target >= n_classes:
        raise SetupError(f"--target {args.target}: {args.model} has {n_classes} classes (0 to {n_classes - 1})")
    class_names = imagenet_classes() if n_classes == 1000 else None
    return Session(args, model, preprocess, layer, cam, class_names, n_classes, device)


def _output_path(image: Path, out: Path, taken: set) -> Path:
    """``out/<stem>_shapcam.png``, numbered when two images share a stem (never the input itself)."""
    path, number = out / f"{image.stem}_shapcam.png", 1
    while path in taken:
        path, number = out / f"{image.stem}_shapcam_{number}.png", number + 1
    taken.add(path)
    return path


def _compare(session: Session, method: str, x: torch.Tensor, category: int):
    """pytorch-grad-cam's map of ``method`` for the same layer and class (its logit, as is its custom)."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class_name, _ = COMPARE_METHODS[method]
    module = dict(session.model.named_modules())[session.layer]
    start = time.perf_counter()
    with getattr(pytorch_grad_cam, class_name)(model=session.model, target_layers=[module]) as cam:
        cam.batch_size = SCORECAM_BATCH  # only ScoreCAM reads it; its default of 16 is slow
        mask = cam(input_tensor=x, targets=[ClassifierOutputTarget(category)])[0]
    return mask, time.perf_counter() - start


def _explain_image(session: Session, image: Path, png: Path) -> dict:
    """Explains one image, writes its figure, and returns its record (see ``run_explain``)."""
    from shapcam_ext.cli.images import load_image
    from shapcam_ext.cli.preprocessing import preprocess, unnormalize
    from shapcam_ext.cli.overlay import explanation_figure, save_figure

    args = session.args
    picture = load_image(image)
    x = preprocess(picture, session.preprocess).to(session.device)
    with torch.no_grad():
        probabilities = session.model(x).softmax(-1)[0].cpu()
    category = int(probabilities.argmax()) if args.target is None else args.target
    result = session.cam.explain(x, [shapcam_ext.ClassifierOutputSoftmaxTarget(category)])[0]

    panels, compare = {}, {}
    for method in args.compare:
        mask, seconds = _compare(session, method, x, category)
        title = COMPARE_METHODS[method][1]
        panels[f"{title} ({seconds:.1f} s)"] = mask
        compare[method] = {"seconds": seconds}

    name = session.class_name(category)
    label = f"{image.name} · {args.model}: {name} ({probabilities[category]:.1%})"
    if category != int(probabilities.argmax()):
        label += f"; top class {session.class_name(int(probabilities.argmax()))} ({probabilities.max():.1%})"
    save_figure(explanation_figure(unnormalize(x[0], session.preprocess), result, label, panels), png)

    top = probabilities.topk(min(5, session.n_classes))
    return {
        "image": str(image),
        "png": str(png),
        "model": args.model,
        "layer": result.layer,
        "target": {"index": category, "name": name, "score": "softmax probability"},
        "top5": [{"index": int(i), "name": session.class_name(int(i)), "probability": float(p)}
                 for p, i in zip(top.values, top.indices)],
        "n_permutations": result.n_permutations,
        "antithetic": args.antithetic,
        "seed": args.seed,
        "tolerance": args.tolerance,
        "max_std_error": result.max_std_error,
        "efficiency_gap": result.efficiency_gap,
        "value_full": result.value_full,
        "value_empty": result.value_empty,
        "seconds": result.seconds,
        "backend": result.backend,
        "device": str(session.device),
        "shapley": result.shapley.tolist(),
        "compare": compare,
        "error": None,
    }


def _as_text(record: dict, position: str) -> str:
    lines = [f"[{position}] {record['image']}"]
    if record["error"]:
        return "\n".join(lines + [f"  failed   {record['error']}"])
    for rank, entry in enumerate(record["top5"]):
        lines.append(f"  {'top-5' if rank == 0 else '':8} {entry['probability']:6.1%}  {entry['name']}")
    lines.append(f"  target   {record['target']['index']} {record['target']['name']} (softmax probability)")
    lines.append(
        f"  run      {record['n_permutations']} permutations · max std error {record['max_std_error']:.2g} · "
        f"efficiency gap {record['efficiency_gap']:.1e} · {record['seconds']:.3g} s · "
        f"layer {record['layer']} · {record['backend']} backend"
    )
    if record["compare"]:
        times = ", ".join(f"{method} {entry['seconds']:.1f} s" for method, entry in record["compare"].items())
        lines.append(f"  compare  {times}")
    lines.append(f"  saved    {record['png']}")
    return "\n".join(lines)


def _failure(image: Path, err: Exception) -> dict:
    message = str(err)
    if str(image) not in message:  # image errors from images.load_image already name the file
        message = f"{image}: {message}"
    return {"image": str(image), "png": None, "error": message}


def run_explain(args: argparse.Namespace) -> int:
    """Explains every image; the JSON document is a list with one record per image, in order.

    A record holds the image and PNG paths, model, layer, target, top-5 classes, the run's
    figures, the signed Shapley map and comparison timings, and ``error`` (None, or the message).
    """
    from tqdm.auto import tqdm

    from shapcam_ext.cli.images import bundled_photos

    images = [Path(p) for p in args.images] or list(bundled_photos().values())
    if not images:
        _error("no IMAGE given and no bundled photos found (install scikit-image or matplotlib)")
        return 1
    try:
        session = _open_session(args)
    except SetupError as err:
        _error(str(err))
        if args.json:
            print(json.dumps([{"image": str(image), "png": None, "error": str(err)} for image in images], indent=2))
        return 1

    taken: set = set()
    pngs = [_output_path(image, args.out, taken) for image in images]
    # Under torchrun each process explains every WORLD_SIZE-th image; rank 0 reports them all.
    with distributed.process_group():
        mine = distributed.my_share(len(images))
        local = []
        bar = tqdm(mine, desc="images", unit="image", disable=None)
        for index in bar:
            try:
                record = _explain_image(session, images[index], pngs[index])
            except EXPECTED_ERRORS as err:
                record = _failure(images[index], err)
                _error(record["error"])
            local.append(record)
            if not args.json:
                bar.write(_as_text(record, f"{index + 1}/{len(images)}"), file=sys.stdout)
        records = distributed.gather_in_order(local, len(images))
    if args.json and distributed.world()[0] == 0:
        print(json.dumps(records, indent=2))
    return 1 if any(record["error"] for record in records) else 0
