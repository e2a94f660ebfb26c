"""The ``greedy`` allocator: a baseline for ``ilp``.

Every matrix starts at its smallest candidate; then the upgrades along each matrix's lower convex
hull of (bits, cost) are taken in order of cost saved per extra bit while they fit the budget (a
matrix's steps in order: once one does not fit, its later ones are skipped). A last pass spends
what is left on the single upgrade per step that saves the most cost. Optimal when the budget
lands exactly on a hull step; otherwise never better than ``ilp``.
"""

from __future__ import annotations

import attrs
import numpy as np

from lqframe import BudgetAllocator, hookimpl
from lqframe.allocation import budget_total, check_allocatable, choices_from_indices, efficient_configs


def _lower_hull(bits: np.ndarray, cost: np.ndarray, front: np.ndarray) -> list[int]:
    """The configurations of ``front`` (increasing bits, decreasing cost) on its lower convex hull."""
    hull: list[int] = []
    for c in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a → c: drop it
            if (cost[b] - cost[a]) * (bits[c] - bits[a]) >= (cost[c] - cost[a]) * (bits[b] - bits[a]):
                hull.pop()
            else:
                break
        hull.append(int(c))
    return hull


@attrs.frozen
class GreedyAllocator(BudgetAllocator):
    """Cost saved per extra bit, greedily, under an average-bits budget."""

    def allocate(self, table, budget_bits):
        if not table.layers:
            return {}
        check_allocatable(table, budget_bits, "greedy allocator")
        limit = budget_total(table, budget_bits)
        fronts = [efficient_configs(table, i) for i in range(len(table.layers))]
        picked = np.array([f[0] for f in fronts], dtype=np.int64)
        used = float(sum(table.bits[i, c] for i, c in enumerate(picked)))
        steps = []  # (−saving per bit, layer, step number, target config)
        for i, f in enumerate(fronts):
            hull = _lower_hull(table.bits[i], table.cost[i], f)
            for k in range(1, len(hull)):
                a, b = hull[k - 1], hull[k]
                rate = (table.cost[i, a] - table.cost[i, b]) / (table.bits[i, b] - table.bits[i, a])
                steps.append((-rate, i, k, b))
        blocked = set()
        for _, i, _, target in sorted(steps):
            if i in blocked:
                continue
            extra = table.bits[i, target] - table.bits[i, picked[i]]
            if used + extra <= limit:
                picked[i], used = target, used + extra
            else:
                blocked.add(i)
        while True:  # spend the rest: the best single upgrade that still fits
            best = None
            for i, f in enumerate(fronts):
                for c in f:
                    extra = table.bits[i, c] - table.bits[i, picked[i]]
                    saving = table.cost[i, picked[i]] - table.cost[i, c]
                    if saving > 0 and used + extra <= limit and (best is None or saving > best[0]):
                        best = (saving, i, int(c), extra)
            if best is None:
                break
            _, i, c, extra = best
            picked[i], used = c, used + extra
        return choices_from_indices(table, picked)


@hookimpl
def lqframe_register(registry):
    registry.add_allocator("greedy", GreedyAllocator)
