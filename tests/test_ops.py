"""The compiled shapcam ops against their pure-PyTorch references (shapcam_ext.reference).

Inputs are generated with hypothesis: every dtype, 3-D and batched maps, contiguous,
channels_last and strided layouts, each baseline shape, ranges at both ends, n = 1, K = 1 and
large K. CUDA variants run when a GPU is present (select them with ``-k cuda``).
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import numerics
from shapcam_ext import ops, reference
from shapcam_ext._backend import COMPILED

needs_compiled = pytest.mark.skipif(not COMPILED, reason="the compiled library shapcam_ext._C is not built")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=needs_cuda),
]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ACC_DTYPES = [torch.float32, torch.float64]
LAYOUTS = ["contiguous", "channels_last", "strided", "transposed"]
FEW = settings(max_examples=20, deadline=None)


def arrange(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x's values in the given memory layout (as far as its number of dimensions allows)."""
    if layout == "channels_last" and x.dim() >= 3:  # channels (dim -3) innermost
        return x.movedim(-3, -1).contiguous().movedim(-1, -3)
    if layout == "strided":  # every other element of a wider buffer
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        return wide[..., ::2].copy_(x)
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x.contiguous()


def random_perms(k: int, n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(n, generator=gen) for _ in range(k)])


def randn(*shape, dtype=torch.float32, gen=None) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


@dataclass
class MaskedCase:
    batch: int | None  # None: a 3-D (C, h, w) map
    c: int
    h: int
    w: int
    k: int
    baseline: str
    layout: str
    perm_range: tuple[int, int]
    prefix_range: tuple[int, int]
    seed: int

    def tensors(self, dtype, device):
        gen = torch.Generator().manual_seed(self.seed)
        lead = () if self.batch is None else (self.batch,)
        acts = arrange(randn(*lead, self.c, self.h, self.w, dtype=dtype, gen=gen).to(device), self.layout)
        base_shape = {
            "scalar": (),
            "channel": (self.c, 1, 1),
            "map": (self.c, self.h, self.w),
            "batched": lead + (self.c, self.h, self.w),
            "row": (self.w,),
        }[self.baseline]
        base = randn(*base_shape, dtype=dtype, gen=gen).to(device)
        perms = random_perms(self.k, self.h * self.w, gen).to(device)
        return (acts, base, perms, *self.perm_range, *self.prefix_range)


def ranges(draw, size: int) -> tuple[int, int]:
    """[start, end) within 0..size, often touching either end."""
    start = draw(st.sampled_from([0, size - 1]) | st.integers(0, size - 1))
    end = draw(st.sampled_from([start + 1, size]) | st.integers(start + 1, size))
    return start, end


@st.composite
def masked_cases(draw) -> MaskedCase:
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    k = draw(st.integers(1, 4) | st.just(40))
    return MaskedCase(
        batch=draw(st.sampled_from([None, 1, 3])),
        c=draw(st.sampled_from([1, 3, 8, 17])),
        h=h,
        w=w,
        k=k,
        baseline=draw(st.sampled_from(["scalar", "channel", "map", "batched", "row"])),
        layout=draw(st.sampled_from(LAYOUTS)),
        perm_range=ranges(draw, k),
        prefix_range=ranges(draw, h * w + 1),
        seed=draw(st.integers(0, 2**31)),
    )


@dataclass
class WalkCase:
    batch: int | None  # None: unbatched values (K, n+1); linear_walk_ always batches
    k: int
    n: int
    m: int  # classes, for linear_walk_
    layout: str
    softmax: bool
    seed: int
    unit_size: int = 1  # permutations per unit of phi_sq; divides k

    def perms(self, gen):
        return random_perms(self.k, self.n, gen)

    def accumulators(self, lead, acc, gen, device):
        """phi and phi_sq, random (the ops add to them) and strided per the case's layout."""
        return tuple(arrange(randn(*lead, self.n, dtype=acc, gen=gen).to(device), self.layout) for _ in "ab")


