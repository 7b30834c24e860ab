"""shapcam_ext: Shap-CAM visual explanations with compiled masking and scatter ops."""
from shapcam_ext._backend import backend_info
from shapcam_ext.ops import masked_prefixes, scatter_marginals_

__version__ = "0.1.0"

__all__ = ["backend_info", "masked_prefixes", "scatter_marginals_", "__version__"]
