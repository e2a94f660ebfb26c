"""The ``qera-approx`` reconstructor (QERA with a diagonal second moment, METHODS.md §2.1): assume
uncorrelated input channels, ``E[x_i x_j] = 0`` for ``i ≠ j``, so ``S = diag(√E[x_i²])`` (the
per-channel RMS) and ``C = [Δ S]_r S⁻¹`` minimises ``‖(Δ − C) S‖_F`` for ``Δ = W − Q``.

Channels whose RMS is below ``scale_floor · max RMS`` (dead channels) are raised to that floor;
all-zero activations give ``S = I`` (plain SVD)."""

from __future__ import annotations

from typing import ClassVar

import attrs

from lqframe import hookimpl
from lqframe.lowrank import LowRankReconstructor, real
from lqframe.numerics import DiagonalScaling


@attrs.frozen
class QERAApproxReconstructor(LowRankReconstructor):
    """Rank-``rank`` fit of ``W − Q`` weighted by the per-input-channel RMS."""

    label: ClassVar[str] = "qera-approx"
    needs = frozenset({"sq_sum"})

    scale_floor: float = attrs.field(default=1e-6, validator=real(0.0, 1.0, max_exclusive=True))

    def column_scaling(self, stats) -> DiagonalScaling:
        return DiagonalScaling(stats.rms(), floor=self.scale_floor)


@hookimpl
def lqframe_register(registry):
    registry.add_reconstructor("qera-approx", QERAApproxReconstructor)