@st.composite
def walk_cases(draw) -> WalkCase:
    k = draw(st.integers(1, 5) | st.just(300))
    return WalkCase(
        batch=draw(st.sampled_from([None, 1, 3])),
        k=k,
        n=draw(st.integers(1, 9)),
        m=draw(st.integers(1, 12)),
        layout=draw(st.sampled_from(["contiguous", "strided", "transposed"])),
        softmax=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31)),
        unit_size=draw(st.sampled_from([u for u in (1, 2, 3) if k % u == 0])),
    )


def scatter_inputs(case: WalkCase, dtype, acc, device):
    gen = torch.Generator().manual_seed(case.seed)
    lead = () if case.batch is None else (case.batch,)
    values = arrange(randn(*lead, case.k, case.n + 1, dtype=dtype, gen=gen).to(device), case.layout)
    perms = case.perms(gen).to(device)
    return (values, perms, *case.accumulators(lead, acc, gen, device), case.unit_size)


def walk_inputs(case: WalkCase, dtype, acc, device):
    gen = torch.Generator().manual_seed(case.seed)
    batch = case.batch or 1
    start = randn(batch, case.m, dtype=dtype, gen=gen).to(device)
    deltas = arrange(randn(batch, case.n, case.m, dtype=dtype, gen=gen).to(device), case.layout)
    perms = case.perms(gen).to(device)
    classes = torch.randint(case.m, (batch,), generator=gen).to(device)
    return (start, deltas, perms, classes, case.softmax, *case.accumulators((batch,), acc, gen, device),
            case.unit_size)


def run(inputs, op):
    """phi and phi_sq after ``op`` on ``inputs`` (which end with phi, phi_sq, unit_size)."""
    op(*inputs)
    return inputs[-3:-1]


def scatter_bound(case: WalkCase, dtype, acc):
    """Bounds on phi, phi_sq for one implementation of scatter_marginals_ (numerics.scatter_error)."""
    return numerics.scatter_error(*scatter_inputs(case, dtype, acc, "cpu"))


def walk_bound(case: WalkCase, dtype, acc, walk):
    """Bounds on phi, phi_sq for one implementation of linear_walk_ that walks in ``walk``."""
    start, deltas, perms, classes, softmax, phi, phi_sq, unit_size = walk_inputs(case, dtype, acc, "cpu")
    return numerics.walk_error(start, deltas, perms, classes, softmax, walk, phi, phi_sq, unit_size)


def assert_accumulators_within(got, expected, bounds, what):
    for name, g, e, bound in zip(("phi", "phi_sq"), got, expected, bounds):
        numerics.assert_within(g, e, bound, f"{what}: {name}")


def assert_same_maps(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out.cpu(), expected.cpu(), rtol=0, atol=0)


# --- the compiled kernels against the references ----------------------------------------------


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@FEW
@given(case=masked_cases())
def test_masked_prefixes_matches_reference(device, dtype, case):
    args = case.tensors(dtype, device)
    assert_same_maps(torch.ops.shapcam.masked_prefixes(*args), reference.masked_prefixes(*args))


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape, k, perm_range, prefix_range",
    [
        ((3, 1, 1), 1, (0, 1), (0, 2)),  # n = 1, K = 1: every prefix
        ((2, 5, 3, 2), 300, (0, 300), (0, 7)),  # large K, batched
        ((2, 5, 3, 2), 300, (299, 300), (6, 7)),  # the last permutation's full prefix
        ((16, 4, 4), 7, (3, 4), (0, 1)),  # the empty prefix: all baseline
    ],
)
def test_masked_prefixes_edges(device, shape, k, perm_range, prefix_range):
    gen = torch.Generator().manual_seed(0)
    acts = randn(*shape, gen=gen).to(device)
    base = randn(shape[-3], 1, 1, gen=gen).to(device)
    perms = random_perms(k, shape[-1] * shape[-2], gen).to(device)
    args = (acts, base, perms, *perm_range, *prefix_range)
    assert_same_maps(torch.ops.shapcam.masked_prefixes(*args), reference.masked_prefixes(*args))


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("acc", ACC_DTYPES)
@FEW
@given(case=walk_cases())
def test_scatter_marginals_matches_reference(device, dtype, acc, case):
    got = run(scatter_inputs(case, dtype, acc, device), torch.ops.shapcam.scatter_marginals_)
    expected = run(scatter_inputs(case, dtype, acc, "cpu"), reference.scatter_marginals_)
    # The kernel and the reference, each within scatter_error of the exact sums.
    bounds = [2 * b for b in scatter_bound(case, dtype, acc)]
    assert_accumulators_within(got, expected, bounds, "scatter_marginals_ against its reference")


