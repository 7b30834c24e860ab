"""torchrun shards the CLI's images across processes; rank 0 prints every record, in image order."""
import json
import subprocess
import sys

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
