"""The compiled shapcam ops against their pure-PyTorch references (shapcam_ext.reference).

Inputs are generated with hypothesis: every dtype, 3-D and batched maps, contiguous,
channels_last and strided layouts, each baseline shape, ranges at both ends, n = 1, K = 1 and
large K. The gradients of the differentiable ops are checked by gradcheck in float64 and against
autograd through the reference. CUDA variants run when a GPU is present (select them with
``-k cuda``).
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
        ranks = reference.permutation_ranks(random_perms(self.k, self.h * self.w, gen)).to(device)
        return (acts, base, ranks, *self.perm_range, *self.prefix_range)


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


def over_walk_cases(test):
    """``test(device, dtype, acc, case)`` with the compiled ops, on every device, input dtype and
    accumulator dtype, over hypothesis' walk_cases."""
    test = FEW(given(case=walk_cases())(test))
    for mark in (pytest.mark.parametrize("acc", ACC_DTYPES), pytest.mark.parametrize("dtype", FLOAT_DTYPES),
                 pytest.mark.parametrize("device", DEVICES), needs_compiled):
        test = mark(test)
    return test


def scatter_inputs(case: WalkCase, dtype, acc, device):
    """The arguments of scatter_marginals_: values, ranks, phi, phi_sq, unit_size."""
    gen = torch.Generator().manual_seed(case.seed)
    lead = () if case.batch is None else (case.batch,)
    values = arrange(randn(*lead, case.k, case.n + 1, dtype=dtype, gen=gen).to(device), case.layout)
    ranks = reference.permutation_ranks(case.perms(gen)).to(device)
    return (values, ranks, *case.accumulators(lead, acc, gen, device), case.unit_size)


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


def walk_bound(case: WalkCase, dtype, acc):
    """Bounds on phi, phi_sq for one implementation of linear_walk_ (each walks in opmath)."""
    return numerics.walk_error(*walk_inputs(case, dtype, acc, "cpu"))


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
    ranks = reference.permutation_ranks(random_perms(k, shape[-1] * shape[-2], gen)).to(device)
    args = (acts, base, ranks, *perm_range, *prefix_range)
    assert_same_maps(torch.ops.shapcam.masked_prefixes(*args), reference.masked_prefixes(*args))


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
@FEW
@given(k=st.integers(1, 5) | st.just(300), n=st.integers(0, 9) | st.just(196), seed=st.integers(0, 2**31))
def test_permutation_ranks_inverts(device, k, n, seed):
    perms = random_perms(k, n, torch.Generator().manual_seed(seed)).to(device)
    ranks = torch.ops.shapcam.permutation_ranks(perms)
    assert torch.equal(ranks.cpu(), reference.permutation_ranks(perms.cpu()))
    assert torch.equal(ranks.gather(1, perms), torch.arange(n, device=device).expand(k, n))


@over_walk_cases
def test_scatter_marginals_matches_reference(device, dtype, acc, case):
    got = run(scatter_inputs(case, dtype, acc, device), torch.ops.shapcam.scatter_marginals_)
    expected = run(scatter_inputs(case, dtype, acc, "cpu"), reference.scatter_marginals_)
    # The kernel and the reference, each within scatter_error of the exact sums.
    bounds = [2 * b for b in scatter_bound(case, dtype, acc)]
    assert_accumulators_within(got, expected, bounds, "scatter_marginals_ against its reference")


def walk_against_reference_bounds(case: WalkCase, dtype, acc):
    """The kernel and the reference, each within walk_error of the exact sums."""
    return [2 * b for b in walk_bound(case, dtype, acc)]


@over_walk_cases
def test_linear_walk_matches_reference(device, dtype, acc, case):
    got = run(walk_inputs(case, dtype, acc, device), torch.ops.shapcam.linear_walk_)
    expected = run(walk_inputs(case, dtype, acc, "cpu"), reference.linear_walk_)
    bounds = walk_against_reference_bounds(case, dtype, acc)
    assert_accumulators_within(got, expected, bounds, "linear_walk_ against its reference")


