"""What the package says about its build, and what it advises when the compiled library is missing."""
from __future__ import annotations

import tomllib
from pathlib import Path
from types import SimpleNamespace

import torch

import shapcam_ext
from shapcam_ext import _backend

ROOT = Path(__file__).resolve().parents[1]


def test_backend_info_names_the_build():
    build = shapcam_ext.backend_info()["build"]
    assert build is not None, "setup.py writes shapcam_ext/_build_info.py on every build"
    assert build["version"].startswith(shapcam_ext.__version__ + "+")
    assert build["version"].endswith("+cpu") == (build["cuda"] is None)
    assert build["torch"] == torch.__version__


def test_advice_fits_how_the_package_was_installed(monkeypatch):
    assert "pip install --no-build-isolation -e ." in _backend._advice()  # this checkout
    monkeypatch.setattr(_backend, "_source_checkout", lambda: False)
    monkeypatch.setattr(_backend, "_build_info", lambda: SimpleNamespace(TORCH_VERSION="2.9.0+cu130"))
    advice = _backend._advice()
    assert "built for torch 2.9.0+cu130" in advice and "install torch==2.9.0" in advice
    assert "-e ." not in advice
    monkeypatch.setattr(_backend, "_build_info", lambda: SimpleNamespace(TORCH_VERSION=torch.__version__))
    assert "--no-binary shapcam_ext" in _backend._advice()


def test_metadata_declares_the_extras_and_the_typed_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(project["optional-dependencies"]) >= {"cli", "gradcam", "captum", "torchcam", "test", "all"}
    assert project["scripts"]["shapcam"] == "shapcam_ext.cli:main"
    assert (Path(shapcam_ext.__file__).parent / "py.typed").is_file()
