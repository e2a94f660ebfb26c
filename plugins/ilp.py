"""The ``ilp`` allocator: LQ-LoRA's mixed-configuration integer program, solved with HiGHS.

One configuration per matrix (a multiple-choice knapsack)::

    minimise   Σ_i Σ_c cost[i, c] · x[i, c]
    subject to Σ_c x[i, c] = 1                          for every matrix i
               Σ_i Σ_c bits[i, c] · x[i, c] ≤ budget_bits · Σ_i numel[i]
               x ∈ {0, 1}

Only each matrix's Pareto-efficient configurations enter the program (a dominated one is never
needed for an optimum). Costs are scaled to at most 1 and bits are measured above each matrix's
smallest candidate, so the solver works on numbers near 1; the budget is then checked in exact
bits, and the program re-solved with a tighter bound in the rare case that the solver's
feasibility tolerance let it through by a few bits. With the default ``mip_rel_gap = 0`` the
result is optimal to within ``TOLERANCE`` (1e-10) of the largest cost difference among one matrix's
candidates (it equals brute force on small tables; tests/test_allocators.py).
"""

from __future__ import annotations

import os
import sys
import warnings

import attrs
import numpy as np

from lqframe import BudgetAllocator, BudgetError, hookimpl
from lqframe.allocation import budget_total, check_allocatable, choices_from_indices, efficient_configs
from lqframe.lowrank import real

#: HiGHS's feasibility tolerances (its smallest allowed): the allocation is optimal to within this
#: fraction of the largest cost difference between candidates of one matrix
TOLERANCE = 1e-10


@attrs.frozen
class ILPAllocator(BudgetAllocator):
    """Optimal per-matrix configurations under an average-bits budget (HiGHS MIP).

    ``time_limit``: seconds for the solver (the best allocation found by then is used, with a
    warning that gives its optimality gap); ``mip_rel_gap``: the relative optimality gap at which
    the solver may stop (0: prove optimality)."""

    time_limit: float = attrs.field(default=60.0, validator=real(0.0, min_exclusive=True))
    mip_rel_gap: float = attrs.field(default=0.0, validator=real(0.0, 1.0))

    def allocate(self, table, budget_bits):
        if not table.layers:
            return {}
        check_allocatable(table, budget_bits, "ilp allocator")
        fronts = [efficient_configs(table, i) for i in range(len(table.layers))]
        # the cheapest-cost configuration of each matrix is the last of its front
        unconstrained = np.array([f[-1] for f in fronts])
        rows = np.arange(len(fronts))
        total = budget_total(table, budget_bits)
        if table.bits[rows, unconstrained].sum() <= total:
            return choices_from_indices(table, unconstrained)
        limit = total
        for _ in range(4):
            picked = self._solve(table, fronts, limit)
            used = table.bits[rows, picked].sum()
            if used <= total:
                return choices_from_indices(table, picked)
            limit -= (used - total) + 1.0  # tolerance overshoot: tighten, re-solve
        raise BudgetError(f"ilp allocator: HiGHS could not keep within {budget_bits:g} bits/parameter")

    def _solve(self, table, fronts, limit: float) -> np.ndarray:
        base = np.array([table.bits[i, f[0]] for i, f in enumerate(fronts)])
        cols = [(i, int(c)) for i, f in enumerate(fronts) for c in f]
        # cost above each matrix's cheapest candidate (the last of its front): the same optimum, on
        # numbers that do not carry every matrix's unavoidable cost
        floor = np.array([table.cost[i, f[-1]] for i, f in enumerate(fronts)])
        cost = np.array([table.cost[i, c] - floor[i] for i, c in cols])
        extra = np.array([table.bits[i, c] - base[i] for i, c in cols])
        cost_scale = cost.max() if cost.max() > 0 else 1.0
        room = limit - base.sum()
        bit_scale = max(room, 1.0)

        highspy, h = _quiet_highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("time_limit", float(self.time_limit))
        h.setOptionValue("mip_rel_gap", float(self.mip_rel_gap))
        h.setOptionValue("mip_abs_gap", 0.0)
        # HiGHS's tightest tolerances: with its defaults (1e-7) two allocations whose costs differ by
        # less than 1e-7 of the largest cost count as equally good, and the worse may be returned
        for tolerance in ("mip_feasibility_tolerance", "primal_feasibility_tolerance", "dual_feasibility_tolerance"):
            h.setOptionValue(tolerance, TOLERANCE)
        h.setOptionValue("random_seed", 0)
        h.setOptionValue("threads", 1)
        n = len(cols)
        h.addCols(n, cost / cost_scale, np.zeros(n), np.ones(n), 0, np.array([], dtype=np.int32),
                  np.array([], dtype=np.int32), np.array([], dtype=np.float64))
        h.changeColsIntegrality(n, np.arange(n, dtype=np.int32),
                                np.full(n, highspy.HighsVarType.kInteger.value, dtype=np.uint8))
        # one configuration per matrix
        starts, at = [], 0
        for f in fronts:
            starts.append(at)
            at += len(f)
        h.addRows(len(fronts), np.ones(len(fronts)), np.ones(len(fronts)), n,
                  np.asarray(starts, dtype=np.int32), np.arange(n, dtype=np.int32), np.ones(n))
        # the budget, in bits above every matrix's smallest candidate
        h.addRows(1, np.array([-np.inf]), np.array([room / bit_scale]), n, np.array([0], dtype=np.int32),
                  np.arange(n, dtype=np.int32), extra / bit_scale)
        h.run()
        status = h.getModelStatus()
        x = np.asarray(h.getSolution().col_value)
        if status != highspy.HighsModelStatus.kOptimal:
            if status == highspy.HighsModelStatus.kTimeLimit and x.size == n and h.getInfo().mip_gap < np.inf:
                warnings.warn(f"ilp allocator: HiGHS stopped at the time limit ({self.time_limit:g} s) with "
                              f"optimality gap {h.getInfo().mip_gap:.2%}; using the best allocation found",
                              stacklevel=3)
            else:
                raise BudgetError(f"ilp allocator: HiGHS ended with status {h.modelStatusToString(status)}")
        picked = np.empty(len(fronts), dtype=np.int64)
        for i, f in enumerate(fronts):
            block = x[starts[i]:starts[i] + len(f)]
            picked[i] = f[int(np.argmax(block))]
        return picked


def _quiet_highs():
    """``(highspy, Highs())`` without the banner HiGHS prints on standard output (at the C level,
    once per process), which would corrupt a command's JSON output."""
    import highspy

    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no real standard output: nothing to protect
        return highspy, highspy.Highs()
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        return highspy, highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


@hookimpl
def lqframe_register(registry):
    registry.add_allocator("ilp", ILPAllocator)