@over_walk_cases
def test_out_of_place_ops_match_reference(device, dtype, acc, case):
    """scatter_marginals and linear_walk: the sums of their in-place variants onto zeros."""
    values, ranks, phi, *_ = scatter_inputs(case, dtype, acc, "cpu")
    zeros = torch.zeros_like(phi)
    got = torch.ops.shapcam.scatter_marginals(values.to(device), ranks.to(device), acc)
    expected = reference.scatter_marginals(values, ranks, acc)
    bound = 2 * numerics.scatter_error(values, ranks, zeros, zeros)[0]
    numerics.assert_within(got, expected, bound, "scatter_marginals against its reference")
    start, deltas, perms, classes, softmax, phi, *_ = walk_inputs(case, dtype, acc, "cpu")
    zeros = torch.zeros_like(phi)
    got = torch.ops.shapcam.linear_walk(*(t.to(device) for t in (start, deltas, perms, classes)), softmax, acc)
    expected = reference.linear_walk(start, deltas, perms, classes, softmax, acc)
    bound = 2 * numerics.walk_error(start, deltas, perms, classes, softmax, zeros, zeros)[0]
    numerics.assert_within(got, expected, bound, "linear_walk against its reference")


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
def test_out_of_place_sums_equal_in_place_sums(device):
    """With one permutation per unit, an in-place op adds to zeros exactly what its out-of-place
    variant returns: the same sums in the same order."""
    case = WalkCase(batch=2, k=128, n=49, m=100, layout="contiguous", softmax=True, seed=11)
    values, ranks, phi, phi_sq, _ = scatter_inputs(case, torch.float32, torch.float64, device)
    phi.zero_()
    torch.ops.shapcam.scatter_marginals_(values, ranks, phi, phi_sq, 1)
    assert torch.equal(torch.ops.shapcam.scatter_marginals(values, ranks, torch.float64), phi)
    start, deltas, perms, classes, softmax, phi, phi_sq, _ = walk_inputs(case, torch.float32, torch.float64, device)
    phi.zero_()
    torch.ops.shapcam.linear_walk_(start, deltas, perms, classes, softmax, phi, phi_sq, 1)
    assert torch.equal(torch.ops.shapcam.linear_walk(start, deltas, perms, classes, softmax, torch.float64), phi)


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
    grad = randn(2, 196, dtype=torch.float64, gen=torch.Generator().manual_seed(6)).to(device)

    def backward(case, dtype, acc, device):
        start, deltas, perms, classes, softmax, *_ = walk_inputs(case, dtype, acc, device)
        return torch.ops.shapcam.linear_walk_backward(grad, start, deltas, perms, classes, softmax, [True, True])

    for compute in [lambda *a: run(scatter_inputs(*a), torch.ops.shapcam.scatter_marginals_),
                    lambda *a: run(walk_inputs(*a), torch.ops.shapcam.linear_walk_),
                    lambda *a: [torch.ops.shapcam.scatter_marginals(*scatter_inputs(*a)[:2])],
                    lambda *a: [torch.ops.shapcam.linear_walk(*walk_inputs(*a)[:5])],
                    backward]:
        results = [compute(case, torch.float32, torch.float64, device) for _ in range(2)]
        torch.set_num_threads(1)
        try:
            results.append(compute(case, torch.float32, torch.float64, device))
        finally:
            torch.set_num_threads(threads)
        assert all(torch.equal(a, b) for result in results[1:] for a, b in zip(results[0], result))
    maps = MaskedCase(2, 64, 7, 7, 8, "map", "channels_last", (0, 8), (0, 50), seed=5)
    args = maps.tensors(torch.float32, device)
    assert torch.equal(torch.ops.shapcam.masked_prefixes(*args), torch.ops.shapcam.masked_prefixes(*args))


# --- gradients: gradcheck in float64, and against autograd through the reference ----------------


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@FEW
@given(case=masked_cases())
def test_masked_prefixes_gradient_matches_reference(device, dtype, case):
    """Each element of the gradient sums the cotangents of the output elements it was copied to,
    in any order: within gamma(terms) of the sum of their magnitudes."""
    acts, base, ranks, *ranges = case.tensors(dtype, device)
    acts, base = acts.detach().requires_grad_(), base.detach().requires_grad_()
    out = torch.ops.shapcam.masked_prefixes(acts, base, ranks, *ranges)
    grad = randn(*out.shape, dtype=dtype, gen=torch.Generator().manual_seed(case.seed + 1)).to(device)
    got = torch.autograd.grad(out, (acts, base), grad)

    def through_reference(cotangent):
        exact = [t.detach().cpu().double().requires_grad_() for t in (acts, base)]
        return torch.autograd.grad(reference.masked_prefixes(*exact, ranks.cpu(), *ranges), exact, cotangent.cpu().double())

    expected, magnitude = through_reference(grad), through_reference(grad.abs())
    for name, g, e, mag, t in zip(("activations", "baseline"), got, expected, magnitude, (acts, base)):
        terms = out.numel() // t.numel()
        bound = (numerics.gamma(terms, dtype) + numerics.gamma(terms, torch.float64)) * mag
        numerics.assert_within(g, e, bound, f"masked_prefixes' gradient of {name} against the reference's")


@over_walk_cases
def test_scatter_marginals_gradient_matches_reference(device, dtype, acc, case):
    values, ranks, *_ = scatter_inputs(case, dtype, acc, device)
    values = values.detach().requires_grad_()
    grad = randn(*values.shape[:-2], case.n, dtype=acc, gen=torch.Generator().manual_seed(case.seed + 1)).to(device)
    (got,) = torch.autograd.grad(torch.ops.shapcam.scatter_marginals(values, ranks, acc), values, grad)
    exact = values.detach().cpu().double().requires_grad_()
    (expected,) = torch.autograd.grad(reference.scatter_marginals(exact, ranks.cpu(), torch.float64), exact,
                                      grad.cpu().double())
    bound = (numerics.scatter_gradient_error(expected, acc, dtype)
             + numerics.scatter_gradient_error(expected, torch.float64, torch.float64))
    numerics.assert_within(got, expected, bound, "scatter_marginals' gradient against the reference's")


def walk_gradient_inputs(case: WalkCase, dtype, acc, device):
    """grad_phi (B, n) in acc, then start_logits, deltas, perms, classes, softmax."""
    start, deltas, perms, classes, softmax, *_ = walk_inputs(case, dtype, acc, device)
    grad = randn(case.batch or 1, case.n, dtype=acc, gen=torch.Generator().manual_seed(case.seed + 1)).to(device)
    return grad, start, deltas, perms, classes, softmax


