"""Which implementation of the ops is active: the compiled library or the pure-PyTorch reference."""
from __future__ import annotations

import os
import warnings

import torch

BACKEND_ENV = "SHAPCAM_BACKEND"  # "reference" forces the pure-PyTorch path


def _load_compiled() -> bool:
    if os.environ.get(BACKEND_ENV, "").lower() == "reference":
        return False
    try:
        from shapcam_ext import _C  # noqa: F401  (registers the shapcam:: ops)
    except ImportError as err:
        warnings.warn(
            f"shapcam_ext: the compiled library could not be loaded ({err}); using the slower "
            "pure-PyTorch reference ops. Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


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
