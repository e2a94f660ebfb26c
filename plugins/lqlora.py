"""The ``lqlora`` reconstructor (LQ-LoRA, METHODS.md §1.2–1.3): alternate "low-rank fit of the
residual" and "quantize the residual", starting from the low-rank side (``Q_0 = 0``)::

    L_0 R_0 = argmin ‖S (W − LR) T‖            (the fit of W itself)
    for t = 1 … iterations:
        Q_t     = q(W − L_{t−1} R_{t−1})
        L_t R_t = argmin ‖S (W − Q_t − LR) T‖   iterate t: (Q_t, L_t R_t)

It is the shared alternation of :class:`~lqframe.lowrank.LowRankReconstructor` with LQ-LoRA's
start; any registered quantizer sits inside the loop (``gptq`` included, which then sees the
calibration statistics at every step). The loop stops after ``iterations``, at a fixed point of
``Q``, or when an iterate improves the error by less than ``tolerance`` (relative; an increase
stops it too, as in the reference), and returns the *best* iterate, not the last one (the
reference returns the one that made the error worse). LoftQ's one-shot iterate (``Q = q(W)``, then
the fit) is scored as iteration 0, so the result is never worse than the ``svd`` reconstructor
in the chosen metric.

``weighting`` chooses the metric both the fit and the ranking use:

``none``
    the weight error ``‖W − Q − LR‖_F`` (data-free LQ-LoRA);
``fisher``
    the Fisher-weighted error ``‖√F ⊙ (W − Q − LR)‖_F`` with ``F`` the empirical diagonal Fisher
    (the ``fisher`` statistic, a gradient pass). A weighted low-rank fit has no closed form; like
    the reference, the fit uses row and column weights ``S = diag(√mean_j F_ij)``,
    ``T = diag(√mean_i F_ij)`` (exact when ``F`` is of rank one), while iterates are ranked by the
    elementwise metric. Rows and columns with no Fisher mass are held at ``fisher_floor`` × the
    largest weight (the reference divides by zero there);
``output``
    the layer-output error ``E‖x (W − Q − LR)ᵀ‖²`` (QERA's metric: ``T = E[xxᵀ]^{1/2}``), which makes
    the alternation coordinate descent on the output error when the quantizer is ``gptq``.

``info`` as for every alternating reconstructor (``iterations_run``, ``best_iteration`` — 0 for
the one-shot iterate —, ``initial_error``, ``final_error``, ``errors``), plus ``one_shot_error``.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from lqframe import hookimpl
from lqframe.lowrank import LowRankReconstructor, output_root, real
from lqframe.numerics import DiagonalScaling
from lqframe.quantization import integer

_NEEDS = {"none": frozenset(), "fisher": frozenset({"fisher"}), "output": frozenset({"rxx"})}


@attrs.frozen
class LQLoRAReconstructor(LowRankReconstructor):
    """LQ-LoRA's alternation (low-rank first), best iterate, in the weight, Fisher or output metric."""

    label: ClassVar[str] = "lqlora"
    lowrank_first: ClassVar[bool] = True

    iterations: int = attrs.field(default=10, validator=integer(1))
    tolerance: float = attrs.field(default=1e-3, validator=real(0.0, 1.0))
    weighting: str = attrs.field(default="none", validator=attrs.validators.in_(tuple(_NEEDS)))
    fisher_floor: float = attrs.field(default=1e-6, validator=real(0.0, 1.0, max_exclusive=True))
    eig_floor: float = attrs.field(default=1e-6, validator=real(0.0, 1.0, max_exclusive=True))

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return _NEEDS[self.weighting]

    @classmethod
    def test_configs(cls):
        return [{"rank": 3, "iterations": 3, "factor_dtype": "float32"},
                {"rank": 2, "iterations": 2, "weighting": "fisher"},
                {"rank": 2, "iterations": 2, "weighting": "output", "tolerance": 0.0}]

    @staticmethod
    def _fisher(stats) -> torch.Tensor:
        """The layer's Fisher as float64, negative rounding noise clipped (once per statistics)."""
        return stats.cached(("lqlora-fisher",), lambda: stats.get("fisher").to(torch.float64).clamp_min(0))

    def _fisher_weights(self, stats) -> tuple[DiagonalScaling, DiagonalScaling]:
        def weights():
            f = self._fisher(stats)
            return (DiagonalScaling(f.mean(1).sqrt(), floor=self.fisher_floor),
                    DiagonalScaling(f.mean(0).sqrt(), floor=self.fisher_floor))

        return stats.cached(("lqlora-fisher-weights", self.fisher_floor), weights)

    def row_scaling(self, stats):
        return self._fisher_weights(stats)[0] if self.weighting == "fisher" else None

    def column_scaling(self, stats):
        if self.weighting == "fisher":
            return self._fisher_weights(stats)[1]
        if self.weighting == "output":
            return output_root(stats, self.eig_floor)
        return None

    def alternation_error(self, diff, rows, cols, stats):
        if self.weighting != "fisher":
            return super().alternation_error(diff, rows, cols, stats)
        f = self._fisher(stats).to(diff.device)
        return float(torch.sqrt((f * diff.to(torch.float64) ** 2).sum()))

    def stop_early(self, errors):
        return len(errors) >= 2 and errors[-1] > errors[-2] * (1.0 - self.tolerance)


@hookimpl
def lqframe_register(registry):
    registry.add_reconstructor("lqlora", LQLoRAReconstructor)
