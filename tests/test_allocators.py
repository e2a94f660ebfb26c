"""The ``ilp`` and ``greedy`` allocators: optimality against brute force, the budget, the errors."""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lqframe import BudgetError, CostTable, average_bits, registry
from lqframe.allocation import efficient_configs
from lqframe.testing import cost_tables

ILP = registry().create("allocator", "ilp")
ILP_TOLERANCE = sys.modules[type(ILP).__module__].TOLERANCE
GREEDY = registry().create("allocator", "greedy")
UNIFORM = registry().create("allocator", "uniform")


def _brute_force(table: CostTable, budget: float | None) -> float | None:
    """The smallest total cost over every allocation within the budget (None: none fits)."""
    best = None
    for pick in itertools.product(range(len(table.configs)), repeat=len(table.layers)):
        rows = np.arange(len(table.layers))
        cost = float(table.cost[rows, pick].sum())
        fits = budget is None or table.bits[rows, pick].sum() / table.total_params <= budget  # as average_bits
        if math.isfinite(cost) and fits and (best is None or cost < best):
            best = cost
    return best


def _total(choices) -> float:
    return sum(c.cost for c in choices.values())


def _allocate(allocator, table, budget):
    try:
        return allocator.allocate(table, budget)
    except BudgetError:
        return None


@settings(max_examples=150, deadline=None)
@given(table=cost_tables(max_layers=5, max_configs=4), where=st.floats(-0.1, 1.1))
def test_ilp_equals_brute_force_and_keeps_the_budget(table, where):
    finite = np.where(np.isfinite(table.cost), table.bits, np.nan)
    if np.isnan(finite).all(axis=1).any():
        lo = hi = 1.0
    else:
        lo = float(np.nanmin(finite, axis=1).sum()) / table.total_params
        hi = float(np.nanmax(finite, axis=1).sum()) / table.total_params
    budget = lo + where * (hi - lo)
    best = _brute_force(table, budget)
    choices = _allocate(ILP, table, budget)
    if best is None:
        assert choices is None, "the ILP found an allocation where brute force found none"
        return
    assert choices is not None, f"the ILP refused a feasible budget {budget}"
    assert average_bits(choices, table) <= budget  # exactly, in stored bits
    # optimal to HiGHS's tolerance, a fraction of the largest cost difference per matrix
    finite = np.where(np.isfinite(table.cost), table.cost, np.nan)
    slack = len(table.layers) * ILP_TOLERANCE * float(np.nanmax(finite) - np.nanmin(finite)) + 1e-12 * best
    assert _total(choices) <= best + slack, f"ILP {_total(choices)!r}, optimum {best!r}"
    assert _total(choices) >= best - slack
    # the baselines are feasible allocations too: never better than the optimum
    for baseline in (GREEDY, UNIFORM):
        other = _allocate(baseline, table, budget)
        if other is not None:
            assert average_bits(other, table) <= budget
            assert _total(other) >= _total(choices) * (1 - 1e-9) - 1e-9


def _random_table(n_layers=210, n_configs=24, seed=0) -> CostTable:
    """A table shaped like the default model's: bits from 2 to 8 per parameter, costs falling
    with bits (a convex-ish curve per matrix with noise)."""
    rng = np.random.default_rng(seed)
    numel = rng.choice([576 * 576, 576 * 192, 576 * 1536], size=n_layers)
    bpp = np.sort(rng.uniform(2.0, 8.0, size=n_configs))
    bits = np.ceil(numel[:, None] * bpp[None, :]) + rng.integers(0, 512, size=(n_layers, n_configs))
    sens = rng.lognormal(0.0, 1.0, size=n_layers)
    cost = sens[:, None] * 2.0 ** (-2 * bpp[None, :]) * rng.uniform(0.7, 1.3, size=(n_layers, n_configs))
    configs = tuple({"config": c} for c in range(n_configs))
    return CostTable(layers=tuple(f"model.layers.{i}" for i in range(n_layers)), configs=configs,
                     cost=cost, bits=bits, numel=numel)


@pytest.mark.parametrize("budget", [2.5, 2.75, 3.0, 3.5, 4.0])
def test_ilp_on_a_model_sized_table(budget):
    """210 matrices × 24 configurations: the budget holds exactly, and the ILP is at least as
    good as the greedy and the uniform allocations (strictly better than uniform here)."""
    table = _random_table()
    choices = ILP.allocate(table, budget)
    assert average_bits(choices, table) <= budget
    greedy = GREEDY.allocate(table, budget)
    assert average_bits(greedy, table) <= budget
    assert _total(choices) <= _total(greedy) * (1 + 1e-9)
    uniform = UNIFORM.allocate(table, budget)
    assert _total(choices) < _total(uniform)
    # the solve is optimal: moving one matrix to any other configuration within the budget
    # cannot lower the cost
    rows = np.arange(len(table.layers))
    picked = np.array([choices[n].index for n in table.layers])
    room = budget * table.total_params - table.bits[rows, picked].sum()
    gain = table.cost[rows, picked][:, None] - table.cost
    fits = (table.bits - table.bits[rows, picked][:, None]) <= room
    assert not (gain[fits] > 1e-12 * _total(choices)).any()


def test_an_infeasible_budget_states_the_smallest_feasible_one():
    table = CostTable(layers=("a", "b"), configs=({"bits": 2}, {"bits": 4}),
                      cost=[[2.0, 1.0], [math.inf, 0.5]], bits=[[200, 400], [200, 400]], numel=[100, 100])
    # a cannot go below 2 bits, b needs 4 (its 2-bit configuration is impossible): 3 bits at least
    for allocator in (ILP, GREEDY):
        with pytest.raises(BudgetError, match=r"smallest feasible budget is 3\.000000 bits/parameter"):
            allocator.allocate(table, 2.9)
        choices = allocator.allocate(table, 3.0)
        assert {n: c.index for n, c in choices.items()} == {"a": 0, "b": 1}
        assert {n: c.index for n, c in allocator.allocate(table, None).items()} == {"a": 1, "b": 1}
    stuck = CostTable(layers=("a", "b"), configs=({"bits": 2},), cost=[[1.0], [math.inf]], bits=[[2], [2]],
                      numel=[1, 1])
    with pytest.raises(BudgetError, match="no candidate configuration is possible for b"):
        ILP.allocate(stuck, None)


def test_efficient_configs_drop_dominated_ones():
    table = CostTable(layers=("a",), configs=tuple({"c": i} for i in range(5)),
                      cost=[[5.0, 3.0, 4.0, 3.0, math.inf]], bits=[[10, 20, 30, 40, 50]], numel=[10])
    assert efficient_configs(table, 0).tolist() == [0, 1]


def test_greedy_is_suboptimal_where_the_ilp_is_not():
    """A budget between hull steps: greedy takes the best rate first and cannot use the rest."""
    table = CostTable(layers=("a", "b"), configs=({"c": 0}, {"c": 1}),
                      cost=[[10.0, 0.0], [10.0, 4.0]], bits=[[10, 30], [10, 12]], numel=[10, 10])
    # rates: b saves 6 per 2 bits (3/bit), a saves 10 per 20 bits (0.5/bit); budget 2 bits × 20:
    # greedy upgrades b (12 + 10 = 22 bits), then a no longer fits (42 > 40); the ILP upgrades a
    ilp = ILP.allocate(table, 2.0)
    greedy = GREEDY.allocate(table, 2.0)
    assert _total(ilp) == 10.0 and _total(greedy) == 14.0
