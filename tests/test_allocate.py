"""The byte-budget allocator: exact against brute force, monotone in the budget, always fits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from nemoq.quant.allocate import BudgetTooSmall, Candidate, allocate, largest_size, smallest_size


def random_options(rng, n_tensors: int, n_cands: int, max_bytes: int = 200) -> dict[str, list[Candidate]]:
    options = {}
    for t in range(n_tensors):
        sizes = rng.integers(1, max_bytes, n_cands)
        # more bytes usually less KLD, but not always (dominated candidates must be handled)
        klds = rng.exponential(1.0, n_cands) / np.sqrt(sizes) * rng.uniform(0.5, 1.5, n_cands)
        options[f"t{t}"] = [Candidate(f"type{j}", int(s), float(k)) for j, (s, k) in enumerate(zip(sizes, klds))]
    return options


def brute_force(options, budget: int, fixed: int) -> float | None:
    best = None
    for combo in itertools.product(*options.values()):
        if fixed + sum(c.nbytes for c in combo) <= budget:
            kld = sum(c.kld for c in combo)
            best = kld if best is None or kld < best else best
    return best


@pytest.mark.parametrize("seed", range(40))
def test_allocate_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    options = random_options(rng, int(rng.integers(1, 5)), int(rng.integers(1, 5)))
    fixed = int(rng.integers(0, 50))
    lo, hi = smallest_size(options, fixed), largest_size(options, fixed)
    for budget in rng.integers(lo, hi + 20, 6):
        a = allocate(options, int(budget), fixed, unit=1)
        assert a.nbytes <= budget
        assert a.nbytes == fixed + sum(next(c.nbytes for c in options[n] if c.type == t) for n, t in a.types.items())
        assert a.kld == pytest.approx(brute_force(options, int(budget), fixed), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("seed", range(3))
def test_larger_budget_never_predicts_more(seed):
    rng = np.random.default_rng(100 + seed)
    options = random_options(rng, 30, 8, max_bytes=100_000)
    fixed = 1234
    lo, hi = smallest_size(options, fixed), largest_size(options, fixed)
    budgets = np.sort(rng.integers(lo, hi + 1000, 15))
    results = [allocate(options, int(b), fixed) for b in budgets]   # default (coarse) unit
    for b, a in zip(budgets, results):
        assert a.nbytes <= b
    klds = [a.kld for a in results]
    assert all(later <= earlier for earlier, later in zip(klds, klds[1:]))
    assert results[-1].kld == pytest.approx(sum(min(c.kld for c in cs) for cs in options.values()))


def test_coarse_unit_stays_within_budget_and_near_exact():
    rng = np.random.default_rng(7)
    options = random_options(rng, 6, 4, max_bytes=10_000)
    for budget in np.linspace(smallest_size(options), largest_size(options), 15).astype(int):
        coarse, exact = allocate(options, int(budget), unit=97), allocate(options, int(budget), unit=1)
        assert coarse.nbytes <= budget
        assert coarse.kld >= exact.kld - 1e-12
        # rounding each of the 6 tensors up by < 1 unit: no worse than the exact optimum 6 units lower
        if budget - 6 * 97 >= smallest_size(options):
            assert coarse.kld <= allocate(options, int(budget) - 6 * 97, unit=1).kld + 1e-12


def test_budget_below_the_smallest_file_names_it():
    options = {"a": [Candidate("q8_0", 100, 0.1), Candidate("q4_0", 60, 0.5)],
               "b": [Candidate("q8_0", 50, 0.2), Candidate("q4_0", 30, 0.4)]}
    with pytest.raises(BudgetTooSmall, match="smallest file this model can be \\(100 bytes"):
        allocate(options, 99, fixed=10)
    a = allocate(options, 100, fixed=10)
    assert a.types == {"a": "q4_0", "b": "q4_0"} and a.nbytes == 100
    # between the smallest file and the smallest file in rounded units: the smallest types
    assert allocate(options, 100, fixed=10, unit=7).types == {"a": "q4_0", "b": "q4_0"}