def walk_gradient_bounds(case: WalkCase, dtype, acc):
    """Bounds on the backward kernel in (dtype, acc) plus the float64 reference's, on the start
    logits and the deltas."""
    grad, start, deltas, perms, classes, softmax = walk_gradient_inputs(case, dtype, acc, "cpu")
    kernel = numerics.walk_gradient(grad, start, deltas, perms, classes, softmax, acc)[2:]
    exact = numerics.walk_gradient(grad.double(), start.double(), deltas.double(), perms, classes, softmax,
                                   torch.float64)[2:]
    return [a + b for a, b in zip(kernel, exact)]


def gradient_through_reference(grad, start, deltas, perms, classes, softmax):
    """The float64 gradients of reference.linear_walk, by autograd."""
    return reference.linear_walk_backward(grad.cpu().double(), start.cpu().double(), deltas.cpu().double(),
                                          perms.cpu(), classes.cpu(), softmax, (True, True))


@over_walk_cases
def test_linear_walk_gradient_matches_reference(device, dtype, acc, case):
    """autograd through the compiled linear_walk (its registered formula, the backward kernel)
    against autograd through the reference in float64, each within numerics.walk_gradient."""
    grad, start, deltas, perms, classes, softmax = walk_gradient_inputs(case, dtype, acc, device)
    start, deltas = start.detach().requires_grad_(), deltas.detach().requires_grad_()
    phi = torch.ops.shapcam.linear_walk(start, deltas, perms, classes, softmax, acc)
    got = torch.autograd.grad(phi, (start, deltas), grad)
    expected = gradient_through_reference(grad, start, deltas, perms, classes, softmax)
    for name, g, e, bound in zip(("start_logits", "deltas"), got, expected, walk_gradient_bounds(case, dtype, acc)):
        assert g.dtype == dtype
        numerics.assert_within(g, e, bound, f"linear_walk's gradient of {name} against the reference's")


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("softmax", [True, False])
def test_linear_walk_gradient_many_classes(device, softmax):
    case = WalkCase(batch=2, k=32, n=49, m=1000, layout="contiguous", softmax=softmax, seed=8)
    grad, *inputs = walk_gradient_inputs(case, torch.float32, torch.float64, device)
    got = torch.ops.shapcam.linear_walk_backward(grad, *inputs, [True, True])
    expected = gradient_through_reference(grad, *inputs)
    for name, g, e, bound in zip(("start_logits", "deltas"), got, expected,
                                 walk_gradient_bounds(case, torch.float32, torch.float64)):
        numerics.assert_within(g, e, bound, f"linear_walk_backward (1000 classes): {name}")


def test_gradient_bounds_catch_a_wrong_backward():
    """The gradient bounds can fail: the gradient of a walk whose first permutation takes its
    first two steps in the wrong order falls outside them."""
    case = WalkCase(batch=2, k=16, n=49, m=100, layout="contiguous", softmax=True, seed=9)
    grad, *inputs = walk_gradient_inputs(case, torch.float32, torch.float32, "cpu")
    expected = gradient_through_reference(grad, *inputs)
    inputs[2] = inputs[2].clone()
    inputs[2][0, :2] = inputs[2][0, :2].flip(0)
    wrong = gradient_through_reference(grad, *inputs)
    bounds = walk_gradient_bounds(case, torch.float32, torch.float32)
    with pytest.raises(AssertionError, match="exceeds its rounding bound"):
        numerics.assert_within(wrong[1], expected[1], bounds[1], "a wrong backward")


def sample_args(device, requires_grad=False):
    gen = torch.Generator().manual_seed(1)
    acts = randn(2, 3, 2, 3, dtype=torch.float64, gen=gen).to(device).requires_grad_(requires_grad)
    base = randn(3, 1, 1, dtype=torch.float64, gen=gen).to(device).requires_grad_(requires_grad)
    perms = random_perms(4, 6, gen).to(device)
    return acts, base, perms


