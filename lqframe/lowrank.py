"""Shared base for reconstructors whose low-rank term comes from :func:`lqframe.numerics.lowrank_solve`.

A reconstructor that fits ``L·R`` to the quantization error with some scaling (plain SVD, QERA,
LQER, LoftQ, …) subclasses :class:`LowRankReconstructor`. It inherits the low-rank options

``rank``
    the rank r of ``L·R`` (0: no low-rank term; ranks beyond ``min(n, m)`` are clipped);
``method``
    ``exact`` (full SVD) or ``randomized`` (range finder with ``oversample`` extra columns and
    ``niter`` power iterations, seeded by ``seed``);
``factor_dtype``
    the format ``L`` and ``R`` are stored in (``float32``, ``float16``, ``bfloat16``, or ``int8`` with
    a power-of-two scale per 64 values; :mod:`lqframe.factors`),
``iterations``
    1: quantize ``W`` once, then fit ``L·R`` to ``W − Q``. More: alternate (LoftQ's scheme, in the
    method's own weighting)::

        Q_1 = q(W)
        for t = 1 … iterations:
            L_t R_t = argmin ‖S (W − Q_t − LR) T‖_F       iterate t: (Q_t, L_t R_t)
            Q_{t+1} = q(W − L_t R_t)

    and return the iterate with the smallest weighted error ``‖S (W − Q − LR) T‖_F`` (not the
    last; the loop stops early when ``Q`` repeats). With a data-aware quantizer (``gptq``) and a
    data-aware weighting (``qera-exact``: ``T = E[xxᵀ]^{1/2}``) both steps lower the same
    layer-output error, so the alternation is coordinate descent on it,

the exact storage accounting :meth:`~LowRankReconstructor.lowrank_bits`, and
:meth:`~LowRankReconstructor._finish`, which turns a packed ``Q`` and the method's scalings into
the :class:`~lqframe.Decomposition`. A subclass only supplies its scalings (``column_scaling``,
and ``row_scaling`` for output-side weights such as Fisher information)::

    @attrs.frozen
    class MyReconstructor(LowRankReconstructor):
        label: ClassVar[str] = "my"
        needs: ClassVar[frozenset[str]] = frozenset({"sq_sum"})

        def column_scaling(self, stats):
            return DiagonalScaling(stats.rms())

With ``iterations > 1`` the decomposition's ``info`` has ``iterations_run``, ``best_iteration``
(1-based), ``initial_error`` (iteration 1, i.e. one-shot), ``final_error`` (of the returned
decomposition, weighted as above), ``errors`` (per iteration; a list, so reports leave it out) and
``refit``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import torch
from attrs import validators as v

from lqframe.factors import FACTOR_FORMATS, factor_bits, round_factor
from lqframe.interfaces import ErrorReconstructor
from lqframe.numerics import (
    PRECISIONS,
    LowRankSolution,
    Scaling,
    check_weight,
    cholesky_factor,
    lowrank_solve,
    precision_dtype,
    symmetric_sqrt,
)
from lqframe.quantization import integer
from lqframe.types import Decomposition, LayerStats, LowRank, QuantizedWeight

__all__ = ["LowRankReconstructor", "real", "output_error", "output_root"]


def real(
    min_value: float | None = None,
    max_value: float | None = None,
    *,
    min_exclusive: bool = False,
    max_exclusive: bool = False,
):
    """attrs validator: a finite real number (``int`` or ``float``, not ``bool``) between
    ``min_value`` and ``max_value`` (bounds included unless ``min_exclusive``/``max_exclusive``)."""

    def check(instance, attribute, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise TypeError(f"{attribute.name} must be a finite number, got {value!r}")
        if min_value is not None and (value <= min_value if min_exclusive else value < min_value):
            raise ValueError(f"{attribute.name} must be {'>' if min_exclusive else '>='} {min_value}, got {value}")
        if max_value is not None and (value >= max_value if max_exclusive else value > max_value):
            raise ValueError(f"{attribute.name} must be {'<' if max_exclusive else '<='} {max_value}, got {value}")

    return check


def output_error(diff: torch.Tensor, stats: LayerStats) -> float:
    """Expected squared output error per token ``E‖x Dᵀ‖² = tr(D E[xxᵀ] Dᵀ)`` of a weight error
    ``D`` (n×m), from the ``rxx`` statistic (float64)."""
    stats.require({"rxx"}, "output_error()")
    d = diff.to(torch.float64)
    return float(((d @ stats.rxx) * d).sum()) / max(stats.n_tokens, 1)


def output_root(stats: LayerStats, eig_floor: float = 1e-6, root: str = "eigh", damp: float = 0.0) -> Scaling:
    """The input-side scaling that makes the weight metric the layer-output metric,
    ``‖D T‖_F² = N · E‖x Dᵀ‖²``: the symmetric root of ``E[xxᵀ]`` (``root="eigh"``, eigenvalues
    below ``eig_floor · λ_max`` raised to it) or its Cholesky factor (``"cholesky"``, ridge
    ``eig_floor · max diag``), of the moment shrunk by ``damp · mean(diag) · I``. Computed once
    per statistics object (the linears reading one input share it)."""
    def moment():
        m = stats.second_moment()
        if damp:
            m = m + (damp * float(torch.diagonal(m).mean())) * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
        return m

    if root == "cholesky":
        return stats.cached(("output-root", "cholesky", eig_floor, damp),
                            lambda: cholesky_factor(moment(), rel_floor=eig_floor))
    return stats.cached(("output-root", "eigh", eig_floor, damp), lambda: symmetric_sqrt(moment(), rel_floor=eig_floor))


@attrs.frozen
class LowRankReconstructor(ErrorReconstructor):
    """Base class: the low-rank options and the "solve → factors → Decomposition" step.

    Subclasses implement ``decompose`` and set ``label`` (used in error messages) and ``needs``.
    """

    label: ClassVar[str] = "low-rank"

    rank: int = attrs.field(default=32, validator=integer(0))
    method: str = attrs.field(default="exact", validator=v.in_(("exact", "randomized")))
    factor_dtype: str = attrs.field(default="float16", validator=v.in_(FACTOR_FORMATS))
    oversample: int = attrs.field(default=10, validator=integer(0))
    niter: int = attrs.field(default=2, validator=integer(0))
    seed: int = attrs.field(default=0, validator=integer())
    iterations: int = attrs.field(default=1, validator=integer(1))
    #: arithmetic of the solve and of the residuals the alternation hands the quantizer (float64: the
    #: factors and codes do not depend on which BLAS kernels computed them; docs/design.md)
    precision: str = attrs.field(default="float64", validator=v.in_(PRECISIONS))

    @classmethod
    def test_configs(cls):
        return [{"rank": 4, "factor_dtype": "float32"}, {"rank": 2, "method": "randomized"},
                {"rank": 3, "iterations": 3}]

    # ----------------------------------------------------------------- helpers for subclasses
    @property
    def _who(self) -> str:
        return f"{self.label} reconstructor"

    def _rank(self, shape) -> int:
        """The rank actually used for a matrix of this shape (``rank`` clipped to ``min(n, m)``)."""
        return min(self.rank, *shape)

    def _prepare(self, weight: torch.Tensor, stats: LayerStats | None) -> tuple[torch.Tensor, LayerStats]:
        """Validate the weight (→ contiguous float32) and check that ``needs`` were captured.

        Raises :class:`~lqframe.WeightError` for a bad weight and
        :class:`~lqframe.MissingStatisticError` for missing statistics; returns the weight and the
        statistics (an empty :class:`~lqframe.LayerStats` when ``stats`` is None)."""
        w = check_weight(weight, self._who)
        stats = stats if stats is not None else LayerStats()
        stats.require(self.needs, self._who)
        return w, stats

    def _solve(
        self, residual: torch.Tensor, row_scaling: Scaling | None = None, col_scaling: Scaling | None = None
    ) -> tuple[LowRank, LowRankSolution]:
        """Fit ``residual`` (n×m) at ``_rank`` (> 0); the factors come back rounded to ``factor_dtype``."""
        sol = lowrank_solve(
            residual,
            self._rank(residual.shape),
            row_scaling=row_scaling,
            col_scaling=col_scaling,
            method=self.method,
            dtype=self._dtype,
            oversample=self.oversample,
            niter=self.niter,
            seed=self.seed,
        )
        fmt = self.factor_dtype
        return LowRank(round_factor(sol.left, fmt, "left"), round_factor(sol.right, fmt, "right"), fmt), sol

    @property
    def _dtype(self) -> torch.dtype:
        return precision_dtype(self.precision)

    def column_scaling(self, stats: LayerStats | None) -> Scaling | None:
        """The input-side scaling T of the solve (None: identity). Override in subclasses."""
        return None

    def row_scaling(self, stats: LayerStats | None) -> Scaling | None:
        """The output-side scaling S of the solve (None: identity). Override in subclasses."""
        return None

    def weighted_error(self, diff: torch.Tensor, stats: LayerStats | None = None) -> float:
        """``‖S · diff · T‖_F`` with this reconstructor's scalings (the norm its solve minimises)."""
        stats = stats if stats is not None else LayerStats()
        return self._weighted_error(diff, self.row_scaling(stats), self.column_scaling(stats))

    def decompose(self, weight, quantizer, stats=None) -> Decomposition:
        """Fit ``L·R`` to ``W − Q`` under the method's scalings: once, or alternating with the
        quantizer for ``iterations > 1`` (see the module doc)."""
        w, stats = self._prepare(weight, stats)
        if self._rank(w.shape) == 0:  # no low-rank term: Q = q(W) is already the fixed point
            return self._finish(w, quantizer.quantize(w, stats), stats=stats)
        rows, cols = self.row_scaling(stats), self.column_scaling(stats)
        if self.iterations == 1 and not self.lowrank_first:
            return self._finish(w, quantizer.quantize(w, stats), rows, cols, stats=stats)
        return self._alternate(w, quantizer, stats, rows, cols)

    #: start the alternation from the low-rank side (LQ-LoRA's order: ``Q_0 = 0``, so iterate 1
    #: quantizes ``W − svd_r(W)``) instead of quantizing ``W`` first (LoftQ's order). The one-shot
    #: iterate of LoftQ's order (``Q = q(W)``, then the fit) is scored too, as iteration 0, so the
    #: result is never worse than the method with ``iterations: 1``.
    lowrank_first: ClassVar[bool] = False

    def alternation_error(self, diff: torch.Tensor, rows: Scaling | None, cols: Scaling | None,
                          stats: LayerStats) -> float:
        """The error the alternation ranks its iterates by (default ``‖S · diff · T‖_F``, the
        method's own weighting). Override to rank by another metric (e.g. elementwise Fisher)."""
        return self._weighted_error(diff, rows, cols)

    def stop_early(self, errors: list[float]) -> bool:
        """Called after each iterate with the errors so far: True ends the alternation (default:
        run all ``iterations``, stopping only at a fixed point of Q)."""
        return False

    @staticmethod
    def _weighted_error(diff: torch.Tensor, rows: Scaling | None, cols: Scaling | None) -> float:
        """``‖S · diff · T‖_F`` (float64)."""
        d = diff.to(torch.float64)
        if rows is not None:
            d = rows.left(d)
        if cols is not None:
            d = cols.right(d)
        return float(torch.linalg.vector_norm(d))

    def _alternate(self, w, quantizer, stats, rows, cols) -> Decomposition:
        def error(q_dense, lr_dense):
            return self.alternation_error(w - (q_dense + lr_dense), rows, cols, stats)

        best = None
        extra: dict[str, Any] = {}
        if self.lowrank_first:  # iteration 0: LoftQ's order, one shot
            q_dense = quantizer.roundtrip(w, stats)
            lowrank, _ = self._solve(w - q_dense, rows, cols)
            extra["one_shot_error"] = error(q_dense, lowrank.to_dense(self._dtype))
            best = (0, extra["one_shot_error"], w, q_dense, lowrank)
            first, _ = self._solve(w, rows, cols)
            source = (w - first.to_dense(self._dtype)).to(torch.float32)
        else:
            source = w  # what the current Q was quantized from
        q_dense = quantizer.roundtrip(source, stats)
        errors: list[float] = []
        for t in range(1, self.iterations + 1):
            lowrank, _ = self._solve(w - q_dense, rows, cols)
            lr_dense = lowrank.to_dense(self._dtype)
            errors.append(error(q_dense, lr_dense))
            if best is None or errors[-1] < best[1]:
                best = (t, errors[-1], source, q_dense, lowrank)
            if t == self.iterations or self.stop_early(errors):
                break
            source = (w - lr_dense).to(torch.float32)  # W − L·R rounded once, whatever computed L·R
            q_next = quantizer.roundtrip(source, stats)
            if torch.equal(q_next, q_dense):
                break
            q_dense = q_next

        best_t, best_err, best_source, best_q, lowrank = best
        qweight = quantizer.quantize(best_source, stats)
        q_packed = qweight.dequantize(torch.float32)
        info = {"iterations_run": len(errors), "best_iteration": best_t, "initial_error": errors[0],
                "errors": errors, **extra}
        # L·R fitted to the packed Q; identical to the loop's when the packed Q is the loop's Q
        refit = self._finish(w, qweight, rows, cols, stats=stats, info=info)
        if torch.equal(q_packed, best_q):
            return attrs.evolve(refit, info={**refit.info, "final_error": best_err, "refit": False})
        kept_err = error(q_packed, lowrank.to_dense(self._dtype))
        refit_err = error(q_packed, refit.lowrank.to_dense(self._dtype))
        if refit_err <= kept_err:
            return attrs.evolve(refit, info={**refit.info, "final_error": refit_err, "refit": True})
        kept_info = {**refit.info, "final_error": kept_err, "refit": False}
        if stats.rxx is not None:
            kept_info["output_error"] = output_error(w - q_packed - lowrank.to_dense(self._dtype), stats)
        kept_info.pop("tail_energy", None)
        return Decomposition(qweight, lowrank, kept_info)

    def _finish(
        self,
        weight: torch.Tensor,
        qweight: QuantizedWeight,
        row_scaling: Scaling | None = None,
        col_scaling: Scaling | None = None,
        stats: LayerStats | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> Decomposition:
        """``W ≈ Q + L·R`` with ``L·R`` minimising ``‖S (W − Q − LR) T‖_F`` (S = ``row_scaling``,
        T = ``col_scaling``, identity when None) for the packed ``qweight``.

        ``weight`` is the float32 matrix from :meth:`_prepare`. ``info`` gets ``rank``, and with the
        exact method ``tail_energy`` (the scaled error ``Σ_{i>r} σ_i(SΔT)²`` of the optimum). When
        ``stats`` carries ``rxx``, also the expected squared output errors per token of the result
        (``output_error``) and of ``Q`` alone (``output_error_none``), computed from the stored
        factors. Entries of ``info`` passed in are kept (and may be overridden by these).
        """
        rank = self._rank(weight.shape)
        out: dict[str, Any] = dict(info or {})
        out["rank"] = rank
        with_output = stats is not None and stats.rxx is not None
        if rank == 0 and not with_output:
            return Decomposition(qweight, None, out)
        residual = weight - qweight.dequantize(torch.float32)
        lowrank = None
        if rank > 0:
            lowrank, sol = self._solve(residual, row_scaling, col_scaling)
            if self.method == "exact":
                out["tail_energy"] = sol.tail_energy(rank)
        if with_output:
            out["output_error_none"] = output_error(residual, stats)
            remaining = residual if lowrank is None else residual - lowrank.to_dense(self._dtype)
            out["output_error"] = output_error(remaining, stats)
        return Decomposition(qweight, lowrank, out)

    def lowrank_bits(self, shape) -> int:
        n, m = shape
        r = self._rank(shape)
        return factor_bits((n, r), self.factor_dtype, "left") + factor_bits((r, m), self.factor_dtype, "right")