def walk_against_reference_bounds(case: WalkCase, dtype, acc):
    """The kernel walks in the inputs' opmath type, the reference in phi's dtype."""
    kernel = walk_bound(case, dtype, acc, numerics.opmath(dtype))
    ref = walk_bound(case, dtype, acc, acc)
    return [a + b for a, b in zip(kernel, ref)]


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("acc", ACC_DTYPES)
@FEW
@given(case=walk_cases())
def test_linear_walk_matches_reference(device, dtype, acc, case):
    got = run(walk_inputs(case, dtype, acc, device), torch.ops.shapcam.linear_walk_)
    expected = run(walk_inputs(case, dtype, acc, "cpu"), reference.linear_walk_)
    bounds = walk_against_reference_bounds(case, dtype, acc)
    assert_accumulators_within(got, expected, bounds, "linear_walk_ against its reference")


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("softmax", [True, False])
def test_linear_walk_many_classes(device, softmax):
    case = WalkCase(batch=2, k=64, n=49, m=1000, layout="contiguous", softmax=softmax, seed=3)
    got = run(walk_inputs(case, torch.float32, torch.float64, device), torch.ops.shapcam.linear_walk_)
    expected = run(walk_inputs(case, torch.float32, torch.float64, "cpu"), reference.linear_walk_)
    bounds = walk_against_reference_bounds(case, torch.float32, torch.float64)
    assert_accumulators_within(got, expected, bounds, "linear_walk_ (1000 classes) against its reference")


def test_bounds_catch_a_wrong_walk():
    """The bounds are tight enough to fail: a walk that takes one permutation's first two steps in
    the wrong order (as an off-by-one in the kernel would) falls outside them."""
    case = WalkCase(batch=2, k=64, n=49, m=1000, layout="contiguous", softmax=True, seed=3)
    inputs = walk_inputs(case, torch.float32, torch.float32, "cpu")
    expected = run(walk_inputs(case, torch.float32, torch.float32, "cpu"), reference.linear_walk_)
    inputs[2][0, :2] = inputs[2][0, :2].flip(0)
    wrong = run(inputs, reference.linear_walk_)
    bounds = walk_against_reference_bounds(case, torch.float32, torch.float32)
    with pytest.raises(AssertionError, match="exceeds its rounding bound"):
        assert_accumulators_within(wrong, expected, bounds, "a wrong walk")


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    """Bit-identical on repeated runs and, on the CPU, whatever the thread count."""
    threads = torch.get_num_threads()
    case = WalkCase(batch=2, k=1024, n=196, m=50, layout="contiguous", softmax=True, seed=5)
    for inputs, op in [(scatter_inputs, torch.ops.shapcam.scatter_marginals_),
                       (walk_inputs, torch.ops.shapcam.linear_walk_)]:
        results = [run(inputs(case, torch.float32, torch.float32, device), op) for _ in range(2)]
        torch.set_num_threads(1)
        try:
            results.append(run(inputs(case, torch.float32, torch.float32, device), op))
        finally:
            torch.set_num_threads(threads)
        assert all(torch.equal(a, b) for result in results[1:] for a, b in zip(results[0], result))
    maps = MaskedCase(2, 64, 7, 7, 8, "map", "channels_last", (0, 8), (0, 50), seed=5)
    args = maps.tensors(torch.float32, device)
    assert torch.equal(torch.ops.shapcam.masked_prefixes(*args), torch.ops.shapcam.masked_prefixes(*args))


