"""``shapcam info`` and ``shapcam --version``: the package, its backend, torch and the devices."""
from __future__ import annotations

import argparse

import torch

import shapcam_ext
from shapcam_ext._backend import backend_info

__all__ = ["run_info", "version_text"]


def _backend_text() -> str:
    info = backend_info()
    if info["backend"] != "compiled":
        return "reference (pure-PyTorch ops; the compiled library is not loaded)"
    kernels = ", ".join(device for device in ("cpu", "cuda") if info[f"{device}_kernels"]) or "none"
    return f"compiled (kernels: {kernels})"


def _torch_text() -> str:
    return f"{torch.__version__} ({f'CUDA {torch.version.cuda}' if torch.version.cuda else 'CPU-only'} build)"


def version_text() -> str:
    """One line: the package version, its backend and the torch it runs on."""
    return f"shapcam_ext {shapcam_ext.__version__}, backend {_backend_text()}, torch {_torch_text()}"


def run_info(args: argparse.Namespace) -> int:
    """Print the version, the active backend, torch and the devices; returns 0."""
    if torch.cuda.is_available():
        device = f"cuda available: {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} device(s))"
    else:
        device = "cpu only (torch.cuda.is_available() is False)"
    print(f"shapcam_ext {shapcam_ext.__version__}")
    print(f"backend  {_backend_text()}")
    print(f"torch    {_torch_text()}")
    print(f"device   {device}")
    return 0
