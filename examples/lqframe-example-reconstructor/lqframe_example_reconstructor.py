"""An example third-party lqframe plugin: the ``abs-mean`` reconstructor.

A rank-``rank`` correction ``L·R`` of the quantization error ``Δ = W − Q`` fitted in the norm that
weighs every input channel by its mean absolute activation::

    min over rank-r C of  ‖(Δ − C) T‖_F,      T = diag(s),   s_i = (E|x_i|)^alpha

solved by lqframe's shared weighted low-rank solve ``C = [Δ T]_r T⁻¹`` (plain SVD when
``alpha = 0``). Channels that carry large activations (outlier features) get their error removed
first, as in AWQ-style activation-aware weighting. ``E|x_i|`` comes from the ``abs_sum``
calibration statistic (``Σ |x_i|`` over the calibration tokens, divided by their number).

The plugin only supplies the scaling; everything else comes from
:class:`lqframe.lowrank.LowRankReconstructor`: the options ``rank``, ``method``, ``factor_dtype``,
``iterations`` (alternation with the quantizer), ``oversample``, ``niter`` and ``seed``, the exact
storage accounting ``lowrank_bits`` and the ``info`` diagnostics.

The module only uses lqframe's public API, so it doubles as a template for new reconstructors.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

import lqframe
from lqframe.lowrank import LowRankReconstructor, real
from lqframe.numerics import DiagonalScaling

__all__ = ["AbsMeanReconstructor", "lqframe_register"]


@attrs.frozen
class AbsMeanReconstructor(LowRankReconstructor):
    """Rank-``rank`` fit of ``W − Q`` weighted per input channel by ``(E|x|)^alpha`` (``abs-mean``)."""

    label: ClassVar[str] = "abs-mean"  # used in error messages
    needs = frozenset({"abs_sum"})  # captured by the pipeline only because this is declared

    alpha: float = attrs.field(default=1.0, validator=real(0.0, 4.0))
    scale_floor: float = attrs.field(default=1e-6, validator=real(0.0, 1.0, max_exclusive=True))

    @classmethod
    def test_configs(cls):
        return [
            {"rank": 4, "factor_dtype": "float32"},
            {"rank": 2, "alpha": 0.5, "factor_dtype": "int8"},
            {"rank": 3, "iterations": 2},
        ]

    def column_scaling(self, stats) -> DiagonalScaling:
        mean_abs = stats.abs_sum / max(stats.n_tokens, 1)  # float64, one value per input channel
        # channels below scale_floor · max are raised to it; all-zero activations give T = I
        return DiagonalScaling(mean_abs.pow(self.alpha), floor=self.scale_floor)


@lqframe.hookimpl
def lqframe_register(registry):
    registry.add_reconstructor("abs-mean", AbsMeanReconstructor)
