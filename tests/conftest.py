"""Fixtures shared by several test files."""
import pytest
import torch
import torchvision


@pytest.fixture(scope="module")
def resnet():
    """A random-weight ResNet-18 (10 classes, eval mode) and two 64x64 inputs: layer3 is 4x4, layer4 2x2."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    return model, torch.randn(2, 3, 64, 64)
