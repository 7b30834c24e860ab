"""The ``shapcam`` command line: explain images with Shap-CAM and report the installation.

Everything here serves the command only (model loading, image decoding, figures, torchrun
sharding); the library API lives in :mod:`shapcam_ext` itself.
"""
from shapcam_ext.cli.explain import main

__all__ = ["main"]
