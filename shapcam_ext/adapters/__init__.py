"""Thin adapters giving the users of other CAM libraries the Shap-CAM engine in their conventions.

``shapcam_ext.adapters.gradcam`` (pytorch-grad-cam's ``BaseCAM``), ``.torchcam`` (a torchcam
extractor) and ``.captum`` (a Captum ``LayerAttribution``) each import their library when they
are imported themselves; ``import shapcam_ext`` imports none of them.

Grouped players (``group_size=g > 1``): the engine values each g x g block of feature-map cells
as one player. The torchcam and Captum maps are the results' ``feature_map``, where each cell
holds an equal share of its player's value (a block cut by the map's edge shares it among the
cells it covers), so a map sums to the score difference Y(full) - Y(baseline) exactly as the
players' values do.
"""
from __future__ import annotations

import importlib
from types import ModuleType



def import_optional(module: str, extra: str) -> ModuleType:
    """Import ``module`` of an optional library.

    Raises:
        ImportError: the library is missing; the message names the extra that installs it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        library = module.split(".")[0]
        raise ImportError(f'{library} is not installed; install it with: pip install "shapcam_ext[{extra}]"') from err
