"""The ``uniform`` allocator: every matrix gets the same configuration — the one with the lowest
total cost among those whose average storage fits the budget."""

from __future__ import annotations

import attrs
import numpy as np

from lqframe import BudgetAllocator, BudgetError, hookimpl
from lqframe.allocation import budget_total


@attrs.frozen
class UniformAllocator(BudgetAllocator):
    """Same config for all matrices; the best one that fits ``budget_bits`` (bits/parameter)."""

    def allocate(self, table, budget_bits):
        if not table.layers:
            return {}
        if not table.configs:
            raise BudgetError("the cost table has no candidate configurations")
        avg_bits = table.bits.sum(axis=0) / max(table.total_params, 1)
        total_cost = table.cost.sum(axis=0)
        feasible = np.isfinite(total_cost)
        if budget_bits is not None:
            feasible &= table.bits.sum(axis=0) <= budget_total(table, budget_bits)
        if not feasible.any():
            cheapest = float(avg_bits[np.isfinite(total_cost)].min()) if np.isfinite(total_cost).any() else None
            raise BudgetError(
                f"no single configuration fits a budget of {budget_bits} bits/parameter"
                + (f"; the smallest uniform configuration needs {cheapest:.4f}" if cheapest is not None else "")
            )
        # lowest total cost; ties broken by fewer bits, then by position in the table
        order = np.lexsort((np.arange(len(table.configs)), avg_bits, np.where(feasible, total_cost, np.inf)))
        best = int(order[0])
        return {name: table.choice(i, best) for i, name in enumerate(table.layers)}


@hookimpl
def lqframe_register(registry):
    registry.add_allocator("uniform", UniformAllocator)
