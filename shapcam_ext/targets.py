"""Targets: which scalar of the model output a coalition is worth.

pytorch-grad-cam's contract: a target is a callable on **one image's** model output (a class
vector, a (C, H, W) segmentation map, an embedding, a detection dict) returning one score. Any
such target works here unchanged. Many coalitions of one image are scored at once with
``torch.func.vmap`` when the target allows it, and with a loop otherwise. Class targets (ours,
or pytorch-grad-cam's two classifier targets) are recognised, so a whole batch is scored with one
gather and the fast head paths know what they compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch

Target = Callable[[Any], torch.Tensor]

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
    if softmax is None or not isinstance(getattr(target, "category", None), int):
        return None
    return ClassTarget(int(target.category), softmax=softmax)


def class_targets(targets: Sequence[Target]) -> Optional[List[ClassTarget]]:
    """The targets as ClassTargets when all are class scores of one kind (all softmax or all
    logits), which the batched gather and the fast paths need; else None."""
    classes = [as_class_target(t) for t in targets]
    if any(c is None for c in classes) or len({c.softmax for c in classes}) != 1:
        return None
    return classes


def resolve_targets(targets: Optional[Sequence[Target]], outputs: Any, batch: int) -> List[Target]:
    """One target per image; ``None`` means the softmax probability of each image's top class.

    Raises:
        ValueError: the number of targets differs from the batch, a target is not callable, or
            ``None`` is given for a model whose output is not a (B, classes) score matrix.
    """
    if targets is None:
        if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2:
            raise ValueError(
                "targets=None explains each image's top class, which needs (B, classes) outputs; this model "
                "returns something else, so pass one target per image (e.g. pytorch-grad-cam's "
                "SemanticSegmentationTarget)"
            )
        return [ClassifierOutputSoftmaxTarget(c) for c in outputs.argmax(-1).tolist()]
    if isinstance(targets, (str, bytes)) or not isinstance(targets, Sequence):
        raise ValueError(f"targets must be a list with one target per image, got {type(targets).__name__}")
    targets = list(targets)
    if len(targets) != batch:
        raise ValueError(
            f"got {len(targets)} targets for a batch of {batch} images; pass one target per image "
            "(or targets=None to explain each image's top class)"
        )
    for target in targets:
        if not callable(target):
            raise ValueError(
                f"a target must be callable on one image's model output, got {type(target).__name__}; "
                "use e.g. ClassifierOutputSoftmaxTarget(281)"
            )
    return [as_class_target(t) or t for t in targets]


def output_rows(outputs: Any) -> Sequence[Any]:
    """The per-row outputs of a batched model output, as pytorch-grad-cam iterates them: the
    first dimension of a tensor, the elements of a list or tuple (detection models)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, (list, tuple)):
        return outputs
    raise ValueError(
        f"the model returns a {type(outputs).__name__}; Shap-CAM scores a tensor (B, ...) or a list with one "
        "output per image. Wrap the model so that it returns one of those (e.g. a segmentation model's ['out'])"
    )


class Scorer:
    """Scores many rows of model output, each with its image's target.

    Remembers which targets cannot be vectorised with ``torch.func.vmap`` (Python control flow
    on values, ``.item()``, detection dicts), so that each is tried only once. Targets are known by
    identity, so a Scorer must not outlive the targets it has seen.
    """

    def __init__(self) -> None:
        self._loop_only: set[int] = set()
        self._class_index: dict = {}  # made once per classes and device: no host-to-device copy per chunk

    def __call__(self, targets: Sequence[Target], outputs: Any, rows_per_image: int) -> torch.Tensor:
        """(B, M) scores of model outputs for B*M rows, image-major, with one target per image.

        Raises:
            ValueError: a target returns something that is not one number.
        """
        classes = class_targets(targets)
        if classes is not None and isinstance(outputs, torch.Tensor) and outputs.dim() == 2:
            scores = outputs.softmax(-1) if classes[0].softmax else outputs
            key = (tuple(t.category for t in classes), outputs.device)
            if key not in self._class_index:
                self._class_index[key] = torch.tensor(key[0], device=outputs.device)
            index = self._class_index[key]
            return scores.view(len(classes), rows_per_image, -1).gather(
                -1, index.view(-1, 1, 1).expand(-1, rows_per_image, 1)).squeeze(-1)
        rows = output_rows(outputs)
        return torch.stack([
            self._score_rows(target, rows[i * rows_per_image:(i + 1) * rows_per_image])
            for i, target in enumerate(targets)
        ])

    def _score_rows(self, target: Target, rows: Sequence[Any]) -> torch.Tensor:
        key = id(target)
        if isinstance(rows, torch.Tensor) and key not in self._loop_only:
            try:
                scores = torch.func.vmap(target)(rows)
            except Exception:  # noqa: BLE001  any failure of vmap means "loop", the target is unchanged
                self._loop_only.add(key)
            else:
                return _one_score_per_row(scores, len(rows))
        return torch.stack([_one_score(target(row)) for row in rows])


def _one_score(value: Any) -> torch.Tensor:
    score = torch.as_tensor(value)
    if score.numel() != 1:
        raise ValueError(
            f"a target returned shape {tuple(score.shape)} for one image's output; a target must return one "
            "score (pytorch-grad-cam's contract), e.g. output[category]"
        )
    return score.reshape(())


def _one_score_per_row(scores: torch.Tensor, rows: int) -> torch.Tensor:
    if scores.numel() != rows:
        raise ValueError(
            f"a target returned shape {tuple(scores.shape[1:])} for one image's output; a target must return one "
            "score (pytorch-grad-cam's contract), e.g. output[category]"
        )
    return scores.reshape(rows)