def walk_args(device, requires_grad=False, dtype=torch.float64):
    """start_logits (2, 5), deltas (2, 6, 5), classes: the walks of sample_args' permutations."""
    gen = torch.Generator().manual_seed(2)
    start = randn(2, 5, dtype=dtype, gen=gen).to(device).requires_grad_(requires_grad)
    deltas = randn(2, 6, 5, dtype=dtype, gen=gen).to(device).requires_grad_(requires_grad)
    return start, deltas, torch.tensor([1, 4], device=device)


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("baseline_shape", [(3, 1, 1), (2, 3, 2, 3), ()])
def test_masked_prefixes_gradcheck(device, baseline_shape):
    acts, _, perms = sample_args(device, requires_grad=True)
    base = torch.randn(baseline_shape, dtype=torch.float64, device=device, requires_grad=True)
    ranks = ops.permutation_ranks(perms)
    fn = lambda a, b: ops.masked_prefixes(a, b, ranks, perm_range=(1, 3), prefix_range=(2, 7))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (acts, base))
    assert torch.autograd.gradgradcheck(fn, (acts, base))


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
def test_scatter_marginals_gradcheck(device):
    _, _, perms = sample_args(device)
    values = randn(2, 4, 7, dtype=torch.float64, gen=torch.Generator().manual_seed(3)).to(device).requires_grad_()
    ranks = ops.permutation_ranks(perms)
    fn = lambda v: ops.scatter_marginals(v, ranks)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (values,))
    assert torch.autograd.gradgradcheck(fn, (values,))  # the backward is linear, in differentiable ops


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("softmax", [True, False])
def test_linear_walk_gradcheck(device, softmax):
    """gradcheck; gradgradcheck does not apply (the backward is a kernel without a derivative of
    its own), and a second derivative says so rather than coming back as None."""
    _, _, perms = sample_args(device)
    start, deltas, classes = walk_args(device, requires_grad=True)
    fn = lambda s, d: ops.linear_walk(s, d, perms, classes, softmax)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (start, deltas))
    grads = torch.autograd.grad(fn(start, deltas).sum(), (start, deltas), create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(grads[1].sum(), (start, deltas))


class RecordedContext:
    """What a backward registered with torch.library.register_autograd reads of its context."""

    def __init__(self, needs_input_grad, saved_tensors, **attributes):
        self.needs_input_grad, self.saved_tensors = needs_input_grad, saved_tensors
        self.__dict__.update(attributes)


@needs_compiled
def test_backward_formulas_compute_only_what_is_needed(monkeypatch):
    """Each backward returns None for an input that needs no gradient and does not compute it:
    linear_walk asks its kernel for the needed gradients only, and the kernel skips the others."""
    acts, base, perms = sample_args("cpu")
    ranks = ops.permutation_ranks(perms)
    grad = torch.ones(2 * 2 * 5, 3, 2, 3, dtype=torch.float64)
    ctx = RecordedContext((True, False) + (False,) * 5, (ranks,), ranges=(1, 3, 2, 7), shapes=(acts.shape, base.shape))
    grads = ops._masked_prefixes_backward(ctx, grad)
    assert grads[0].shape == acts.shape and grads[1] is None
    ctx.needs_input_grad = (False,) * 7
    assert ops._masked_prefixes_backward(ctx, grad) == (None,) * 7
    ctx = RecordedContext((False, False, False), (ranks,), values_dtype=torch.float64)
    assert ops._scatter_marginals_backward(ctx, torch.ones(2, 6, dtype=torch.float64)) == (None, None, None)

    start, deltas, classes = walk_args("cpu")
    masks = []
    kernel = torch.ops.shapcam.linear_walk_backward

    def recording(*args):
        masks.append(list(args[-1]))
        return kernel(*args)

    monkeypatch.setattr(torch.ops.shapcam, "linear_walk_backward", recording)
    saved = (start, deltas, perms, classes)
    for needs in [(False, True), (True, False), (False, False)]:
        ctx = RecordedContext(needs + (False,) * 4, saved, softmax=True)
        grads = ops._linear_walk_backward(ctx, torch.ones(2, 6, dtype=torch.float64))
        assert [g is not None for g in grads[:2]] == list(needs) and grads[2:] == (None,) * 4
    assert masks == [[False, True], [True, False]]  # nothing asked of the kernel when nothing is needed
    for mask in ([True, False], [False, True]):
        for backend in (kernel, reference.linear_walk_backward):
            got = backend(torch.ones(2, 6, dtype=torch.float64), start, deltas, perms, classes, True, mask)
            assert [g.shape[0] for g in got] == [2 if wanted else 0 for wanted in mask]


# --- the op registrations: opcheck, torch.compile, symbolic sizes -------------------------------


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    _, _, perms = sample_args(device)
    torch.library.opcheck(torch.ops.shapcam.permutation_ranks.default, (perms,))
    ranks = ops.permutation_ranks(perms)
    for grad in (False, True):
        acts, base, _ = sample_args(device, requires_grad=grad)
        torch.library.opcheck(torch.ops.shapcam.masked_prefixes.default, (acts, base, ranks, 1, 3, 2, 7))
        values = randn(2, 4, 7, dtype=torch.float64, gen=torch.Generator().manual_seed(2)).to(device)
        for dtype in (None, torch.float32):
            torch.library.opcheck(torch.ops.shapcam.scatter_marginals.default,
                                  (values.requires_grad_(grad), ranks, dtype))
        start, deltas, classes = walk_args(device, requires_grad=grad)
        for softmax in (True, False):
            torch.library.opcheck(torch.ops.shapcam.linear_walk.default, (start, deltas, perms, classes, softmax, None))
    values = randn(2, 4, 7, gen=torch.Generator().manual_seed(2)).to(device)
    phi, phi_sq = torch.zeros(2, 6, device=device), torch.zeros(2, 6, device=device)
    for unit_size in (1, 2):
        torch.library.opcheck(torch.ops.shapcam.scatter_marginals_.default, (values, ranks, phi, phi_sq, unit_size))
    start, deltas, classes = walk_args(device, dtype=torch.float32)
    for softmax in (True, False):
        torch.library.opcheck(
            torch.ops.shapcam.linear_walk_.default, (start, deltas, perms, classes, softmax, phi, phi_sq, 2)
        )
        for mask in ([True, True], [False, True], [True, False]):
            torch.library.opcheck(torch.ops.shapcam.linear_walk_backward.default,
                                  (torch.ones(2, 6, device=device), start, deltas, perms, classes, softmax, mask))


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    acts, base, perms = sample_args(device)
    values = torch.randn(2, 4, 7, device=device)
    start, deltas, classes = walk_args(device, dtype=torch.float32)

    def explain(acts, base, values, start, deltas, phi, phi_sq):
        ranks = ops.permutation_ranks(perms)
        maps = ops.masked_prefixes(acts, base, ranks, perm_range=(0, 2))
        ops.scatter_marginals_(values, ranks, phi, phi_sq)
        ops.linear_walk_(start, deltas, perms, classes, True, phi, phi_sq)
        return maps, ops.scatter_marginals(values, ranks), ops.linear_walk(start, deltas, perms, classes, True)

    eager = [torch.zeros(2, 6, device=device) for _ in range(2)]
    compiled = [torch.zeros(2, 6, device=device) for _ in range(2)]
    expected = explain(acts, base, values, start, deltas, *eager)
    got = torch.compile(explain, fullgraph=True)(acts, base, values, start, deltas, *compiled)
    for g, e in zip([*got, *compiled], [*expected, *eager]):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_training_step(device):
    """A loss on maps made by every differentiable op, compiled with fullgraph=True: its
    gradients are the eager ones (the backward formulas compile too)."""
    acts, base, perms = sample_args(device, requires_grad=True)
    start, deltas, classes = walk_args(device, requires_grad=True)
    ranks = ops.permutation_ranks(perms)

    def loss(acts, base, start, deltas):
        maps = ops.masked_prefixes(acts, base, ranks, perm_range=(0, 4))  # (2*4*7, 3, 2, 3)
        values = maps.mean((1, 2, 3)).view(2, 4, 7)  # a toy head: a worth per prefix
        walk = ops.linear_walk(start, deltas, perms, classes, True)
        return (ops.scatter_marginals(values, ranks) - walk).square().sum()

    inputs = (acts, base, start, deltas)
    expected = torch.autograd.grad(loss(*inputs), inputs)
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*inputs), inputs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@needs_compiled
def test_ranges_and_unit_size_are_symbolic():
    """SymInt schema arguments: a dynamic compile traces the ranges and unit_size symbolically, one
    graph for every value (with int arguments each new value recompiles)."""
    from torch._dynamo.utils import counters

    acts = torch.randn(2, 3, 3, 3)
    perms = random_perms(8, 9, torch.Generator().manual_seed(0))
    ranks = ops.permutation_ranks(perms)

    def run_ops(acts, values, k0, k1, t0, t1, unit_size):
        phi, phi_sq = values.new_zeros(2, 9), values.new_zeros(2, 9)
        ops.scatter_marginals_(values, ranks, phi, phi_sq, unit_size)
        return ops.masked_prefixes(acts, None, ranks, (k0, k1), (t0, t1)), phi_sq

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(run_ops, fullgraph=True, dynamic=True)
    values = torch.randn(2, 8, 10)
    for args in [(2, 4, 2, 5, 2), (3, 6, 3, 7, 4), (2, 7, 4, 9, 8)]:
        for g, e in zip(compiled(acts, values, *args), run_ops(acts, values, *args)):
            assert torch.equal(g, e)
    assert counters["stats"]["unique_graphs"] == 1


