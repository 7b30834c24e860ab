"""Which implementation of the ops is active: the compiled library or the pure-PyTorch reference."""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

BACKEND_ENV = "SHAPCAM_BACKEND"  # "reference" forces the pure-PyTorch path


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
        "pure-PyTorch reference ops. Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


COMPILED = _load_compiled()


def backend_info() -> dict:
    """The active backend and what the compiled library provides.

    Returns a dict with ``backend`` ("compiled" or "reference"), ``cpu_kernels`` and
    ``cuda_kernels`` (whether the compiled library registered kernels for that device) and
    ``cuda_available`` (whether this process can run CUDA at all).
    """
    def has_kernel(key: str) -> bool:
        return COMPILED and torch._C._dispatch_has_kernel_for_dispatch_key("shapcam::masked_prefixes", key)

    return {
        "backend": "compiled" if COMPILED else "reference",
        "cpu_kernels": has_kernel("CPU"),
        "cuda_kernels": has_kernel("CUDA"),
        "cuda_available": torch.cuda.is_available(),
    }
