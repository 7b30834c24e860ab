"""Which implementation of the ops is active: the compiled library or the pure-PyTorch reference."""
from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Optional

import torch

BACKEND_ENV = "SHAPCAM_BACKEND"  # "reference" forces the pure-PyTorch path
_PACKAGE = Path(__file__).resolve().parent


def _build_info() -> Optional[object]:
    """The module setup.py writes at build time, or None for a tree that was never built."""
    try:
        from shapcam_ext import _build_info
    except ImportError:
        return None
    return _build_info


def _source_checkout() -> bool:
    """Whether the package runs from its source tree (an editable install or a checkout)."""
    return (_PACKAGE.parent / "setup.py").is_file() and (_PACKAGE.parent / "csrc").is_dir()


def _advice() -> str:
    """How to get a working compiled library, for the way this package was installed."""
    if _source_checkout():
        return "build it in the source tree with `pip install --no-build-isolation -e .`"
    built = _build_info()
    if built is not None and built.TORCH_VERSION.split("+")[0] != torch.__version__.split("+")[0]:
        return (f"this shapcam_ext was built for torch {built.TORCH_VERSION} but torch {torch.__version__} is "
                f"installed: install torch=={built.TORCH_VERSION.split('+')[0]}, or rebuild shapcam_ext for this "
                "torch with `pip install --no-build-isolation --no-binary shapcam_ext --force-reinstall shapcam_ext`")
    return ("reinstall shapcam_ext from its source distribution against this torch with "
            "`pip install --no-build-isolation --no-binary shapcam_ext --force-reinstall shapcam_ext`")


def _load_compiled() -> bool:
    if os.environ.get(BACKEND_ENV, "").lower() == "reference":
        return False
    if importlib.util.find_spec("shapcam_ext._C") is None:
        reason = "it is not built"
    else:
        try:
            from shapcam_ext import _C  # noqa: F401  (registers the shapcam:: ops)
            return True
        except ImportError as err:  # built against another torch, missing libraries, ...
            reason = f"it failed to load: {err}"
    warnings.warn(
        f"shapcam_ext: the compiled library shapcam_ext._C is unavailable ({reason}); using the slower "
        f"pure-PyTorch reference ops. To fix it, {_advice()}.",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


COMPILED = _load_compiled()


def backend_info() -> dict:
    """The active backend and what the compiled library provides.

    Returns a dict with ``backend`` ("compiled" or "reference"), ``cpu_kernels`` and
    ``cuda_kernels`` (whether the compiled library registered kernels for that device),
    ``cuda_available`` (whether this process can run CUDA at all) and ``build`` (the version and
    the torch and CUDA the library was compiled for, or None for a tree that was never built).
    """
    def has_kernel(key: str) -> bool:
        return COMPILED and torch._C._dispatch_has_kernel_for_dispatch_key("shapcam::masked_prefixes", key)

    built = _build_info()
    return {
        "backend": "compiled" if COMPILED else "reference",
        "cpu_kernels": has_kernel("CPU"),
        "cuda_kernels": has_kernel("CUDA"),
        "cuda_available": torch.cuda.is_available(),
        "build": None if built is None else {"version": built.VERSION, "torch": built.TORCH_VERSION,
                                             "cuda": built.CUDA},
    }
