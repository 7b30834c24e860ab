"""Memory stays bounded: chunks respect the budget, and repeated runs do not grow the process."""
import gc

import torch
import torchvision

import numerics
from shapcam_ext import ShapCAM, ops


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_chunks_stay_under_the_memory_budget(monkeypatch):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 96, 96)  # layer4: 512 x 3 x 3
    sizes = []
    original = ops.masked_prefixes

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        sizes.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(ops, "masked_prefixes", recording)
    budget = 2 << 20
    cam = ShapCAM(model, ["layer4"], n_permutations=16, memory_budget=budget, fast_path=False)
    with numerics.LogitScale(model.fc) as scale:
        small = cam.explain(x)
        assert len(sizes) >= 3 and max(sizes) <= budget  # 2 images x 16 x 10 masked maps of 18 KiB: 5.6 MiB
        # The same values as one big chunk, up to the rounding of the head's other batch shapes.
        big = ShapCAM(model, ["layer4"], n_permutations=16, fast_path=False).explain(x)
    bound = 2 * numerics.map_error(numerics.model_value_error(scale, model, "layer4", positions=9))
    for a, b in zip(small, big):
        numerics.assert_within(a.shapley, b.shapley, bound, "chunks under the budget against one chunk")


def test_long_runs_do_not_grow_memory():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with ShapCAM(model, [model.layer4], n_permutations=32) as cam:
        for _ in range(5):
            cam(x)
        gc.collect()
        before = rss_bytes()
        for _ in range(40):
            cam(x)
        gc.collect()
        grown = rss_bytes() - before
    assert grown < 16 << 20, f"resident memory grew by {grown / 2**20:.1f} MiB over 40 runs"


PEAK_RSS_SCRIPT = """
import resource, sys, torch
from torch import nn
from shapcam_ext import ShapCAM
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
x = torch.randn(1, 3, 16, 16)  # 256 players
ShapCAM(model, [model[1]], n_permutations=2, memory_budget=16 << 20).explain(x)  # warm up the allocator
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ShapCAM(model, [model[1]], n_permutations=int(sys.argv[1]), memory_budget=16 << 20).explain(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_peak_memory_does_not_grow_with_the_number_of_permutations():
    """Permutations are streamed in rounds: 100x more of them costs no more memory. Drawn all at
    once, 200k orders of 256 players would take 600 MB (int64 orders and float32 draws)."""
    import subprocess
    import sys

    def peak_growth_kib(permutations: int) -> int:
        out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(permutations)], capture_output=True,
                             text=True, check=True)
        return int(out.stdout.split()[-1])

    small, large = peak_growth_kib(2_000), peak_growth_kib(200_000)
    assert large - small < 48 * 1024, (small, large)  # the 16 MiB budget plus allocator slack
