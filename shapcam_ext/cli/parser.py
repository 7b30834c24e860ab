"""The command's arguments: ``shapcam [--version] {explain,evaluate,info} ...``, with usage examples in ``--help``."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch

from shapcam_ext.cli.info import version_text
from shapcam_ext.cli.methods import METHODS
from shapcam_ext.cli.models import DEFAULT_MODEL
from shapcam_ext.sampling import DESIGNS

__all__ = ["DEFAULT_PERMUTATIONS", "DEFAULT_PERMUTATION_CAP", "METRICS", "SEED_MAX", "build_parser"]

DEFAULT_PERMUTATIONS = 256
DEFAULT_PERMUTATION_CAP = 4096  # with --tolerance
DEFAULT_OUT = "shapcam_out"
DEFAULT_EVALUATION_OUT = "shapcam_evaluation"
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits
METRICS = ("ad-ic", "deletion", "insertion", "pointing")
LABEL = "label"  # --target label: each sample's ground-truth class
DATA_FORMATS = ("auto", "files", "imagefolder", "imagenet", "voc")  # the layouts of shapcam_ext.cli.datasets

EXAMPLES = """\
examples:
  # the bundled photos, with the real EfficientNet-Lite0; outputs in shapcam_out/
  shapcam explain
  # a file and every image in a folder, outputs in maps/
  shapcam explain cat.jpg photos/ --out maps
  # a chosen class, more permutations, another seed
  shapcam explain cat.jpg --target 281 --permutations 1024 --seed 7
  # sample until the map's relative L2 error is below 2% (90% confidence)
  shapcam explain cat.jpg --tolerance 0.02
  # another architecture with its own checkpoint and layer
  shapcam explain cat.jpg --model resnet50 --weights resnet50.pth --layer layer4
  # pytorch-grad-cam panels beside Shap-CAM, on the first GPU
  shapcam explain cat.jpg --compare gradcam,scorecam --device cuda:0
  # one JSON record per image, each written as soon as the image is done
  shapcam explain photos/ --json > records.jsonl
  # four processes share the images; rank 0 prints every record
  torchrun --nproc_per_node=4 -m shapcam_ext explain photos/
  # ImageNet validation, each image for its ground-truth class, maps only, in batches of 16
  shapcam explain --data /data/imagenet --target label --batch-size 16 --no-figures --out maps
  # the paper's evaluation of the bundled photos, boxes drawn by hand
  shapcam evaluate --boxes experiments/boxes.json --target label --methods shapcam,gradcam --out eval
  # ILSVRC2012 validation (devkit inside) with its XML boxes, every method, two processes; then carry on
  torchrun --nproc_per_node=2 -m shapcam_ext evaluate --data /data/imagenet --boxes /data/imagenet/bbox_val \\
      --target label --methods mask,rise,gradcam,gradcam++,scorecam,shapcam --batch-size 8 --workers 4 --out eval
  # the same command with --resume carries on after an interrupt

