"""The engine on a GPU: the estimate stays on the device, and CUDA agrees with the CPU.

Skipped without CUDA; scripts/gpu_check.sh runs them on a lent GPU.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from shapcam_ext import ShapCAM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def mixing_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(8 * 2 * 3, 5)).eval()


def pooled_model() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


@pytest.mark.parametrize("make", [mixing_model, pooled_model], ids=["generic", "pooled-linear"])
def test_exact_maps_on_cuda_equal_the_cpu_maps(make):
    model = make()
    x = torch.randn(2, 3, 3, 4)
    model(x)
    cpu = ShapCAM(model, [model[1]], exact=True).explain(x)
    gpu_model = make().cuda()
    gpu = ShapCAM(gpu_model, [gpu_model[1]], exact=True).explain(x.cuda())
    for c, g in zip(cpu, gpu):
        assert g.path == c.path
        # float32 heads on two devices: the worths differ by a few float32 ulps of the largest
        # logit-scale value, and each map value is an average of differences of worths.
        scale = max(abs(c.value_full), abs(c.value_empty))
        torch.testing.assert_close(g.shapley, c.shapley, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("make", [mixing_model, pooled_model], ids=["generic", "pooled-linear"])
def test_host_syncs_do_not_grow_with_the_permutations(make):
    """Rounds run without reading the device: the syncs of a run are a fixed handful (targets,
    the fast path's probe, the final copy), whatever the number of rounds."""
    model = make().cuda()
    x = torch.randn(1, 3, 3, 4, device="cuda")

    def syncs(permutations: int) -> int:
        cam = ShapCAM(model, [model[1]], n_permutations=permutations, batch_size=26)  # 2 permutations a chunk
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                cam.explain(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert syncs(256) == syncs(16)


@pytest.mark.parametrize("make", [mixing_model, pooled_model], ids=["generic", "pooled-linear"])
def test_sampling_rounds_never_read_the_device(make):
    """Under set_sync_debug_mode("error") any host read raises; the engine allows reads only at its
    documented points (engine.host_reads: a batch's setup, the stop checks, the results, the cost
    probe), so a whole run, with a tolerance's stop checks, completes."""
    model = make().cuda()
    x = torch.randn(2, 3, 3, 4, device="cuda")
    cam = ShapCAM(model, [model[1]], n_permutations=256, tolerance=0.05, batch_size=26)
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = cam.explain(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(r.n_permutations > 0 for r in results)
