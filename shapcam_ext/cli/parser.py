"""The command's arguments: ``shapcam [--version] {explain,info} ...``, with usage examples in ``--help``."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch

from shapcam_ext.cli.info import version_text
from shapcam_ext.cli.models import DEFAULT_MODEL

__all__ = ["COMPARE_METHODS", "DEFAULT_PERMUTATIONS", "DEFAULT_PERMUTATION_CAP", "SEED_MAX", "build_parser"]

DEFAULT_PERMUTATIONS = 256
DEFAULT_PERMUTATION_CAP = 4096  # with --tolerance
DEFAULT_OUT = "shapcam_out"
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits

# --compare name -> (pytorch-grad-cam class, panel title)
COMPARE_METHODS = {
    "gradcam": ("GradCAM", "Grad-CAM"),
    "gradcam++": ("GradCAMPlusPlus", "Grad-CAM++"),
    "scorecam": ("ScoreCAM", "Score-CAM"),
}

EXAMPLES = """\
examples:
  # the bundled photos, with the real EfficientNet-Lite0; outputs in shapcam_out/
  shapcam explain
  # a file and every image in a folder, outputs in maps/
  shapcam explain cat.jpg photos/ --out maps
  # a chosen class, more permutations, another seed
  shapcam explain cat.jpg --target 281 --permutations 1024 --seed 7
  # sample until the largest standard error is 2% of the largest value
  shapcam explain cat.jpg --tolerance 0.02
  # another architecture with its own checkpoint and layer
  shapcam explain cat.jpg --model resnet50 --weights resnet50.pth --layer layer4
  # pytorch-grad-cam panels beside Shap-CAM, on the first GPU
  shapcam explain cat.jpg --compare gradcam,scorecam --device cuda:0
  # one JSON record per image, each written as soon as the image is done
  shapcam explain photos/ --json > records.jsonl
  # four processes share the images; rank 0 prints every record
  torchrun --nproc_per_node=4 -m shapcam_ext explain photos/

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
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a class index (0, 1, ...) or 'top', got {text!r}")


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N (N = 0, 1, ...), got {text!r}")
    return device


def _methods(text: str) -> list[str]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in COMPARE_METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method {', '.join(unknown) or text!r}; choose from {', '.join(COMPARE_METHODS)}"
        )
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    """The ``shapcam`` parser; each subcommand sets ``run``, the function that executes it."""
    from shapcam_ext.cli.explain import run_explain
    from shapcam_ext.cli.info import run_info

    chatter = argparse.ArgumentParser(add_help=False)
    loudness = chatter.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true", help="also show debug notes and tracebacks")
    loudness.add_argument("-q", "--quiet", action="store_true", help="only show errors (no notes, warnings or bars)")

    parser = argparse.ArgumentParser(
        prog="shapcam", description="Shap-CAM: Shapley values of a layer's feature-map positions as saliency maps.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text())
    commands = parser.add_subparsers(dest="command", required=True, metavar="{explain,info}")

    explain = commands.add_parser(
        "explain", parents=[chatter], help="explain images; one PNG figure and one .npz of maps per image",
        description="Explain images with Shap-CAM. Without IMAGE arguments, the photos bundled with "
                    "scikit-image, matplotlib and scikit-learn are explained. Per image it writes "
                    "<stem>_shapcam.png (input, overlays, signed map) and <stem>_shapcam.npz (shapley, "
                    "std_error, cam and the JSON record) and prints a record on stdout.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    explain.add_argument("images", nargs="*", metavar="IMAGE",
                         help="image files or folders of images (default: the bundled photos)")
    explain.add_argument("--model", default=DEFAULT_MODEL,
                         help=f"torchvision or timm model name, optionally 'timm:' or 'torchvision:' "
                              f"prefixed (default: {DEFAULT_MODEL}, with real ImageNet weights)")
    explain.add_argument("--weights", metavar="PATH",
                         help="local checkpoint (.pth, .safetensors; timm's loader, weights_only=True)")
    explain.add_argument("--layer", help="target layer's qualified name (default: the model's last feature map)")
    explain.add_argument("--target", type=_target, default=None, metavar="CLASS|top",
                         help="class index to explain, or 'top' for each image's top class (default)")
    explain.add_argument("--permutations", type=_positive(int), metavar="K",
                         help=f"permutations to sample (default {DEFAULT_PERMUTATIONS}; "
                              f"the cap with --tolerance, default {DEFAULT_PERMUTATION_CAP})")
    explain.add_argument("--tolerance", type=_positive(float), metavar="E",
                         help="sample until the map's relative L2 error is below E with 90%% confidence")
    explain.add_argument("--antithetic", action=argparse.BooleanOptionalAction, default=True,
                         help="pair each permutation with its reverse (default: on)")
    explain.add_argument("--seed", type=_seed, default=0, help="permutation seed, 0 to 2**64 - 1 (default 0)")
    explain.add_argument("--device", type=_device, default=torch.device("cpu"), metavar="cpu|cuda|cuda:N",
                         help="where to run (default cpu; under torchrun, cuda means each process's local GPU)")
    explain.add_argument("--compare", type=_methods, default=[], metavar="METHODS",
                         help=f"comma-separated pytorch-grad-cam methods to add as panels: {','.join(COMPARE_METHODS)}")
    explain.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), metavar="DIR",
                         help=f"folder for the figures and maps (default {DEFAULT_OUT})")
    explain.add_argument("--overwrite", action="store_true",
                         help="recompute images whose outputs exist and replace them (default: keep them)")
    explain.add_argument("--json", action="store_true",
                         help="print one JSON record per image (JSON Lines) instead of text")
    explain.set_defaults(run=run_explain)

    info = commands.add_parser("info", parents=[chatter], help="show the version, the active backend and the device")
    info.set_defaults(run=run_info)
    return parser
