"""Targets: which scalar of the model output a coalition is worth.

A target is any callable mapping a batch of model outputs (M, ...) to M scores, as in
pytorch-grad-cam. Class targets (ours, or pytorch-grad-cam's two classifier targets) are
recognised, so a whole batch of images is scored in one gather and the fast head paths know
what they compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

Target = Callable[[torch.Tensor], torch.Tensor]

# pytorch-grad-cam's classifier targets, by class name, mapped to "scores the softmax?".
_GRADCAM_CLASS_TARGETS = {"ClassifierOutputTarget": False, "ClassifierOutputSoftmaxTarget": True}


@dataclass(frozen=True)
class ClassTarget:
    """Score of one class: its softmax probability (the paper's Y^c) or its logit."""

    category: int
    softmax: bool = True

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        scores = model_output.softmax(-1) if self.softmax else model_output
        return scores[..., self.category]


def ClassifierOutputSoftmaxTarget(category: int) -> ClassTarget:  # noqa: N802 (pytorch-grad-cam's name)
    """The softmax probability of ``category``: Shap-CAM's default worth."""
    return ClassTarget(int(category), softmax=True)


def ClassifierOutputTarget(category: int) -> ClassTarget:  # noqa: N802 (pytorch-grad-cam's name)
    """The logit of ``category``."""
    return ClassTarget(int(category), softmax=False)


def as_class_target(target: Target) -> Optional[ClassTarget]:
    """The ClassTarget equivalent to ``target``, or None for an arbitrary callable."""
    if isinstance(target, ClassTarget):
        return target
    softmax = _GRADCAM_CLASS_TARGETS.get(type(target).__name__)
    if softmax is None or not hasattr(target, "category"):
        return None
    return ClassTarget(int(target.category), softmax=softmax)


def resolve_targets(targets: Optional[Sequence[Target]], logits: torch.Tensor) -> List[Target]:
    """One target per image; ``None`` means the softmax probability of each image's top class."""
    batch = logits.shape[0]
    if targets is None:
        return [ClassifierOutputSoftmaxTarget(c) for c in logits.argmax(-1).tolist()]
    targets = list(targets)
    if len(targets) != batch:
        raise ValueError(
            f"got {len(targets)} targets for a batch of {batch} images; pass one target per image "
            "(or targets=None to explain each image's top class)"
        )
    return [as_class_target(t) or t for t in targets]


def score(targets: List[Target], outputs: torch.Tensor) -> torch.Tensor:
    """Scores (B, M) of model outputs (B, M, ...) with one target per image.

    Class targets sharing the softmax flag are scored with one gather for the whole batch.
    """
    if all(isinstance(t, ClassTarget) for t in targets) and len({t.softmax for t in targets}) == 1:
        scores = outputs.softmax(-1) if targets[0].softmax else outputs
        index = torch.tensor([t.category for t in targets], device=outputs.device)
        return scores.gather(-1, index.view(-1, 1, 1).expand(-1, outputs.shape[1], 1)).squeeze(-1)
    rows = [torch.as_tensor(t(out)) for t, out in zip(targets, outputs)]
    for row in rows:
        if row.shape != (outputs.shape[1],):
            raise ValueError(
                f"a target returned shape {tuple(row.shape)} for {outputs.shape[1]} model outputs; a target "
                "must map a batch of outputs (M, ...) to M scores, like pytorch-grad-cam's targets"
            )
    return torch.stack(rows)
