"""The ``shapcam`` command and its figures, run in-process on the real Lite0 and a real photo."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import shapcam_ext
from shapcam_ext.cli import main
from shapcam_ext.engine import ShapleyResult
from shapcam_ext.cli.images import bundled_photos
from shapcam_ext.cli.overlay import explanation_figure, heatmap_overlay
from shapcam_ext.targets import ClassTarget

FEW = ["--permutations", "16"]


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def errors(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]


def shapcam(*argv) -> Run:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(arg) for arg in argv])
    return Run(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def chelsea() -> Path:
    photos = bundled_photos()
    if "chelsea" not in photos:
        pytest.skip("scikit-image's chelsea.png is not installed")
    return photos["chelsea"]


@pytest.fixture(scope="module")
def plain_run(chelsea, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    return shapcam("explain", chelsea, *FEW, "--out", out), out / "chelsea_shapcam.png"


def test_explain_writes_a_figure_and_prints_the_top_classes(plain_run):
    run, png = plain_run
    assert run.code == 0, run.err
    assert "Egyptian cat" in run.out
    assert "16 permutations" in run.out and str(png) in run.out
    with Image.open(png) as figure:
        figure.verify()
    with Image.open(png) as figure:
        width, height = figure.size
    assert width >= 800 and 300 <= height <= width


def test_json_reports_every_image_and_a_corrupt_one_does_not_stop_the_others(chelsea, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    out = tmp_path / "out"
    run = shapcam("explain", corrupt, chelsea, *FEW, "--target", "282", "--json", "--out", out)

    assert run.code == 1
    assert len(run.errors) == 1 and str(corrupt) in run.errors[0]
    assert "Traceback" not in run.err
    bad, good = json.loads(run.out)
    assert bad["image"] == str(corrupt) and str(corrupt) in bad["error"] and bad["png"] is None
    assert good["error"] is None and Path(good["png"]).is_file()
    assert good["png"] == str(out / "chelsea_shapcam.png")
    assert good["target"] == {"index": 282, "name": "tiger cat", "score": "softmax probability"}
    assert [entry["name"] for entry in good["top5"]][:2] == ["Egyptian cat", "tiger cat"]
    assert good["n_permutations"] == 16 and good["layer"] == "bn2" and good["backend"] in ("compiled", "reference")
    shapley = np.array(good["shapley"])
    assert shapley.shape == (7, 7)
    assert shapley.sum() == pytest.approx(good["value_full"] - good["value_empty"], abs=1e-4)
    for field in ("max_std_error", "efficiency_gap", "seconds"):
        assert good[field] >= 0


@pytest.mark.parametrize("option, value, named", [
    ("--model", "no_such_net", "no_such_net"),
    ("--layer", "blocks.99", "blocks.99"),
    ("--weights", "{tmp}/missing.pth", "missing.pth"),
    ("--weights", "{tmp}/corrupt.pth", "corrupt.pth"),
])
def test_setup_errors_are_one_line_and_exit_1(chelsea, tmp_path, option, value, named):
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint" * 64)
    run = shapcam("explain", chelsea, *FEW, option, value.format(tmp=tmp_path), "--out", tmp_path / "out")
    assert run.code == 1
    assert len(run.errors) == 1 and named in run.errors[0]
    assert "Traceback" not in run.err and run.out == ""
    assert not (tmp_path / "out").exists()


def test_json_after_a_setup_error_still_has_one_record_per_image(chelsea, tmp_path):
    run = shapcam("explain", chelsea, tmp_path / "other.png", "--model", "no_such_net", "--json", "--out", tmp_path)
    assert run.code == 1
    records = json.loads(run.out)
    assert [record["image"] for record in records] == [str(chelsea), str(tmp_path / "other.png")]
    assert all("no_such_net" in record["error"] and record["png"] is None for record in records)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_a_gpu_is_a_one_line_error(chelsea, tmp_path):
    run = shapcam("explain", chelsea, "--device", "cuda", "--out", tmp_path)
    assert run.code == 1 and len(run.errors) == 1 and "CUDA is not available" in run.errors[0]


@pytest.mark.parametrize("argv", [
    ["--compare", "lime"], ["--permutations", "0"], ["--tolerance", "-1"], ["--target", "cat"], ["--device", "tpu"],
])
def test_usage_errors_exit_2(argv):
    with redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as exit_info:
        main(["explain", *argv])
    assert exit_info.value.code == 2


def test_compare_adds_a_panel_per_method(chelsea, plain_run, tmp_path):
    run = shapcam("explain", chelsea, "--permutations", "4", "--compare", "gradcam", "--out", tmp_path)
    assert run.code == 0, run.err
    assert "compare  gradcam" in run.out
    with Image.open(tmp_path / "chelsea_shapcam.png") as compared, Image.open(plain_run[1]) as plain:
        assert compared.width > plain.width * 1.2


def fake_result(h: int = 7, w: int = 7) -> ShapleyResult:
    shapley = torch.linspace(-1, 2, h * w, dtype=torch.float64).view(h, w)
    return ShapleyResult(
        shapley=shapley, std_error=torch.full((h, w), 0.01, dtype=torch.float64), value_full=0.9,
        value_empty=0.1, efficiency_gap=0.0, n_permutations=8, backend="reference", seconds=0.5, layer="bn2",
        target=ClassTarget(1), feature_map=shapley,
    )


def test_figure_has_one_axes_more_per_comparison():
    rgb = np.random.default_rng(0).random((64, 48, 3)).astype(np.float32)
    mask = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(64, 48)
    plain = explanation_figure(rgb, fake_result(), "test")
    compared = explanation_figure(rgb, fake_result(), "test", {"Grad-CAM": mask, "Score-CAM": mask})
    assert len(plain.axes) == 4  # image, Shap-CAM overlay, signed map, its colorbar
    assert len(compared.axes) == len(plain.axes) + 2
    signed = plain.axes[2].images[0]
    assert signed.get_cmap().name == "RdBu_r" and signed.get_clim() == (-2.0, 2.0)


def test_overlay_matches_pytorch_grad_cam():
    image_utils = pytest.importorskip("pytorch_grad_cam.utils.image")
    rng = np.random.default_rng(1)
    rgb, mask = rng.random((32, 40, 3)).astype(np.float32), rng.random((32, 40)).astype(np.float32)
    theirs = image_utils.show_cam_on_image(rgb, mask, use_rgb=True) / 255.0
    ours = heatmap_overlay(rgb, mask)
    # OpenCV's and matplotlib's jet differ slightly, and theirs is rounded to 8 bits
    assert np.abs(ours - theirs).mean() < 0.02 and np.abs(ours - theirs).max() < 0.1


def test_info_reports_version_backend_and_device():
    run = shapcam("info")
    assert run.code == 0
    assert shapcam_ext.__version__ in run.out
    assert f"backend  {shapcam_ext.backend_info()['backend']}" in run.out
    assert "device" in run.out and torch.__version__ in run.out


def test_python_dash_m_runs_the_same_command():
    done = subprocess.run([sys.executable, "-m", "shapcam_ext", "info"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "backend" in done.stdout and shapcam_ext.__version__ in done.stdout