# --- CUDA: the same maps as the CPU, no host syncs, CUDA graphs ---------------------------------


@needs_compiled
@needs_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("acc", ACC_DTYPES)
@pytest.mark.parametrize("softmax", [True, False])
def test_cuda_maps_match_cpu(dtype, acc, softmax):
    """Both devices walk in the inputs' opmath type and accumulate in phi's dtype: each within
    numerics.walk_error (scatter_error, walk_gradient) of exact, whatever their reduction orders."""
    case = WalkCase(batch=3, k=64, n=49, m=1000, layout="strided", softmax=softmax, seed=7, unit_size=2)
    got = run(walk_inputs(case, dtype, acc, "cuda"), torch.ops.shapcam.linear_walk_)
    expected = run(walk_inputs(case, dtype, acc, "cpu"), torch.ops.shapcam.linear_walk_)
    bounds = [2 * b for b in walk_bound(case, dtype, acc)]
    assert_accumulators_within(got, expected, bounds, "linear_walk_ on CUDA against the CPU")
    got = run(scatter_inputs(case, dtype, acc, "cuda"), torch.ops.shapcam.scatter_marginals_)
    expected = run(scatter_inputs(case, dtype, acc, "cpu"), torch.ops.shapcam.scatter_marginals_)
    bounds = [2 * b for b in scatter_bound(case, dtype, acc)]
    assert_accumulators_within(got, expected, bounds, "scatter_marginals_ on CUDA against the CPU")
    got = torch.ops.shapcam.linear_walk_backward(*walk_gradient_inputs(case, dtype, acc, "cuda"), [True, True])
    expected = torch.ops.shapcam.linear_walk_backward(*walk_gradient_inputs(case, dtype, acc, "cpu"), [True, True])
    grad, *inputs = walk_gradient_inputs(case, dtype, acc, "cpu")
    bounds = numerics.walk_gradient(grad, *inputs, acc)[2:]
    for name, g, e, bound in zip(("start_logits", "deltas"), got, expected, bounds):
        numerics.assert_within(g, e, 2 * bound, f"linear_walk_backward on CUDA against the CPU: {name}")
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
    ranks = ops.permutation_ranks(perms)
    maps = ops.masked_prefixes(acts, base, ranks, perm_range=(1, 3))
    ops.scatter_marginals_(values, ranks, sums[0], sums[1], 2)
    ops.linear_walk_(start, deltas, perms, classes, True, sums[2], sums[3], 2)
    grads = ops.linear_walk_backward(sums[2], start, deltas, perms, classes, True)
    return (maps, *sums, ops.scatter_marginals(values, ranks), ops.linear_walk(start, deltas, perms, classes, True),
            *grads)


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
    ranks = reference.permutation_ranks(perms)
    zeros = torch.zeros(2, 6, dtype=torch.float64)
    walk = numerics.walk_error(start, deltas, perms, classes, True, zeros, zeros, 2)
    bounds = [*numerics.scatter_error(values, ranks, zeros, zeros, 2), *walk]
    for name, g, e, bound in zip(("phi", "phi_sq", "walk phi", "walk phi_sq"), got[1:5], expected[1:5], bounds):
        numerics.assert_within(g, e, 2 * bound, f"{name} on CUDA against the CPU")


