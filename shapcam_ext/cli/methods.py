"""The saliency methods the commands run, by name: Shap-CAM and what the paper compares it with.

Every method maps a batch and one class per image to pytorch-grad-cam's maps: (B, H, W) float32
in [0, 1] at the input's resolution. Each scores the class as its own paper does:

- ``shapcam``: Shap-CAM of the softmax probability (the paper's Y^c);
- ``gradcam``, ``gradcam++``, ``scorecam``: pytorch-grad-cam on the same layer, with its default
  target, the class logit;
- ``rise``: RISE with the softmax probability (:class:`shapcam_ext.baselines.RISE`);
- ``mask``: Fong & Vedaldi's meaningful perturbation, softmax probability
  (:class:`shapcam_ext.baselines.MeaningfulPerturbation`);
- ``random``: a reference, uniform noise on the target layer's grid upsampled like a CAM, seeded
  by the run's seed and the sample's key (so it does not depend on batches or processes).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from shapcam_ext.postprocess import scale_cam_image

if TYPE_CHECKING:
    from shapcam_ext.cli.session import Session

__all__ = ["METHODS", "Method", "build"]

# maps (B, H, W) float32 in [0, 1] and one dict of diagnostics per image
Explain = Callable[[torch.Tensor, Sequence[int], Sequence[str]], tuple[np.ndarray, list[dict]]]


@dataclass(frozen=True)
class Method:
    """A method's name on the command line, its title in tables and figures, and the score it explains."""

    name: str
    title: str
    score: str


METHODS = {m.name: m for m in (
    Method("mask", "Mask", "softmax probability"),
    Method("rise", "RISE", "softmax probability"),
    Method("gradcam", "GradCAM", "logit"),
    Method("gradcam++", "GradCAM++", "logit"),
    Method("scorecam", "ScoreCAM", "logit"),
    Method("shapcam", "ShapCAM", "softmax probability"),
    Method("random", "Random", "none (noise)"),
)}  # in the order of the paper's Table 1, the reference last

_GRADCAM_CLASSES = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "scorecam": "ScoreCAM"}


def _size(x: torch.Tensor) -> tuple[int, int]:
    return x.shape[-1], x.shape[-2]  # (width, height), as pytorch-grad-cam's resizing takes it


def _shapcam(session: Session) -> Explain:
    import shapcam_ext

    def explain(x, classes, keys):
        results = session.cam.explain(x, [shapcam_ext.ClassifierOutputSoftmaxTarget(c) for c in classes])
        infos = [{"value_full": r.value_full, "value_empty": r.value_empty, "efficiency_gap": r.efficiency_gap,
                  "max_std_error": r.max_std_error, "n_permutations": r.n_permutations, "path": r.path}
                 for r in results]
        return np.stack([r.cam_image(_size(x)) for r in results]), infos
    return explain


def _gradcam(session: Session, name: str) -> Explain:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module = session.model.get_submodule(session.layer)

    def explain(x, classes, keys):
        # Built per call: its hooks are removed when the block ends, so none pile up over a long run.
        with getattr(pytorch_grad_cam, _GRADCAM_CLASSES[name])(model=session.model, target_layers=[module]) as cam:
            cam.batch_size = session.args.scorecam_batch  # only ScoreCAM reads it; its default of 16 is slow
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
        return maps.astype(np.float32), [{} for _ in classes]
    return explain


def _baseline(session: Session, name: str) -> Explain:
    import shapcam_ext
    from shapcam_ext.baselines import RISE, MeaningfulPerturbation

    args = session.args
    method = (RISE(session.model, n_masks=args.rise_masks, seed=args.seed) if name == "rise"
              else MeaningfulPerturbation(session.model, iterations=args.mask_iterations, seed=args.seed))

    def explain(x, classes, keys):
        return method(x, [shapcam_ext.ClassifierOutputSoftmaxTarget(c) for c in classes]), [{} for _ in classes]
    return explain


def _random(session: Session) -> Explain:
    from shapcam_ext.cli.layers import layer_output_shape

    grid = layer_output_shape(session.model, session.layer, session.preprocess.input_size)[-2:]

    def explain(x, classes, keys):
        noise = [np.random.default_rng([session.args.seed, zlib.crc32(key.encode())]).random(grid) for key in keys]
        return scale_cam_image(torch.from_numpy(np.stack(noise)), _size(x)), [{} for _ in keys]
    return explain


def build(name: str, session: Session) -> Explain:
    """The method ``name`` (a key of METHODS) on the loaded model, layer and settings of ``session``."""
    if name == "shapcam":
        return _shapcam(session)
    if name in _GRADCAM_CLASSES:
        return _gradcam(session, name)
    if name in ("rise", "mask"):
        return _baseline(session, name)
    return _random(session)
