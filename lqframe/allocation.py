"""Shared helpers for budget allocators: which choices are possible, the smallest feasible budget,
and each matrix's efficient (Pareto) configurations.

An allocator picks one configuration per matrix of a :class:`~lqframe.CostTable`. The budget is an
average in bits per parameter over the table's matrices; the table's ``bits`` are exact storage
bits, so the budget in bits is ``budget_bits × total_params``.
"""

from __future__ import annotations

import numpy as np

from lqframe.errors import BudgetError
from lqframe.types import Choice, CostTable

__all__ = ["budget_total", "check_allocatable", "efficient_configs", "choices_from_indices"]


def budget_total(table: CostTable, budget_bits: float | None) -> float:
    """The budget in bits for the whole table (``inf`` for no budget)."""
    if budget_bits is None:
        return float("inf")
    return float(budget_bits) * table.total_params


def check_allocatable(table: CostTable, budget_bits: float | None, who: str) -> None:
    """Raise :class:`~lqframe.BudgetError` when no allocation of ``table`` fits ``budget_bits``:
    no configurations, a matrix whose every configuration is impossible (cost ``inf``), or a
    budget below the smallest feasible one (every matrix at its smallest possible configuration),
    which the message states."""
    if table.layers and not table.configs:
        raise BudgetError(f"{who}: the cost table has no candidate configurations")
    possible = np.isfinite(table.cost)
    stuck = [table.layers[i] for i in np.flatnonzero(~possible.any(axis=1))]
    if stuck:
        raise BudgetError(f"{who}: no candidate configuration is possible for {', '.join(stuck[:3])}"
                          + (f" and {len(stuck) - 3} more" if len(stuck) > 3 else ""))
    if budget_bits is not None and table.layers:
        smallest = float(np.where(possible, table.bits, np.inf).min(axis=1).sum())
        if smallest > budget_total(table, budget_bits) * (1 + 1e-12):
            raise BudgetError(f"{who}: a budget of {budget_bits:g} bits/parameter is infeasible; the smallest "
                              f"feasible budget is {smallest / table.total_params:.6f} bits/parameter "
                              "(every matrix at its smallest candidate)")


def efficient_configs(table: CostTable, layer: int) -> np.ndarray:
    """The Pareto-efficient configurations of one matrix, by increasing bits (and decreasing
    cost): a possible configuration is kept unless another has no more bits and no more cost
    (with one of them strictly less; exact ties keep the earlier configuration)."""
    bits, cost = table.bits[layer], table.cost[layer]
    order = np.lexsort((np.arange(len(bits)), cost, bits))  # bits, then cost, then position
    kept = []
    best = np.inf
    for c in order:
        if np.isfinite(cost[c]) and cost[c] < best:
            kept.append(int(c))
            best = cost[c]
    return np.asarray(kept, dtype=np.int64)


def choices_from_indices(table: CostTable, indices) -> dict[str, Choice]:
    """``{layer: Choice}`` from one configuration index per matrix."""
    return {name: table.choice(i, int(indices[i])) for i, name in enumerate(table.layers)}
