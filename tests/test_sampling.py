"""The permutation designs: every order is a uniformly random permutation (so the estimate stays
unbiased), a Latin block puts each player once in each stratum of positions, and a seed fixes
the sequence however it is consumed."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shapcam_ext.sampling import DESIGNS, MAX_BLOCK_ROWS, PermutationStream, seeded_generator

CHI2_999 = {23: 49.73, 119: 173.6}  # chi-square quantiles at 99.9%, by degrees of freedom


def stream(n, design="latin", antithetic=False, total=4096, seed=0):
    return PermutationStream(n, antithetic, seed, torch.device("cpu"), design, total)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), total=st.integers(1, 10**6), antithetic=st.booleans(), design=st.sampled_from(DESIGNS))
def test_rows_are_permutations_that_come_in_whole_units(n, total, antithetic, design):
    s = stream(n, design, antithetic, total)
    rows = s.take(3 * s.unit_size)
    assert torch.equal(rows.sort(1).values, torch.arange(n).expand_as(rows))
    if antithetic:
        assert torch.equal(rows[1::2], rows[0::2].flip(1))
    assert s.unit_size == s.block_rows * (2 if antithetic else 1)
    assert 1 <= s.block_rows <= min(n, MAX_BLOCK_ROWS)
    if s.unit_size > 1:
        with pytest.raises(ValueError, match="not a multiple of the unit size"):
            s.take(s.unit_size + 1)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), total=st.integers(1, 4000))
def test_a_latin_block_puts_each_player_once_in_each_stratum(n, total):
    """The strata hold g = ceil(n / m) or g - 1 players (the padding of the last group), so the
    q-th earliest of a player's m positions in a block lies in [q g - pad, q g + g - 1], where
    pad = g m - n; for m = n, each player takes each position exactly once."""
    s = stream(n, total=total)
    m = s.block_rows
    g = -(-n // m)
    pad = g * m - n
    assert 0 <= pad < g
    positions = s.take(5 * m).view(5, m, n).argsort(2).sort(1).values  # (block, q, player)
    q = torch.arange(m).view(1, m, 1)
    assert bool(((positions >= q * g - pad) & (positions <= q * g + g - 1)).all())


@pytest.mark.parametrize("n,total", [(4, 64), (5, 16)])  # a full square; strata of 3 with padding
@pytest.mark.parametrize("design", DESIGNS)
def test_each_order_of_a_block_is_uniform(design, n, total):
    """Chi-square over all n! orders, for each row of a block apart (fixed seed: deterministic)."""
    s = stream(n, design, total=total)
    m, blocks = s.block_rows, 6000
    index = {order: i for i, order in enumerate(itertools.permutations(range(n)))}
    rows = s.take(blocks * m).view(blocks, m, n)
    for r in range(m):
        counts = torch.bincount(torch.tensor([index[tuple(o)] for o in rows[:, r].tolist()]), minlength=len(index))
        expected = blocks / len(index)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < CHI2_999[len(index) - 1], (r, chi2)


@pytest.mark.parametrize("design", DESIGNS)
def test_a_seed_fixes_the_sequence_however_it_is_taken(design):
    whole = stream(49, design, True, total=10_000, seed=3).take(40 * 98)
    parts = stream(49, design, True, total=10_000, seed=3)
    unit = parts.unit_size
    pieces = [parts.take(c * unit) for c in (1, 7, 3, 40 * 98 // unit - 11)]
    assert torch.equal(torch.cat(pieces), whole)
    assert not torch.equal(stream(49, design, True, total=10_000, seed=4).take(98), whole[:98])


def test_unknown_design_is_refused():
    with pytest.raises(ValueError, match="design must be one of"):
        stream(4, "sobol")


@pytest.mark.parametrize("seed", [2**32, 2**32 + 5, 2**64 - 1])
def test_a_64_bit_seed_sets_the_cpu_twister_from_all_its_bits(seed):
    """The CPU draws are the reference Mersenne Twister's seeded by init_by_array on the seed's two
    words (numpy's legacy MT19937), not those of its low word, which torch alone would keep."""
    low, high = seed & 0xFFFFFFFF, seed >> 32
    draws = torch.rand(1000, generator=seeded_generator(seed, torch.device("cpu")))
    # torch.rand's float32 is the low 24 bits of one 32-bit draw, scaled.
    words = np.random.RandomState(np.array([low, high], dtype=np.uint32)).randint(0, 2**32, 1000, dtype=np.uint64)
    assert torch.equal(draws, torch.from_numpy((words & (2**24 - 1)) * 2.0**-24).float())
    assert not torch.equal(draws, torch.rand(1000, generator=torch.Generator().manual_seed(low)))
    assert torch.equal(stream(49, seed=seed).take(98), stream(49, seed=seed).take(98))


def test_a_seed_below_2_to_the_32_keeps_torch_seeding():
    assert torch.equal(torch.rand(100, generator=seeded_generator(5, torch.device("cpu"))),
                       torch.rand(100, generator=torch.Generator().manual_seed(5)))
