"""``shapcam evaluate`` end to end on fixtures in the on-disk formats, with a tiny model standing in for a real one
(the real EfficientNet-Lite0 runs in test_distributed.py and in the README's command)."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixture_data import tiny_classifier, write_imagenet_val, write_voc2007
from shapcam_ext.cli import main, methods, scoring
from shapcam_ext.cli import session as session_module
from shapcam_ext.cli.boxes import box_to_input
from shapcam_ext.cli.datasets import open_data
from shapcam_ext.cli.results import ResultStore
from shapcam_ext.metrics import average_drop, energy_pointing_game, increase_in_confidence

FAST = ["--layer", "features", "--permutations", "8", "--auc-steps", "4", "--figure-rows", "2"]


def shapcam(*argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(arg) for arg in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def tiny(monkeypatch):
    """Every model name loads the tiny classifier (1000 classes, 32 x 32 input)."""
    model, cfg = tiny_classifier()
    monkeypatch.setattr(session_module, "load_model", lambda name, weights=None: (model, cfg))
    return model, cfg


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    return root, write_imagenet_val(root)


def records_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_imagenet_validation_is_scored_by_every_method_and_metric(tiny, imagenet, tmp_path):
    root, entries = imagenet
    out = tmp_path / "out"
    code, table, err = shapcam("evaluate", "--data", root, "--boxes", root / "bbox_val", "--target", "label",
                               "--methods", "shapcam,gradcam,random", "--keep-fractions", "1,0.5", *FAST, "--out", out)
    assert code == 0, err
    assert table.startswith("| Method | GradCAM | ShapCAM | Random |")  # the paper's column order
    for row in ("Average Drop (%) ↓", "top 50% of the map", "Deletion AUC ↓", "Insertion AUC ↑",
                "Energy pointing game (%), 9 samples with boxes", "one box ≤ 50% of the image"):
        assert row in table
    records = records_of(out)
    assert len(records) == 3 * len(entries) and all(r["status"] == "scored" for r in records)
    by_key = {e["path"].stem: e for e in entries}
    for record in records:
        entry = by_key[record["key"]]
        assert record["label"] == record["target"]["index"] == entry["label"]
        heat = np.load(out / "maps" / f"{record['key']}__{record['method']}.npz")["map"]
        assert heat.shape == (32, 32) and heat.dtype == np.float16 and 0 <= heat.min() and heat.max() <= 1
        size = Image.open(entry["path"]).size
        boxes = [box_to_input(b, size, tiny[1]) for b in entry["boxes"]]
        expected = energy_pointing_game(heat.astype(np.float64), boxes) if heat.any() else record["box_area"]
        assert record["energy"] == pytest.approx(expected, abs=2e-3)
        assert 0 <= record["deletion_auc"] <= 1 and 0 <= record["insertion_auc"] <= 1
    summary = json.loads((out / "evaluation.json").read_text())["summary"]
    for method in ("shapcam", "gradcam", "random"):
        mine = [r for r in records if r["method"] == method]
        y, o = [r["probability"] for r in mine], [r["explanation_probability"]["0.5"] for r in mine]
        assert summary[method]["average_drop@0.5"] == pytest.approx(average_drop(y, o))
        assert summary[method]["increase_in_confidence@0.5"] == pytest.approx(increase_in_confidence(y, o))
        assert summary[method]["deletion_auc"] == pytest.approx(np.mean([r["deletion_auc"] for r in mine]))
    shap = [r["details"] for r in records if r["method"] == "shapcam"]
    assert all(d["n_permutations"] == 8 and d["efficiency_gap"] < 1e-5 for d in shap)
    assert (out / "evaluation.md").read_text().startswith(table.split("\n\n")[0])
    with Image.open(out / "evaluation.png") as figure:
        assert figure.height > 200 and figure.width > figure.height  # two rows of four panels


def test_an_evaluation_needs_resume_to_continue_and_only_computes_what_is_missing(tiny, imagenet, tmp_path,
                                                                               monkeypatch):
    root, entries = imagenet
    out = tmp_path / "out"
    args = ["evaluate", "--data", root, "--methods", "gradcam", "--metrics", "ad-ic", *FAST, "--out", out]
    assert shapcam(*args)[0] == 0
    code, _, err = shapcam(*args)
    assert code == 1 and "--resume" in err and "--overwrite" in err
    with (out / "records.jsonl").open("a") as file:
        file.write('{"schema_version": 1, "key": "torn')  # an interrupt in the middle of a line
    built = []
    real_build = methods.build
    monkeypatch.setattr(methods, "build", lambda name, session: built.append(name) or real_build(name, session))
    code, table, err = shapcam(*args[:4], "gradcam,random", *args[5:], "--resume")
    assert code == 0, err
    assert built == ["gradcam", "random"] and "| GradCAM | Random |" in table
    records = records_of(out)
    assert len(records) == 2 * len(entries) and [r["method"] for r in records].count("gradcam") == len(entries)
    code, _, err = shapcam(*args, "--resume", "--auc-steps", "5")
    assert code == 1 and "auc_steps was 4, now 5" in err


def test_an_interrupted_run_resumes_where_it_stopped(tiny, imagenet, tmp_path, monkeypatch):
    root, entries = imagenet
    out = tmp_path / "out"
    args = ["evaluate", "--data", root, "--methods", "random", "--metrics", "ad-ic", "--batch-size", "3", *FAST,
            "--out", out]
    calls = []
    real_score = scoring.score_maps

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_score(*a, **k)

    monkeypatch.setattr("shapcam_ext.cli.evaluate.score_maps", interrupted)
    code, _, err = shapcam(*args)
    assert code == 130 and "--resume" in err
    assert len(records_of(out)) == 3  # the first batch
    monkeypatch.setattr("shapcam_ext.cli.evaluate.score_maps", real_score)
    code, _, err = shapcam(*args, "--resume")
    assert code == 0 and "resuming: 3 of 9 samples" in err
    assert sorted(r["key"] for r in records_of(out)) == sorted(e["path"].stem for e in entries)


def test_a_failing_image_or_method_is_logged_and_skipped(tiny, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, colour in (("a", "red"), ("b", "green"), ("c", "blue")):
        Image.new("RGB", (40, 30), colour).save(photos / f"{name}.png")
    (photos / "broken.png").write_bytes(b"not a png")
    real_build = methods.build

    def fragile(name, session):
        run = real_build(name, session)
        def explain(x, classes, keys):
            if "b" in keys:
                raise RuntimeError("out of memory on b")
            return run(x, classes, keys)
        return explain

    monkeypatch.setattr(methods, "build", fragile)
    out = tmp_path / "out"
    code, table, err = shapcam("evaluate", "--data", photos, "--methods", "random,gradcam", "--metrics", "ad-ic",
                               "--batch-size", "4", *FAST, "--out", out)
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 4  # broken.png for both methods, b for both
    assert sum("broken.png" in line for line in errors) == 2 and sum("out of memory on b" in line for line in errors) == 2
    by_status = {(r["key"], r["method"]): r["status"] for r in records_of(out)}
    assert by_status[("a", "gradcam")] == by_status[("c", "random")] == "scored"
    assert by_status[("b", "gradcam")] == by_status[("broken", "random")] == "failed"
    assert "| images scored (failed) | 2 (2) | 2 (2) |" in table


def test_voc_labels_need_a_model_with_voc_classes(tiny, tmp_path):
    write_voc2007(tmp_path / "voc")
    code, _, err = shapcam("evaluate", "--data", tmp_path / "voc", "--target", "label", *FAST, "--out", tmp_path / "o")
    assert code == 1 and "its own 20 classes (aeroplane" in err and "--target top" in err


def test_voc_with_a_voc_model_points_at_its_objects(monkeypatch, tmp_path):
    model, cfg = tiny_classifier(classes=20)
    monkeypatch.setattr(session_module, "load_model", lambda name, weights=None: (model, cfg))
    write_voc2007(tmp_path / "voc")
    out = tmp_path / "out"
    code, table, err = shapcam("evaluate", "--data", tmp_path / "voc", "--target", "label", "--methods", "gradcam",
                               "--metrics", "pointing", *FAST, "--out", out)
    assert code == 0, err
    records = records_of(out)
    assert [r["target"]["name"] for r in records] == ["cat", "aeroplane", "person", "motorbike", "person"]
    assert all(r["energy"] is not None for r in records) and "5 samples with boxes" in table


def test_memory_stays_flat_over_hundreds_of_images(monkeypatch, tmp_path):
    model, cfg = tiny_classifier(classes=10, size=96)
    monkeypatch.setattr(session_module, "load_model", lambda name, weights=None: (model, cfg))
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(240):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(photos / f"{i:04d}.png")
    resident = []

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    real_add = ResultStore.add
    monkeypatch.setattr(ResultStore, "add", lambda self, *a: (real_add(self, *a), resident.append(rss())))
    code, _, err = shapcam("evaluate", "--data", photos, "--methods", "gradcam,shapcam", "--metrics", "ad-ic",
                           "--batch-size", "8", "--layer", "features", "--permutations", "4", "--figure-rows", "0",
                           "--out", tmp_path / "out")
    assert code == 0, err
    # Each method's records are saved as it finishes a batch: GradCAM, Shap-CAM and the random
    # reference, over 30 batches of 8.
    assert len(resident) == 3 * 30
    # Keeping each image's input, activations or maps would add about 0.2 MB per image, 30 MB over
    # the last 20 batches; the allocator's own ups and downs stay within a few MB of the median.
    early, late = np.median(resident[15:36]), np.median(resident[-21:])
    assert late - early < 12 * 2**20, [round(r / 2**20) for r in resident]