Existing outputs are kept (the run says so) unless --overwrite is given.
Exit status: 0 success, 1 an image or the setup failed, 2 bad arguments, 130 interrupted.
"""


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


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**64 - 1 ({SEED_MAX}), got {text!r}")
    return value


def _target(text: str):
    if text == "top":
        return None
    if text == LABEL:
        return LABEL
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a class index (0, 1, ...), 'top' or 'label', got {text!r}")


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N (N = 0, 1, ...), got {text!r}")
    return device


def _names(choices, what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [name.strip().lower() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(unknown) or text!r}; choose from {', '.join(choices)}")
        return list(dict.fromkeys(names))
    return parse


def _fractions(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions in (0, 1], got {text!r}")
    return list(dict.fromkeys(values))


def _chatter() -> argparse.ArgumentParser:
    chatter = argparse.ArgumentParser(add_help=False)
    loudness = chatter.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true", help="also show debug notes and tracebacks")
    loudness.add_argument("-q", "--quiet", action="store_true", help="only show errors (no notes, warnings or bars)")
    return chatter


def _model_options() -> argparse.ArgumentParser:
    """What both commands load and how Shap-CAM samples."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--model", default=DEFAULT_MODEL,
                         help=f"torchvision or timm model name, optionally 'timm:' or 'torchvision:' "
                              f"prefixed (default: {DEFAULT_MODEL}, with real ImageNet weights)")
    options.add_argument("--weights", metavar="PATH",
                         help="local checkpoint (.pth, .safetensors; timm's loader, weights_only=True)")
    options.add_argument("--layer", help="target layer's qualified name (default: the model's last feature map)")
    options.add_argument("--target", type=_target, default=None, metavar="CLASS|top|label",
                         help="class index to explain, 'top' for each image's top class (default), or 'label' "
                              "for each sample's ground-truth class (needs labelled data)")
    options.add_argument("--permutations", type=_positive(int), metavar="K",
                         help=f"Shap-CAM permutations to sample (default {DEFAULT_PERMUTATIONS}; "
                              f"the cap with --tolerance, default {DEFAULT_PERMUTATION_CAP})")
    options.add_argument("--tolerance", type=_positive(float), metavar="E",
                         help="sample until the map's relative L2 error is below E with 90%% confidence")
    options.add_argument("--design", choices=DESIGNS, default=DESIGNS[0],
                         help="how Shap-CAM draws permutations: 'latin' stratifies them by position (default; "
                              "several times fewer permutations for the same error), 'iid' draws them independently")
    options.add_argument("--antithetic", action=argparse.BooleanOptionalAction, default=True,
                         help="pair each permutation with its reverse (default: on)")
    options.add_argument("--seed", type=_seed, default=0,
                         help="seed of Shap-CAM's permutations, RISE's masks, the mask's jitter and the random "
                              "reference, 0 to 2**64 - 1 (default 0)")
    options.add_argument("--device", type=_device, default=torch.device("cpu"), metavar="cpu|cuda|cuda:N",
                         help="where to run (default cpu; under torchrun, cuda means each process's local GPU)")
    options.add_argument("--overwrite", action="store_true",
                         help="recompute what exists in --out and replace it (default: keep it; evaluate then "
                              "needs --resume)")
    return options


def _data_options() -> argparse.ArgumentParser:
    """Where the images come from and how they are fed."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--data", metavar="PATH|GLOB",
                         help="a folder of images, a glob pattern, a text file listing images, an ImageFolder "
                              "tree, ImageNet validation (with its devkit) or a PASCAL VOC root")
    options.add_argument("--data-format", choices=DATA_FORMATS, default="auto",
                         help="the layout of --data (default: detected)")
    options.add_argument("--boxes", type=Path, metavar="PATH",
                         help="boxes: a folder of PASCAL VOC XML files named like the images (ImageNet's "
                              "ILSVRC2012_bbox_val) or a JSON file like experiments/boxes.json")
    options.add_argument("--split", default="val", help="PASCAL VOC image set: train, val, trainval, test (default val)")
    options.add_argument("--batch-size", type=_positive(int), default=1, metavar="B",
                         help="images per batch through the model and the explainer (default 1)")
    options.add_argument("--workers", type=int, default=0, metavar="N",
                         help="DataLoader processes that decode images (default 0: this process)")
    return options


def _method_options() -> argparse.ArgumentParser:
    """Settings of the comparison methods."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--scorecam-batch", type=_positive(int), default=64, metavar="N",
                         help="masked inputs per ScoreCAM forward pass (default 64)")
    options.add_argument("--rise-masks", type=_positive(int), default=4000, metavar="N",
                         help="RISE's random masks per image (default 4000, the RISE paper's)")
    options.add_argument("--mask-iterations", type=_positive(int), default=300, metavar="N",
                         help="Adam steps of the meaningful-perturbation mask (default 300, the authors')")
    return options