# --- the op registrations: opcheck, autograd, torch.compile ------------------------------------


def sample_args(device, requires_grad=False):
    gen = torch.Generator().manual_seed(1)
    acts = randn(2, 3, 2, 3, dtype=torch.float64, gen=gen).to(device).requires_grad_(requires_grad)
    base = randn(3, 1, 1, dtype=torch.float64, gen=gen).to(device).requires_grad_(requires_grad)
    perms = random_perms(4, 6, gen).to(device)
    return acts, base, perms


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for grad in (False, True):
        acts, base, perms = sample_args(device, requires_grad=grad)
        torch.library.opcheck(torch.ops.shapcam.masked_prefixes.default, (acts, base, perms, 1, 3, 2, 7))
    values = randn(2, 4, 7, gen=torch.Generator().manual_seed(2)).to(device)
    phi, phi_sq = torch.zeros(2, 6, device=device), torch.zeros(2, 6, device=device)
    for unit_size in (1, 2):
        torch.library.opcheck(torch.ops.shapcam.scatter_marginals_.default, (values, perms, phi, phi_sq, unit_size))
    start, deltas = torch.randn(2, 5, device=device), torch.randn(2, 6, 5, device=device)
    classes = torch.tensor([0, 4], device=device)
    for softmax in (True, False):
        torch.library.opcheck(
            torch.ops.shapcam.linear_walk_.default, (start, deltas, perms, classes, softmax, phi, phi_sq, 2)
        )


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("baseline_shape", [(3, 1, 1), (2, 3, 2, 3), ()])
def test_masked_prefixes_gradcheck(device, baseline_shape):
    acts, _, perms = sample_args(device, requires_grad=True)
    base = torch.randn(baseline_shape, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda a, b: ops.masked_prefixes(a, b, perms, perm_range=(1, 3), prefix_range=(2, 7))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (acts, base))


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    acts, base, perms = sample_args(device)
    values = torch.randn(2, 4, 7, device=device)
    start, deltas = torch.randn(2, 5, device=device), torch.randn(2, 6, 5, device=device)
    classes = torch.tensor([1, 3], device=device)

    def explain(acts, base, values, start, deltas, phi, phi_sq):
        maps = ops.masked_prefixes(acts, base, perms, perm_range=(0, 2))
        ops.scatter_marginals_(values, perms, phi, phi_sq)
        ops.linear_walk_(start, deltas, perms, classes, True, phi, phi_sq)
        return maps

    eager = [torch.zeros(2, 6, device=device) for _ in range(2)]
    compiled = [torch.zeros(2, 6, device=device) for _ in range(2)]
    expected = explain(acts, base, values, start, deltas, *eager)
    got = torch.compile(explain, fullgraph=True)(acts, base, values, start, deltas, *compiled)
    torch.testing.assert_close(got, expected)
    for g, e in zip(compiled, eager):
        torch.testing.assert_close(g, e)


# --- CUDA: the same maps as the CPU, no host syncs, CUDA graphs ---------------------------------


