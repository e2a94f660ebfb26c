"""The ``lqer`` reconstructor (L²QER, METHODS.md §3.1): a diagonal activation scale

    s_i = max over calibration batches of mean_tokens |x_i|     (the ``abs_mean_max`` statistic)
    s ← clamp(s, min=min_scale);   s ← s / √(min(s)·max(s))

and ``C = [Δ diag(s)]_r diag(s)⁻¹`` for ``Δ = W − Q``, i.e. QERA-approx's closed form with mean |x|
in place of the RMS (the normalisation does not change the minimiser; it keeps the scaled matrix
near the magnitude of Δ). The factors are not quantized here (``factor_dtype`` sets their
storage)."""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import torch

from lqframe import hookimpl
from lqframe.lowrank import LowRankReconstructor, real
from lqframe.numerics import DiagonalScaling


def lqer_scale(abs_mean_max: torch.Tensor, min_scale: float) -> torch.Tensor:
    """L²QER's normalised per-channel scale (float64)."""
    s = abs_mean_max.to(torch.float64).clamp_min(min_scale)
    if s.numel() == 0:
        return s
    return s / math.sqrt(float(s.min()) * float(s.max()))


@attrs.frozen
class LQERReconstructor(LowRankReconstructor):
    """Rank-``rank`` fit of ``W − Q`` weighted by the running max of per-batch mean |x|."""

    label: ClassVar[str] = "lqer"
    needs = frozenset({"abs_mean_max"})

    min_scale: float = attrs.field(default=1e-4, validator=real(0.0, min_exclusive=True))

    def column_scaling(self, stats) -> DiagonalScaling:
        # the clamp is LQER's own floor: no further relative floor
        return DiagonalScaling(lqer_scale(stats.abs_mean_max, self.min_scale), floor=0.0)


@hookimpl
def lqframe_register(registry):
    registry.add_reconstructor("lqer", LQERReconstructor)
