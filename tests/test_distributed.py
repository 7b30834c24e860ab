"""torchrun shards the CLI's images across processes; rank 0 reports them all, in order."""
import json
import subprocess
import sys

from shapcam_ext.cli.images import bundled_photos


def test_torchrun_splits_images_and_keeps_their_order(tmp_path):
    photos = bundled_photos()
    images = [str(photos[name]) for name in ("chelsea", "coffee", "horse")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "shapcam_ext", "explain", *images, "--permutations", "8", "--out", str(tmp_path), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads(done.stdout)
    assert [r["image"] for r in records] == images
    assert [r["top5"][0]["name"] for r in records[:2]] == ["Egyptian cat", "espresso"]
    assert all(r["error"] is None and (tmp_path / r["png"].split("/")[-1]).is_file() for r in records)
