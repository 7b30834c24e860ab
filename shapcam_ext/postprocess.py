"""pytorch-grad-cam's post-processing of CAMs, in torch."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F


def scale_cam_image(cams: torch.Tensor, target_size: Optional[tuple] = None) -> np.ndarray:
    """Per-image min-max to [0, 1], then bilinear resize to ``target_size`` = (width, height).

    Same arithmetic as pytorch-grad-cam's ``scale_cam_image`` (OpenCV's bilinear resize uses
    the same half-pixel sampling as ``align_corners=False``).
    """
    cams = cams.to(torch.float32)
    flat = cams.flatten(1)
    flat = flat - flat.amin(1, keepdim=True)
    flat = flat / (1e-7 + flat.amax(1, keepdim=True))
    cams = flat.view_as(cams)
    if target_size is not None:
        width, height = target_size
        cams = F.interpolate(cams[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    return cams.numpy()