# --- argument errors name the argument, on both backends ---------------------------------------


def valid_ranks(k: int, n: int) -> torch.Tensor:
    return reference.permutation_ranks(torch.stack([torch.randperm(n) for _ in range(k)]))


def masked_call(**change):
    """ops.masked_prefixes on valid (2, 3, 2, 2) inputs, with some arguments replaced."""
    args = dict(activations=torch.randn(2, 3, 2, 2), ranks=valid_ranks(3, 4), baseline=torch.zeros(3, 1, 1),
                perm_range=(0, 3), prefix_range=(0, 5))
    args.update(change)
    return functools.partial(ops.masked_prefixes, **args)


def ranks_call(perms):
    return functools.partial(ops.permutation_ranks, perms=perms)


def scatter_call(op=ops.scatter_marginals_, **change):
    args = dict(values=torch.randn(2, 3, 5), ranks=valid_ranks(3, 4))
    if op is ops.scatter_marginals_:
        args.update(phi=torch.zeros(2, 4), phi_sq=torch.zeros(2, 4))
    args.update(change)
    return functools.partial(op, **args)


def walk_call(op=ops.linear_walk_, **change):
    args = dict(start_logits=torch.randn(2, 5), deltas=torch.randn(2, 4, 5),
                perms=torch.stack([torch.randperm(4) for _ in range(3)]), classes=torch.tensor([0, 4]), softmax=True)
    if op is ops.linear_walk_:
        args.update(phi=torch.zeros(2, 4), phi_sq=torch.zeros(2, 4))
    if op is ops.linear_walk_backward:
        args.update(grad_phi=torch.ones(2, 4))
    args.update(change)
    return functools.partial(op, **args)


