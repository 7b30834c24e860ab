"""The perturbation methods the paper compares Shap-CAM with (§4.1, Table 1), written from their papers.

Both take pytorch-grad-cam's contract: ``Method(model, ...)`` then ``method(input_tensor, targets)``
returns (B, H, W) float32 maps in [0, 1] at the input's resolution, with one pytorch-grad-cam
target per image (``None``: each image's top class, softmax probability).

- :class:`RISE`: Petsiuk, Das & Saenko, *RISE: Randomized Input Sampling for Explanation of
  Black-box Models*, BMVC 2018.
- :class:`MeaningfulPerturbation` ("Mask" in the paper's Table 1): Fong & Vedaldi, *Interpretable
  Explanations of Black Boxes by Meaningful Perturbation*, ICCV 2017.

Why not a package: TorchRay 1.0.0.2 runs on torch 2.14, but its RISE scores sigmoid outputs
(multi-label) rather than the softmax, it has no Fong & Vedaldi 2017 mask (its extremal
perturbation is the 2019 method), its licence is CC BY-NC 4.0, and it was last released in 2020.
captum-rise 1.0 also runs, but draws masks from the unseeded global RNG in a Python loop and runs
the model once per mask.
"""
from shapcam_ext.baselines.perturbation import MeaningfulPerturbation
from shapcam_ext.baselines.rise import RISE

__all__ = ["MeaningfulPerturbation", "RISE"]
