"""pytorch-grad-cam's tutorial code, verbatim, for the tests that run its use cases through ShapCAM."""
import torch
from torch import nn


class ResnetFeatureExtractor(nn.Module):
    """The embeddings tutorial's feature extractor: the pooled embedding before the classifier.
    It defines ``__call__``, not ``forward``."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.feature_extractor = nn.Sequential(*list(self.model.children())[:-1])

    def __call__(self, x):
        return self.feature_extractor(x)[:, :, 0, 0]


def fasterrcnn_reshape_transform(x):
    """The detection tutorial's transform: every FPN level resized to the coarsest ('pool') and
    stacked as channels."""
    target_size = x['pool'].size()[-2 : ]
    activations = []
    for key, value in x.items():
        activations.append(torch.nn.functional.interpolate(torch.abs(value), target_size, mode='bilinear'))
    activations = torch.cat(activations, axis=1)
    return activations
