"""shapcam_ext: Shap-CAM visual explanations with compiled masking and scatter ops."""
from shapcam_ext._backend import backend_info
from shapcam_ext.cam import ShapCAM
from shapcam_ext.config import SamplingConfig
from shapcam_ext.head import Prepared
from shapcam_ext.results import BatchError, ShapleyResult
from shapcam_ext.ops import (linear_walk, linear_walk_, masked_prefixes, permutation_ranks, scatter_marginals,
                             scatter_marginals_)
from shapcam_ext.targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget, ClassTarget

__version__ = "0.2.0"

__all__ = [
    "BatchError", "ClassTarget", "ClassifierOutputSoftmaxTarget", "ClassifierOutputTarget", "Prepared", "SamplingConfig",
    "ShapCAM", "ShapleyResult", "__version__", "backend_info", "linear_walk", "linear_walk_", "masked_prefixes",
    "permutation_ranks", "scatter_marginals", "scatter_marginals_",
]