@needs_compiled
@needs_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("acc", ACC_DTYPES)
@pytest.mark.parametrize("softmax", [True, False])
def test_cuda_maps_match_cpu(dtype, acc, softmax):
    """Both devices walk in the inputs' opmath type and accumulate in phi's dtype: each within
    numerics.walk_error (scatter_error) of exact, whatever their reduction orders."""
    case = WalkCase(batch=3, k=64, n=49, m=1000, layout="strided", softmax=softmax, seed=7, unit_size=2)
    got = run(walk_inputs(case, dtype, acc, "cuda"), torch.ops.shapcam.linear_walk_)
    expected = run(walk_inputs(case, dtype, acc, "cpu"), torch.ops.shapcam.linear_walk_)
    bounds = [2 * b for b in walk_bound(case, dtype, acc, numerics.opmath(dtype))]
    assert_accumulators_within(got, expected, bounds, "linear_walk_ on CUDA against the CPU")
    got = run(scatter_inputs(case, dtype, acc, "cuda"), torch.ops.shapcam.scatter_marginals_)
    expected = run(scatter_inputs(case, dtype, acc, "cpu"), torch.ops.shapcam.scatter_marginals_)
    bounds = [2 * b for b in scatter_bound(case, dtype, acc)]
    assert_accumulators_within(got, expected, bounds, "scatter_marginals_ on CUDA against the CPU")
    args = MaskedCase(3, 64, 7, 7, 8, "channel", "channels_last", (1, 7), (0, 50), seed=7).tensors(dtype, "cpu")
    on_cuda = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    assert torch.equal(torch.ops.shapcam.masked_prefixes(*on_cuda).cpu(), torch.ops.shapcam.masked_prefixes(*args))


def cuda_graph_inputs():
    gen = torch.Generator().manual_seed(4)
    acts, base, perms = sample_args("cuda")
    values = randn(2, 4, 7, dtype=torch.float64, gen=gen).cuda()
    start, deltas = randn(2, 5, gen=gen).cuda(), randn(2, 6, 5, gen=gen).cuda()
    return acts, base, perms, values, start, deltas, torch.tensor([1, 3], device="cuda")


def all_ops(acts, base, perms, values, start, deltas, classes):
    """Every op once; the accumulators are made here, so that no input is mutated."""
    sums = [values.new_zeros(2, 6) for _ in range(4)]
    maps = ops.masked_prefixes(acts, base, perms, perm_range=(1, 3))
    ops.scatter_marginals_(values, perms, sums[0], sums[1], 2)
    ops.linear_walk_(start, deltas, perms, classes, True, sums[2], sums[3], 2)
    return maps, *sums


