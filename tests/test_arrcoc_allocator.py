"""Invariants of ARR-COC's token budget allocator under property-based random inputs (hypothesis, a dev extra):
values on the levels, monotone in relevance, exactly the budget with the default levels, the closest total not
above it otherwise (checked against brute force)."""
import math

import pytest
import torch

from attnzoo.arrcoc import DEFAULT_LEVELS, SQUARE_LEVELS, TokenBudgetAllocator

hypothesis = pytest.importorskip("hypothesis")
given, settings, st = hypothesis.given, hypothesis.settings, hypothesis.strategies


def _check_allocation(alloc, rel, out, levels):
    n = len(rel)
    assert all(t in levels for t in out)
    assert sum(out) <= alloc.budget
    for i in range(n):
        for j in range(n):
            if rel[i] > rel[j]:
                assert out[i] >= out[j], (rel, out)


def _best_total_brute(levels, n, budget):
    reach = {0}
    for _ in range(n):
        reach = {s + t for s in reach for t in levels}
    return max(s for s in reach if s <= budget)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(1, 9))
def test_default_levels_give_exactly_the_budget(data, n):
    budget = 16 * data.draw(st.integers(4 * n, 25 * n))
    rel = data.draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))
    temperature = data.draw(st.sampled_from([0.01, 0.1, 1.0, 10.0]))
    alloc = TokenBudgetAllocator(budget=budget, temperature=temperature)
    out = alloc.allocate(rel)
    _check_allocation(alloc, rel, out, DEFAULT_LEVELS)
    assert sum(out) == budget


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(1, 6))
def test_square_levels_give_the_closest_total_not_above(data, n):
    budget = 16 * data.draw(st.integers(4 * n, 25 * n))
    rel = data.draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))
    alloc = TokenBudgetAllocator(budget=budget, levels=SQUARE_LEVELS)
    out = alloc.allocate(rel)
    _check_allocation(alloc, rel, out, SQUARE_LEVELS)
    assert sum(out) == _best_total_brute(SQUARE_LEVELS, n, budget)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_custom_levels_and_batches(data):
    levels = tuple(sorted(set(data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=5)))))
    n = data.draw(st.integers(1, 5))
    step = math.gcd(*levels)
    budget = step * data.draw(st.integers(-(-n * levels[0] // step), n * levels[-1] // step))
    rel = torch.tensor(data.draw(st.lists(st.lists(st.floats(0, 1), min_size=n, max_size=n), min_size=1,
                                          max_size=3)))
    alloc = TokenBudgetAllocator(budget=budget, levels=levels)
    out = alloc(rel)
    assert out.shape == rel.shape and out.dtype == torch.long
    for r, o in zip(rel.tolist(), out.tolist()):
        _check_allocation(alloc, r, o, levels)
        assert sum(o) == _best_total_brute(levels, n, budget)