SHARED = torch.zeros(3, 4)  # accumulators that alias
BAD_CALLS = {
    "ranks: perms dtype": ("perms", ranks_call(torch.tensor([[0, 1]], dtype=torch.int32))),
    "ranks: perms 1-D": ("perms", ranks_call(torch.arange(4))),
    "ranks: perms repeats": ("perms", ranks_call(torch.tensor([[0, 1, 2, 3], [0, 0, 2, 3]]))),
    "ranks: perms out of range": ("perms", ranks_call(torch.tensor([[0, 1, 2, 4]]))),
    "ranks: perms negative": ("perms", ranks_call(torch.tensor([[-1, 1, 2, 3]]))),
    "masked: activations rank": ("activations", masked_call(activations=torch.randn(4, 4))),
    "masked: activations dtype": ("activations", masked_call(activations=torch.ones(2, 3, 2, 2, dtype=torch.int64))),
    "masked: baseline dtype": ("baseline", masked_call(baseline=torch.zeros(3, 1, 1, dtype=torch.float64))),
    "masked: baseline shape": ("baseline", masked_call(baseline=torch.zeros(4, 1, 1))),
    "masked: baseline rank": ("baseline", masked_call(baseline=torch.zeros(1, 2, 3, 2, 2))),
    "masked: ranks dtype": ("ranks", masked_call(ranks=torch.tensor([[0, 1, 2, 3]], dtype=torch.int32))),
    "masked: ranks shape": ("ranks", masked_call(ranks=torch.arange(5).view(1, 5))),
    "masked: ranks 1-D": ("ranks", masked_call(ranks=torch.arange(4))),
    "masked: ranks None": ("ranks", masked_call(ranks=None)),
    "masked: activations None": ("activations", masked_call(activations=None)),
    "masked: perm_range past K": ("perm_range", masked_call(perm_range=(0, 4))),
    "masked: perm_range empty": ("perm_range", masked_call(perm_range=(2, 2))),
    "masked: perm_range negative": ("perm_range", masked_call(perm_range=(-1, 2))),
    "masked: perm_range a triple": ("perm_range", masked_call(perm_range=(0, 1, 2))),
    "masked: prefix_range past n+1": ("prefix_range", masked_call(prefix_range=(0, 6))),
    "masked: prefix_range empty": ("prefix_range", masked_call(prefix_range=(3, 3))),
    "masked: prefix_range a number": ("prefix_range", masked_call(prefix_range=3)),
    "scatter: values rank": ("values", scatter_call(values=torch.randn(5))),
    "scatter: values dtype": ("values", scatter_call(values=torch.ones(2, 3, 5, dtype=torch.int64))),
    "scatter: ranks count": ("ranks", scatter_call(ranks=valid_ranks(2, 4))),
    "scatter: ranks dtype": ("ranks", scatter_call(ranks=torch.zeros(3, 4, dtype=torch.int32))),
    "scatter: ranks out of range": ("ranks", scatter_call(ranks=torch.tensor([[0, 1, 2, 3]] * 2 + [[0, 1, 2, 4]]))),
    "scatter: ranks negative": ("ranks", scatter_call(ranks=torch.tensor([[0, 1, 2, 3]] * 2 + [[0, -1, 2, 3]]))),
    "scatter: phi shape": ("phi", scatter_call(phi=torch.zeros(4))),
    "scatter: phi dtype": ("phi", scatter_call(phi=torch.zeros(2, 4, dtype=torch.float16))),
    "scatter: phi_sq dtype": ("phi_sq", scatter_call(phi_sq=torch.zeros(2, 4, dtype=torch.float64))),
    "scatter: phi requires grad": ("phi", scatter_call(phi=torch.zeros(2, 4, requires_grad=True))),
    "scatter: phi_sq is phi": ("phi_sq", scatter_call(phi=SHARED[:2], phi_sq=SHARED[:2])),
    "scatter: phi_sq overlaps phi": ("phi_sq", scatter_call(phi=SHARED[:2], phi_sq=SHARED[1:])),
    "scatter: unit_size": ("unit_size", scatter_call(unit_size=2)),
    "scatter out of place: dtype": ("dtype", scatter_call(ops.scatter_marginals, dtype=torch.float16)),
    "scatter out of place: ranks out of range": (
        "ranks", scatter_call(ops.scatter_marginals, ranks=torch.tensor([[0, 1, 2, 3]] * 2 + [[0, 1, 2, 4]]))),
    "walk: start_logits rank": ("start_logits", walk_call(start_logits=torch.randn(5))),
    "walk: deltas shape": ("deltas", walk_call(deltas=torch.randn(2, 4, 6))),
    "walk: deltas dtype": ("deltas", walk_call(deltas=torch.randn(2, 4, 5, dtype=torch.float64))),
    "walk: classes dtype": ("classes", walk_call(classes=torch.tensor([0, 4], dtype=torch.int32))),
    "walk: classes out of range": ("classes", walk_call(classes=torch.tensor([0, 5]))),
    "walk: perms out of range": ("perms", walk_call(perms=torch.tensor([[0, 1, 2, 3]] * 2 + [[0, 1, 2, 7]]))),
    "walk: phi shape": ("phi", walk_call(phi=torch.zeros(2, 5))),
    "walk: phi requires grad": ("phi", walk_call(phi=torch.zeros(2, 4, requires_grad=True))),
    "walk: phi_sq is phi": ("phi_sq", walk_call(phi=SHARED[1:], phi_sq=SHARED[1:])),
    "walk: unit_size": ("unit_size", walk_call(unit_size=0)),
    "walk out of place: dtype": ("dtype", walk_call(ops.linear_walk, dtype=torch.int64)),
    "walk out of place: perms negative": (
        "perms", walk_call(ops.linear_walk, perms=torch.tensor([[0, 1, 2, 3]] * 2 + [[0, 1, -2, 3]]))),
    "walk backward: grad_phi shape": ("grad_phi", walk_call(ops.linear_walk_backward, grad_phi=torch.ones(2, 5))),
    "walk backward: grad_phi dtype": (
        "grad_phi", walk_call(ops.linear_walk_backward, grad_phi=torch.ones(2, 4, dtype=torch.float16))),
    "walk backward: perms out of range": (
        "perms", walk_call(ops.linear_walk_backward, perms=torch.tensor([[0, 1, 2, 3]] * 2 + [[0, 1, 2, 4]]))),
}
# Errors that depend on the values, not the shapes: the CUDA kernels check them with device-side
# asserts (raising would need a host sync), with these messages.
DEVICE_CHECKED = {
    "ranks: perms repeats": "every row must be a permutation",
    "ranks: perms out of range": "every row must be a permutation",
    "ranks: perms negative": "every row must be a permutation",
    "scatter: ranks out of range": "ranks must lie in",
    "scatter: ranks negative": "ranks must lie in",
    "scatter out of place: ranks out of range": "ranks must lie in",
    "walk: classes out of range": "classes must lie in",
    "walk: perms out of range": "perms must lie in",
    "walk out of place: perms negative": "perms must lie in",
    "walk backward: perms out of range": "perms must lie in",
}


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
    with pytest.raises((RuntimeError, ValueError), match=rf"\b{name}\b") as error:
        call()
    assert "\n" not in str(error.value).split("\nException raised from")[0].strip()  # one line