def build_parser() -> argparse.ArgumentParser:
    """The ``shapcam`` parser; each subcommand sets ``run``, the function that executes it."""
    from shapcam_ext.cli.evaluate import run_evaluate
    from shapcam_ext.cli.explain import run_explain
    from shapcam_ext.cli.info import run_info

    chatter, model, data, methods = _chatter(), _model_options(), _data_options(), _method_options()
    parser = argparse.ArgumentParser(
        prog="shapcam", description="Shap-CAM: Shapley values of a layer's feature-map positions as saliency maps.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text())
    commands = parser.add_subparsers(dest="command", required=True, metavar="{explain,evaluate,info}")

    def image_command(name: str, **text) -> argparse.ArgumentParser:
        """explain and evaluate: the same options for the model, the data and the methods."""
        return commands.add_parser(name, parents=[chatter, model, data, methods], epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter, **text)

    explain = image_command(
        "explain",
        help="explain images; one PNG figure and one .npz of maps per image",
        description="Explain images with Shap-CAM. Without IMAGE arguments or --data, the photos bundled with "
                    "scikit-image, matplotlib and scikit-learn are explained. Per image it writes "
                    "<key>_shapcam.png (input, overlays, signed map) and <key>_shapcam.npz (shapley, "
                    "std_error, cam and the JSON record), where the key is the file's stem, and prints a "
                    "record on stdout.",
    )
    explain.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders of images")
    explain.add_argument("--compare", type=_names([m for m in METHODS if m != "shapcam"], "method"), default=[],
                         metavar="METHODS", help="comma-separated methods to add as panels: "
                                                 f"{','.join(m for m in METHODS if m != 'shapcam')}")
    explain.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                         help="write a PNG figure per image (default: on; --no-figures writes the .npz only)")
    explain.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), metavar="DIR",
                         help=f"folder for the figures and maps (default {DEFAULT_OUT})")
    explain.add_argument("--json", action="store_true",
                         help="print one JSON record per image (JSON Lines) instead of text")
    explain.set_defaults(run=run_explain)

    evaluate = image_command(
        "evaluate",
        help="score saliency methods with the paper's metrics; a table, JSON and a figure",
        description="Evaluate saliency methods as the Shap-CAM paper's section 4 does: Average Drop and "
                    "Increase in Confidence (Table 1), RISE's deletion and insertion areas, and the energy-based "
                    "pointing game on the data's boxes (Table 3). Without --data, the bundled photos are used. "
                    "Writes records.jsonl (one line per image and method), maps/ (each map, float16 .npz), "
                    "evaluation.json, evaluation.md and evaluation.png to --out, and prints the table.",
    )
    evaluate.add_argument("--methods", type=_names(METHODS, "method"), default=["gradcam", "gradcam++", "shapcam"],
                          metavar="METHODS", help=f"comma-separated, from {','.join(METHODS)} "
                                                  "(default gradcam,gradcam++,shapcam)")
    evaluate.add_argument("--metrics", type=_names(METRICS, "metric"), default=list(METRICS), metavar="METRICS",
                          help=f"comma-separated, from {','.join(METRICS)} (default: all; the pointing game "
                               "needs boxes)")
    evaluate.add_argument("--keep-fractions", type=_fractions, default=[1.0], metavar="F[,F...]",
                          help="for AD/IC, the share of each map's highest pixels kept (default 1: the whole map; "
                               "the paper limits them but does not say how far)")
    evaluate.add_argument("--auc-steps", type=_positive(int), default=224, metavar="N",
                          help="points of the deletion and insertion curves (default 224: RISE's 224 pixels per step "
                               "at 224 x 224)")
    evaluate.add_argument("--max-box-area", type=float, default=0.5, metavar="F",
                          help="the paper's pointing-game subset: one box covering at most this share of the input "
                               "(default 0.5)")
    evaluate.add_argument("--figure-rows", type=int, default=6, metavar="N",
                          help="samples drawn in evaluation.png (default 6; 0: no figure)")
    evaluate.add_argument("--resume", action="store_true",
                          help="continue the run in --out: skip the images and methods already scored")
    evaluate.add_argument("--out", type=Path, default=Path(DEFAULT_EVALUATION_OUT), metavar="DIR",
                          help=f"folder for the results (default {DEFAULT_EVALUATION_OUT})")
    evaluate.set_defaults(run=run_evaluate)

    info = commands.add_parser("info", parents=[chatter], help="show the version, the active backend and the device")
    info.set_defaults(run=run_info)
    return parser
