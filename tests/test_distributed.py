"""torchrun shards the CLI's images across processes; rank 0 prints every record, in image order, and the
results equal a single process's."""
import json
import os
import subprocess
import sys

import pytest

from fixture_data import write_imagenet_val
from shapcam_ext.cli.images import bundled_photos


def test_torchrun_splits_images_and_keeps_their_order(tmp_path):
    photos = bundled_photos()
    images = [str(photos[name]) for name in ("chelsea", "coffee", "horse")]  # the last round has one image
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "shapcam_ext", "explain", *images, "--permutations", "8", "--out", str(tmp_path), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["image"] for r in records] == images  # once each, from rank 0 only
    assert [r["top5"][0]["name"] for r in records[:2]] == ["Egyptian cat", "espresso"]
    assert all(r["status"] == "explained" for r in records)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{name}_shapcam.{kind}" for name in ("chelsea", "coffee", "horse") for kind in ("png", "npz")
    )


def test_two_processes_give_the_same_evaluation_as_one(tmp_path):
    """The real Lite0 on a fixture in the ImageNet-val layout: 2 processes under torchrun, then 1, same table and records."""
    root = tmp_path / "imagenet"
    write_imagenet_val(root, photos=["chelsea", "coffee", "rocket"])  # the last round has one image
    args = ["evaluate", "--data", str(root), "--boxes", str(root / "bbox_val"), "--target", "label",
            "--methods", "gradcam,shapcam", "--metrics", "ad-ic,deletion,pointing", "--auc-steps", "4",
            "--permutations", "16", "--figure-rows", "0", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's setting, so both runs do the same arithmetic
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "shapcam_ext", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "shapcam_ext", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]

    def without_times(table: str) -> list[str]:
        return [line for line in table.splitlines() if not line.startswith("| seconds per image")]

    assert without_times(two.stdout) == without_times(one.stdout)  # printed once, by rank 0
    assert "| Method | GradCAM | ShapCAM |" in one.stdout and "3 samples with boxes" in one.stdout
    records = {}
    for name in ("one", "two"):
        lines = (tmp_path / name / "records.jsonl").read_text().splitlines()
        records[name] = {(r["key"], r["method"]): r for r in map(json.loads, lines)}
    assert records["one"].keys() == records["two"].keys() and len(records["one"]) == 6  # each pair exactly once
    for pair, record in records["one"].items():
        other = records["two"][pair]
        assert record["status"] == other["status"] == "scored"
        for field in ("probability", "deletion_auc", "energy"):
            assert other[field] == pytest.approx(record[field], rel=1e-6, abs=1e-9), (pair, field)
