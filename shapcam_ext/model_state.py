"""Explaining a model without touching it.

The explanation runs under evaluation semantics (batch norm on its running statistics, dropout and
stochastic depth off, no autograd), as pytorch-grad-cam and torchcam do, and every module's own
mode is restored afterwards. In evaluation mode nothing writes to parameters or buffers, so they
come back bit-identical, and a model in training mode gets the maps of its evaluation mode.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


@contextmanager
def eval_semantics(model: nn.Module) -> Iterator[nn.Module]:
    """Puts every module of ``model`` in eval mode and disables autograd for the block, then
    restores each module's own ``training`` flag (mixed modes included), even on an error."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        if any(training for _, training in modes):  # a model already in eval mode costs nothing here
            model.eval()
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes:
            if module.training != training:
                module.training = training