# Each op's arguments, tensors as (name, value). (permutation_ranks(None) never reaches a kernel:
# with no tensor at all, the dispatcher refuses it, naming the op.)
RAW_OPS = {
    "masked_prefixes": lambda: [("activations", torch.randn(3, 2, 2)), ("baseline", torch.zeros(())),
                                ("ranks", valid_ranks(2, 4)), 0, 1, 0, 5],
    "scatter_marginals": lambda: [("values", torch.randn(2, 5)), ("ranks", valid_ranks(2, 4)), None],
    "scatter_marginals_": lambda: [("values", torch.randn(2, 5)), ("ranks", valid_ranks(2, 4)),
                                   ("phi", torch.zeros(4)), ("phi_sq", torch.zeros(4)), 1],
    "linear_walk": lambda: [("start_logits", torch.randn(1, 3)), ("deltas", torch.randn(1, 4, 3)),
                            ("perms", torch.arange(4).view(1, 4)), ("classes", torch.tensor([2])), True, None],
    "linear_walk_": lambda: [("start_logits", torch.randn(1, 3)), ("deltas", torch.randn(1, 4, 3)),
                             ("perms", torch.arange(4).view(1, 4)), ("classes", torch.tensor([2])), True,
                             ("phi", torch.zeros(1, 4)), ("phi_sq", torch.zeros(1, 4)), 1],
    "linear_walk_backward": lambda: [("grad_phi", torch.ones(1, 4)), ("start_logits", torch.randn(1, 3)),
                                     ("deltas", torch.randn(1, 4, 3)), ("perms", torch.arange(4).view(1, 4)),
                                     ("classes", torch.tensor([2])), True, [True, True]],
}


@needs_compiled
@pytest.mark.parametrize("op, name", [(op, arg[0]) for op, args in RAW_OPS.items() for arg in args()
                                      if isinstance(arg, tuple)])
def test_raw_ops_name_a_missing_tensor(op, name):
    """None for a tensor argument of the raw op: a one-line error naming it (it once said
    "dtype UNKNOWN_SCALAR")."""
    args = [arg[1] if isinstance(arg, tuple) else arg for arg in RAW_OPS[op]()]
    getattr(torch.ops.shapcam, op)(*args)  # valid as given
    args = [None if isinstance(arg, tuple) and arg[0] == name else value
            for arg, value in zip(RAW_OPS[op](), args)]
    with pytest.raises(RuntimeError, match=rf"^{name} is None; pass a tensor"):
        getattr(torch.ops.shapcam, op)(*args)


@pytest.mark.parametrize("backend", [pytest.param("compiled", marks=needs_compiled), "reference"])
def test_accumulators_may_require_grad_outside_grad_mode(backend, monkeypatch):
    """As PyTorch's in-place ops do, the accumulators are refused only while grad mode records
    (an optimizer's update runs under no_grad); interleaved views of one buffer are separate."""
    monkeypatch.setattr(ops, "COMPILED", backend == "compiled")
    phi = torch.zeros(2, 4, requires_grad=True)
    with torch.no_grad():
        scatter_call(phi=phi)()
        walk_call(phi=phi)()
    values, ranks = torch.randn(2, 3, 5), valid_ranks(3, 4)
    separate, both = [torch.zeros(2, 4), torch.zeros(2, 4)], torch.zeros(2, 4, 2)
    ops.scatter_marginals_(values, ranks, *separate)
    ops.scatter_marginals_(values, ranks, both[..., 0], both[..., 1])
    assert torch.equal(both[..., 0], separate[0]) and torch.equal(both[..., 1], separate[1])


@pytest.mark.parametrize("backend", [pytest.param("compiled", marks=needs_compiled), "reference"])
@pytest.mark.parametrize("shape", [(0, 3, 2, 2), (2, 0, 2, 2), (2, 3, 0, 2)], ids=["no images", "no channels",
                                                                                 "no positions"])
def test_empty_maps_give_empty_results(backend, shape, monkeypatch):
    """Both backends return the empty results for empty maps (the reference used to raise)."""
    monkeypatch.setattr(ops, "COMPILED", backend == "compiled")
    b, c, h, w = shape
    n, k, m = h * w, 3, 5
    ranks = ops.permutation_ranks(random_perms(k, n, torch.Generator().manual_seed(0)))
    assert ops.masked_prefixes(torch.randn(shape), None, ranks).shape == (b * k * (n + 1), c, h, w)
    assert ops.masked_prefixes(torch.randn(shape[1:]), torch.zeros(()), ranks).shape == (k * (n + 1), c, h, w)
    values, phi, phi_sq = torch.randn(b, k, n + 1), torch.zeros(b, n), torch.zeros(b, n)
    ops.scatter_marginals_(values, ranks, phi, phi_sq)
    assert ops.scatter_marginals(values, ranks).shape == (b, n)
    start, deltas, perms = torch.randn(b, m), torch.randn(b, n, m), ranks.argsort(1)
    classes = torch.zeros(b, dtype=torch.long)
    ops.linear_walk_(start, deltas, perms, classes, True, phi, phi_sq)
    assert ops.linear_walk(start, deltas, perms, classes, True).shape == (b, n)
    grads = ops.linear_walk_backward(torch.ones(b, n), start, deltas, perms, classes, True)
    assert [g.shape for g in grads] == [(b, m), (b, n, m)]


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
    assert DEVICE_CHECKED[case] in out.stdout + out.stderr


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