@needs_compiled
@needs_cuda
def test_cuda_graph_capture():
    """torch.compile's reduce-overhead mode records the ops in a CUDA graph and replays it; a
    host sync inside an op would make the capture fail (or be skipped, which counts here)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(all_ops, mode="reduce-overhead", fullgraph=True)
    inputs = cuda_graph_inputs()
    for step in range(4):  # warm-up, recording, then replays on new values
        inputs = (inputs[0] + step, inputs[1], inputs[2], inputs[3] * (step + 1), inputs[4] - step, *inputs[5:])
        got = [t.clone() for t in compiled(*inputs)]  # a replay overwrites the graph's outputs
        expected = all_ops(*inputs)
        assert all(torch.equal(g, e) for g, e in zip(got, expected)), f"step {step}"
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


@needs_compiled
@needs_cuda
def test_cuda_ops_do_not_sync_with_the_host():
    inputs = cuda_graph_inputs()
    expected = all_ops(*(t.cpu() for t in inputs))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchronizing"):  # the mode is on: a host read raises
            torch.zeros((), device="cuda").item()
        got = all_ops(*inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got[0].cpu(), expected[0])
    _, _, perms, values, start, deltas, classes = (t.cpu() for t in inputs)
    zeros = torch.zeros(2, 6, dtype=torch.float64)
    bounds = [*numerics.scatter_error(values, perms, zeros, zeros, 2),
              *numerics.walk_error(start, deltas, perms, classes, True, torch.float32, zeros, zeros, 2)]
    for name, g, e, bound in zip(("phi", "phi_sq", "walk phi", "walk phi_sq"), got[1:], expected[1:], bounds):
        numerics.assert_within(g, e, 2 * bound, f"{name} on CUDA against the CPU")


# --- argument errors name the argument, on both backends ---------------------------------------


def masked_call(**change):
    """ops.masked_prefixes on valid (2, 3, 2, 2) inputs, with some arguments replaced."""
    args = dict(
        activations=torch.randn(2, 3, 2, 2),
        perms=torch.stack([torch.randperm(4) for _ in range(3)]),
        baseline=torch.zeros(3, 1, 1),
        perm_range=(0, 3),
        prefix_range=(0, 5),
    )
    args.update(change)
    return functools.partial(ops.masked_prefixes, **args)


def scatter_call(**change):
    args = dict(values=torch.randn(2, 3, 5), perms=torch.stack([torch.randperm(4) for _ in range(3)]),
                phi=torch.zeros(2, 4), phi_sq=torch.zeros(2, 4))
    args.update(change)
    return functools.partial(ops.scatter_marginals_, **args)


def walk_call(**change):
    args = dict(start_logits=torch.randn(2, 5), deltas=torch.randn(2, 4, 5),
                perms=torch.stack([torch.randperm(4) for _ in range(3)]), classes=torch.tensor([0, 4]),
                softmax=True, phi=torch.zeros(2, 4), phi_sq=torch.zeros(2, 4))
    args.update(change)
    return functools.partial(ops.linear_walk_, **args)


BAD_CALLS = {
    "masked: activations rank": ("activations", masked_call(activations=torch.randn(4, 4))),
    "masked: activations dtype": ("activations", masked_call(activations=torch.ones(2, 3, 2, 2, dtype=torch.int64))),
    "masked: baseline dtype": ("baseline", masked_call(baseline=torch.zeros(3, 1, 1, dtype=torch.float64))),
    "masked: baseline shape": ("baseline", masked_call(baseline=torch.zeros(4, 1, 1))),
    "masked: baseline rank": ("baseline", masked_call(baseline=torch.zeros(1, 2, 3, 2, 2))),
    "masked: perms dtype": ("perms", masked_call(perms=torch.tensor([[0, 1, 2, 3]], dtype=torch.int32))),
    "masked: perms shape": ("perms", masked_call(perms=torch.arange(5).view(1, 5))),
    "masked: perms 1-D": ("perms", masked_call(perms=torch.arange(4))),
    "masked: perms repeats": ("perms", masked_call(perms=torch.tensor([[0, 1, 2, 3], [0, 0, 2, 3]]), perm_range=(0, 1))),
    "masked: perms out of range": ("perms", masked_call(perms=torch.tensor([[0, 1, 2, 4]]), perm_range=(0, 1))),
    "masked: perms negative": ("perms", masked_call(perms=torch.tensor([[-1, 1, 2, 3]]), perm_range=(0, 1))),
    "masked: perm_range past K": ("perm_range", masked_call(perm_range=(0, 4))),
    "masked: perm_range empty": ("perm_range", masked_call(perm_range=(2, 2))),
    "masked: perm_range negative": ("perm_range", masked_call(perm_range=(-1, 2))),
    "masked: prefix_range past n+1": ("prefix_range", masked_call(prefix_range=(0, 6))),
    "masked: prefix_range empty": ("prefix_range", masked_call(prefix_range=(3, 3))),
    "scatter: values rank": ("values", scatter_call(values=torch.randn(5))),
    "scatter: values dtype": ("values", scatter_call(values=torch.ones(2, 3, 5, dtype=torch.int64))),
    "scatter: perms count": ("perms", scatter_call(perms=torch.stack([torch.randperm(4) for _ in range(2)]))),
    "scatter: perms dtype": ("perms", scatter_call(perms=torch.zeros(3, 4, dtype=torch.int32))),
    "scatter: perms repeats": ("perms", scatter_call(perms=torch.tensor([[0, 1, 2, 3]] * 2 + [[3, 3, 1, 0]]))),
    "scatter: phi shape": ("phi", scatter_call(phi=torch.zeros(4))),
    "scatter: phi dtype": ("phi", scatter_call(phi=torch.zeros(2, 4, dtype=torch.float16))),
    "scatter: phi_sq dtype": ("phi_sq", scatter_call(phi_sq=torch.zeros(2, 4, dtype=torch.float64))),
    "scatter: unit_size": ("unit_size", scatter_call(unit_size=2)),
    "walk: start_logits rank": ("start_logits", walk_call(start_logits=torch.randn(5))),
    "walk: deltas shape": ("deltas", walk_call(deltas=torch.randn(2, 4, 6))),
    "walk: deltas dtype": ("deltas", walk_call(deltas=torch.randn(2, 4, 5, dtype=torch.float64))),
    "walk: classes dtype": ("classes", walk_call(classes=torch.tensor([0, 4], dtype=torch.int32))),
    "walk: classes out of range": ("classes", walk_call(classes=torch.tensor([0, 5]))),
    "walk: perms out of range": ("perms", walk_call(perms=torch.tensor([[0, 1, 2, 3]] * 2 + [[0, 1, 2, 7]]))),
    "walk: phi shape": ("phi", walk_call(phi=torch.zeros(2, 5))),
    "walk: unit_size": ("unit_size", walk_call(unit_size=0)),
}
# Errors that depend on the values, not the shapes: the CUDA kernels check them with device-side
# asserts (raising would need a host sync).
DEVICE_CHECKED = {"masked: perms repeats", "masked: perms out of range", "masked: perms negative",
                  "scatter: perms repeats", "walk: classes out of range", "walk: perms out of range"}


def on_device(call: functools.partial, device) -> functools.partial:
    """The same call with its tensors on ``device``."""
    moved = {key: value.to(device) if isinstance(value, torch.Tensor) else value
             for key, value in call.keywords.items()}
    return functools.partial(call.func, **moved)


@pytest.mark.parametrize("backend", [pytest.param("compiled", marks=needs_compiled), "reference"])
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_name_the_argument(backend, case, monkeypatch):
    monkeypatch.setattr(ops, "COMPILED", backend == "compiled")
    name, call = BAD_CALLS[case]
    with pytest.raises((RuntimeError, ValueError), match=rf"\b{name}\b"):
        call()


@needs_compiled
@needs_cuda
@pytest.mark.parametrize("case", [case for case in BAD_CALLS if case not in DEVICE_CHECKED])
def test_cuda_bad_arguments_name_the_argument(case):
    name, call = BAD_CALLS[case]
    with pytest.raises((RuntimeError, ValueError), match=rf"\b{name}\b"):
        on_device(call, "cuda")()


@needs_compiled
@needs_cuda
@pytest.mark.parametrize("case", sorted(DEVICE_CHECKED))
def test_cuda_bad_values_trip_a_device_assert(case):
    """A device-side assert leaves the CUDA context unusable, so each runs in its own process."""
    script = (
        "import sys, torch\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from test_ops import BAD_CALLS, on_device\n"
        f"on_device(BAD_CALLS[{case!r}][1], 'cuda')()\n"
        "torch.cuda.synchronize()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(__file__)),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "device-side assert triggered" in out.stderr, out.stdout + out.stderr
    message = "classes must lie in" if "classes" in case else "every row must be a permutation"
    assert message in out.stdout + out.stderr


@needs_compiled
@needs_cuda
def test_cuda_device_mismatch_names_the_arguments():
    with pytest.raises(RuntimeError, match="one device"):
        masked_call(activations=torch.randn(2, 3, 2, 2, device="cuda"), baseline=torch.zeros((), device="cuda"))()
    with pytest.raises(RuntimeError, match="one device"):
        scatter_call(values=torch.randn(2, 3, 5, device="cuda"))()


# --- backend selection -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["SHAPCAM_BACKEND=reference", "_C missing"])
def test_reference_backend_selection(how):
    script = (
        "import sys, warnings\n"
        + ("sys.modules['shapcam_ext._C'] = None\n" if how == "_C missing" else "")
        + "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import shapcam_ext\n"
        "print(shapcam_ext.backend_info()['backend'],\n"
        "      sum(w.category is RuntimeWarning and 'compiled library' in str(w.message) for w in caught))\n"
    )
    env = dict(os.environ, SHAPCAM_BACKEND="reference" if how.startswith("SHAPCAM") else "compiled")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    backend, warnings = out.stdout.split()
    assert backend == "reference"
    assert int(warnings) == (1 if how == "_C missing" else 0)
