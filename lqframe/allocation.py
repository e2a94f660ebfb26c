"""Shared helpers for budget allocators: which choices are possible, the smallest feasible budget,
and each matrix's efficient (Pareto) configurations.

An allocator picks one configuration per matrix of a :class:`~lqframe.CostTable`. The budget is an
average in bits per parameter over the table's matrices; the table's ``bits`` are exact storage
bits, so the budget in bits is ``budget_bits × total_params``.
"""

from __future__ import annotations

import math

import numpy as np

from lqframe.errors import BudgetError
from lqframe.types import Choice, CostTable

__all__ = ["budget_total", "check_allocatable", "efficient_configs", "choices_from_indices"]


def budget_total(table: CostTable, budget_bits: float | None) -> float:
    """The most storage bits the whole table may use (``inf`` for no budget): the largest whole
    number ``B`` with ``B / total_params ≤ budget_bits`` as floating point computes it — the very
    comparison :func:`~lqframe.types.average_bits` and the report make, so an allocation within
    ``B`` is never reported over budget by a rounding of ``budget_bits × total_params`` (table bits
    are whole numbers of stored bits)."""
    if budget_bits is None or math.isinf(budget_bits):
        return float("inf")
    params = max(table.total_params, 1)
    total = math.floor(float(budget_bits) * params)
    while total / params > budget_bits:
        total -= 1
    while (total + 1) / params <= budget_bits:
        total += 1
    return float(total)


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
        if smallest > budget_total(table, budget_bits):
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
